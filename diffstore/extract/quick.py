"""A re-run that has nothing to do answers at once: no torch imported, no network built, no image decoded.

The model's identity (fingerprint, name, block table, T, input size) and each split's (its size and ids hash) are
remembered after a run computes them, in a small cache ($DIFFSTORE_CACHE/identity.json, default
~/.cache/diffstore/), keyed by the extraction's options and by the files they were computed from (path, size and
mtime of each). A later run with the same options and unchanged files reads them back, checks the store's arrays
against them (each array's recorded fingerprint, and the done flags of the requested rows) and, when everything is
stored, answers without loading anything heavy. Anything else falls back to the full path, which is never wrong:
a file changed, an array missing, a spec whose files cannot be listed (hub ids, py: plugins, image folders).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from ..errors import DiffstoreError
from ..key import EXTRACTOR_VERSION, FeatureKey, Recipe, fingerprint
from .options import ExtractOptions, check_pools, check_ts, row_range

CACHE_ENV = "DIFFSTORE_CACHE"
MAX_ENTRIES = 256  # oldest entries are dropped beyond this


def cache_file() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "diffstore")
    return Path(root) / "identity.json"


def folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts))


def model_files(o: ExtractOptions) -> list[Path] | None:
    """The files a model spec is loaded from, or None when they cannot be listed without loading it."""
    from ..models import DEFAULT_DIR

    spec = o.model
    if spec == "default":
        return folder_files(DEFAULT_DIR)
    if spec.startswith("adm:"):
        files = [Path(spec[4:]).expanduser()] if spec[4:] else []
        config = Path(o.adm_config).expanduser() if o.adm_config else None
        return [f for f in files + ([config] if config and config.is_file() else []) if f.is_file()] or None
    folder = Path(spec.split(":", 1)[1] if spec.startswith(("sd:", "dit:")) else spec).expanduser()
    return folder_files(folder) if not spec.startswith("py:") and folder.is_dir() else None


def data_files(o: ExtractOptions, split: str) -> list[Path] | None:
    """The files a split's identity is computed from, or None (image folders: every file would be listed)."""
    if o.dataset == "digits":
        found = importlib.util.find_spec("sklearn")  # the package's location, without importing it
        return [Path(found.origin).parent / "datasets" / "data" / "digits.csv.gz"] if found else None
    if o.dataset in ("mnist", "fashion-mnist"):
        from ..datasets import data_root

        root = data_root(o.dataset, o.data_root)
        prefix = "train" if split == "train" else "t10k"
        return [root / f"{prefix}-{kind}-ubyte.gz" for kind in ("images-idx3", "labels-idx1")]
    return None


def cache_key(kind: str, params: dict, files: list[Path] | None) -> str | None:
    if files is None:
        return None
    try:
        stats = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    except OSError:
        return None
    return fingerprint({"kind": kind, "params": params, "files": stats, "extractor": EXTRACTOR_VERSION})


def model_key(o: ExtractOptions) -> str | None:
    return cache_key("model", o.model_spec(), model_files(o))


def split_key(o: ExtractOptions, split: str) -> str | None:
    try:
        files = data_files(o, split)
    except DiffstoreError:
        return None
    name = o.stored_dataset()
    renamed = {"name": name} if name != o.dataset else {}  # the default's key is what it was before the option
    return cache_key("split", {"dataset": o.dataset, "split": split, "skip_bad": o.skip_bad, **renamed}, files)


def read_cache() -> dict:
    try:
        entries = json.loads(cache_file().read_text())
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        return {}


def remember(entries: dict) -> None:
    """Add {key: identity} to the cache (a best effort: a read-only home only costs the next run its speed)."""
    entries = {k: v for k, v in entries.items() if k is not None}
    if not entries:
        return
    cache = {**read_cache(), **entries}
    cache = dict(list(cache.items())[-MAX_ENTRIES:])
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(path)
    except OSError:
        pass


def model_identity(model) -> dict:
    return {"fingerprint": model.fingerprint, "name": model.name, "T": model.num_timesteps,
            "size": model.image_size, "channels": model.image_channels, "mid": model.blocks.mid,
            "blocks": [[b.index, b.name, b.channels, b.height, b.width] for b in model.blocks]}


def split_identity(split) -> dict:
    return {"n": len(split), "ids_sha256": split.ids_sha256(), "source": split.source}


def all_stored(o: ExtractOptions) -> list[dict] | None:
    """The rows `extract` (or `extract --dry-run`) would print when every requested array holds every requested
    row, computed from the cache and the store alone; None when that cannot be known this way (the caller then runs
    the full path)."""
    from ..blocks import BlockInfo, BlockTable
    from ..datasets import dataset_fingerprint
    from ..preprocess import Preprocess
    from ..store import Store
    from ..store.arrays import done_masks

    cache = read_cache()
    model = cache.get(model_key(o) or "")
    if model is None or "://" not in o.store and not Path(o.store).is_dir():
        return None
    try:
        store = Store.open(o.store, mode="r")
        table = BlockTable([BlockInfo(i, n, "", c, h, w) for i, n, c, h, w in model["blocks"]], model["mid"])
        ts, blocks, pools = check_ts(o.t, model["T"]), table.resolve(",".join(o.blocks)), check_pools(o.pools)
        rows, name = [], o.stored_dataset()
        for split in o.split:
            data = cache.get(split_key(o, split) or "")
            group = store._group(f"datasets/{name}/{split}")
            if data is None or group is None or group.attrs.get("ids_sha256") != data["ids_sha256"]:
                return None
            pre = Preprocess(model["size"], model["channels"]).to_dict()
            dataset_fp = dataset_fingerprint(name, split, data["source"], data["ids_sha256"], pre)
            keys = [FeatureKey(name, split, model["name"], o.input, t, b, p) for t in ts for b in blocks
                    for p in pools]
            arrays = {k: store.open_array(k.path) for k in keys if store._group(k.path) is not None}
            if len(arrays) < len(keys):
                return None
            held = [{"micro_batch": 16, "attention": "eager", "compile": False, **a.attrs["recipe"]}
                    for a in arrays.values()]
            forward = {f: getattr(o, f) if getattr(o, f) is not None else held[0][f]
                       for f in ("micro_batch", "attention", "compile")}
            recipe = Recipe(model["fingerprint"], dataset_fp, o.noise_seed, o.noise_draws, o.compute_dtype, o.dtype,
                            **forward)
            if any(a.attrs.get("fingerprint") != recipe.fingerprint(k) for k, a in arrays.items()):
                return None
            shard_rows = {a.shard_rows for a in arrays.values()}
            span = row_range(o, split, data["n"])
            if len(shard_rows) != 1 or o.shard_rows not in (None, *shard_rows):
                return None
            size = shard_rows.pop()
            shards = range(span.start // size, -(-span.stop // size)) if span else range(0)
            masks = done_masks(arrays)
            if not all(masks[k][i] for k in arrays for i in shards):
                return None
            if o.dry_run:  # what stage.run prints from estimate.dry_run: nothing to create, compute or write
                rows.append({"store": store.url, "dataset": name, "model": model["name"], "split": split,
                             "rows": len(span), "of": data["n"],
                             "arrays": [{"array": k.path, "status": "resume", "shards": 0, "of": len(shards),
                                         "bytes": 0} for k in keys],
                             "to_create": 0, "tasks": 0, "bytes": 0, "seconds": 0, "micro_batch": recipe.micro_batch})
                continue
            rows.append({"store": store.url, "dataset": name, "split": split, "model": model["name"],
                         "rows": len(span), "of": data["n"], "micro_batch": recipe.micro_batch,
                         "arrays": [k.path for k in keys], "shards_run": 0, "shards_total": len(ts) * len(shards),
                         "status": "already stored"})
        return rows
    except (DiffstoreError, KeyError, TypeError, ValueError):  # anything unusual: the full path decides
        return None
