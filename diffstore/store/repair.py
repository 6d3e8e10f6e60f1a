"""`diffstore repair` and `diffstore rm`: heal what verify reports, remove what a user no longer wants.

repair recomputes exactly the shards verify reports bad (corrupt, missing data, not done) with the extraction
code itself (extract.plan_extraction + extract_features): features are a pure function of the key, so the
repaired array is bit-identical to a clean run. Broken array metadata (x/ or done/zarr.json) is rebuilt from
the layout the group recorded at creation, keeping every shard. The model and the data are found again from
the array's own attributes; when they no longer give the stored fingerprint (weights changed on disk, another
data root) the extraction refuses before writing, and repair says so.
"""

from __future__ import annotations

import json
from collections import defaultdict

from ..errors import DiffstoreError
from ..key import FeatureKey, select
from .store import Store
from .verify import Finding, check_array, verify_findings


def match(store: Store, texts: list[str], paths: list[str] | None = None) -> list[str]:
    """Array paths named by store paths (features/..., targets/...) or selectors like t=90/b=5/p=2, among `paths`
    (default: every array of the store)."""
    paths = store.array_paths() if paths is None else paths
    keys = [FeatureKey.from_path(p) for p in paths if p.startswith("features/") and p.count("/") == 7]
    out = []
    for text in texts:
        if text.rstrip("/") in paths:
            out.append(text.rstrip("/"))
            continue
        try:
            found = [k.path for k in select(keys, text)] if "=" in text or text.startswith("features/") else []
        except ValueError as e:
            raise DiffstoreError(str(e)) from None
        if not found:
            raise DiffstoreError(f"no array in {store.url} matches {text!r}; `diffstore ls --store {store.url}` lists "
                                 "the keys (paths like features/... or selectors like t=90/b=5/p=2)")
        out += found
    return list(dict.fromkeys(out))


def extract_options(attrs: dict, key: FeatureKey) -> dict:
    """The model, data and recipe options of the extraction that wrote an array (from its attributes)."""
    source = attrs.get("model", {}).get("source", {})
    base, _, seed = key.model.partition(".random-init-s")
    spec = source.get("spec") or (f"adm:{source['path']}" if source.get("path") else base)
    recipe = attrs["recipe"]
    return {"model": dict(spec=spec, name=base, random_init=int(seed) if seed else None,
                          adm_config=source.get("adm_config")),
            "data": dict(name=key.dataset, split=key.split, root=attrs.get("dataset", {}).get("source", {}).get("root")),
            "recipe": dict(input_mode=key.input, noise_seed=recipe["noise_seed"], noise_draws=recipe["noise_draws"],
                           compute_dtype=recipe["compute_dtype"], storage_dtype=recipe["storage_dtype"])}


def rebuild_metadata(store: Store, path: str) -> None:
    """Drop an array's x/ and done/zarr.json (not its shards) so that extraction re-creates them from the layout
    the group recorded; refuses when the group's own zarr.json (its fingerprint) is what is broken."""
    g = store._group(path)  # raises, naming the file, when the group's zarr.json is unreadable
    if g is None or "layout" not in g.attrs:
        raise DiffstoreError(f"{store.url.rstrip('/')}/{path}: its metadata cannot be rebuilt (no recorded layout: a "
                             f"format-1 array). Remove it with `diffstore rm --store {store.url} {path}` and re-extract")
    for name in ("x", "done"):
        store.remove_key(f"{path}/{name}/zarr.json")


def repair(store: Store, texts: list[str] | None = None, batch_size: int = 64, device: str = "auto",
           show_progress: bool = True) -> list[dict]:
    """Repair the arrays named by `texts` (default: all) as verify finds them; returns one row per array."""
    from ..datasets import load_split
    from ..extract import extract_features, pick_device, plan_extraction
    from ..models import load_model

    paths = match(store, texts) if texts else store.array_paths()
    findings, _ = verify_findings(store, paths)
    by_path: dict[str, list[Finding]] = defaultdict(list)
    for f in findings:
        by_path[f.array].append(f)
    targets = [p for p in by_path if not p.startswith("features/")]
    if targets:
        raise DiffstoreError(f"repair rebuilds feature arrays; {targets[0]} is not one: remove it with `diffstore rm "
                             f"--store {store.url} {targets[0]}` and re-run `diffstore repfusion targets`")
    for path, fs in by_path.items():
        if any(f.kind == "metadata" for f in fs):
            rebuild_metadata(store, path)
    groups: dict[str, list[str]] = defaultdict(list)  # one model load per extraction recipe
    for path in by_path:
        attrs = dict(store._group(path).attrs)
        groups[json.dumps(extract_options(attrs, FeatureKey.from_path(path)), sort_keys=True)].append(path)
    rows, models = [], {}
    for options, group_paths in groups.items():
        opts = json.loads(options)
        spec = json.dumps(opts["model"], sort_keys=True)
        if spec not in models:
            models[spec] = load_model(opts["model"].pop("spec"), **opts["model"]).to(pick_device(device))
        stored = store.split(opts["data"]["name"], opts["data"]["split"])
        skipped = bool(store._group(f"datasets/{stored.dataset}/{stored.split}").attrs.get("skipped"))
        data = load_split(**opts["data"], skip_bad=skipped).take(stored.ids, "repair reads the data from the root the "
                                                                             "array was extracted from")
        for path in group_paths:
            key = FeatureKey.from_path(path)
            try:
                plan = plan_extraction(store, models[spec], data, str(key.t), str(key.block), key.pool, **opts["recipe"])
            except DiffstoreError as e:
                raise DiffstoreError(f"repair cannot reproduce {path} from its recorded model and data: {e}") from None
            array = plan.arrays[(key.t, key.block, key.pool)]
            array.invalidate(sorted({i for f in check_array(store, path) if f.kind == "corrupt" for i in f.shards}))
            summary = extract_features(plan, batch_size=batch_size, show_progress=show_progress)
            rows.append({"array": path, "problems": ", ".join(sorted({f.kind for f in by_path[path]})),
                         "shards recomputed": summary["tasks_run"], "shards": array.n_shards})
    left, _ = verify_findings(store, paths)
    if left:
        raise DiffstoreError(f"repair left {len(left)} problem(s), first: {left[0].array}: {left[0].problem}")
    return rows


def referencing(payload, path: str, key: dict | None, fingerprint: str | None) -> bool:
    """Whether a result payload names the array (by path, key or fingerprint) anywhere inside it."""
    if isinstance(payload, dict):
        return (key is not None and {k: payload.get(k) for k in key} == key) or \
            any(referencing(v, path, key, fingerprint) for v in payload.values())
    if isinstance(payload, list):
        return any(referencing(v, path, key, fingerprint) for v in payload)
    return isinstance(payload, str) and (payload == path or payload.startswith(path + "/") or payload == fingerprint)


def plan_removal(store: Store, texts: list[str]) -> tuple[list[str], list[str]]:
    """(array paths, result paths) that `diffstore rm` would delete."""
    arrays = match(store, texts)
    results = []
    for result in store.result_paths():
        payload = dict(store._group(result).attrs).get("payload", {})
        for path in arrays:
            try:
                attrs = dict(store._group(path).attrs)
            except DiffstoreError:  # its zarr.json is broken: match by path and key
                attrs = {"key": FeatureKey.from_path(path).to_dict()} if path.startswith("features/") else {}
            if referencing(payload, path, attrs.get("key"), attrs.get("fingerprint")):
                results.append(result)
                break
    return arrays, results


def remove(store: Store, paths: list[str]) -> None:
    for path in paths:
        store.remove(path)
