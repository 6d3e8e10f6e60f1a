"""The feature store: a Zarr v3 group on a local path or any fsspec URL (s3://bucket/team.zarr).

Layout (readable without diffstore, e.g. `zarr.open_array(url, path=".../x")` or `dask.array.from_zarr`):

    zarr.json                                  attrs {"diffstore": {"format": 1}}
    datasets/{dataset}/{split}/ids, labels     int64 [N]; attrs: class_names, ids_sha256, source
    features/{dataset}/{split}/{model}/{input}/t{t}/b{block}/p{pool}/
        zarr.json                              attrs: key, recipe, fingerprint, block, preprocess, provenance
        x                                      [N, C, p, p] (or [N, C, H, W] for p=full), float16 by default,
                                               chunked along rows, sharded, zstd + crc32c per chunk
        done                                   uint8 [n_shards], one chunk per shard: 1 = shard durable
    targets/...                                RepFusion teacher targets, same ShardedArray layout
    results/{kind}/{name}                      attrs: JSON results (probe accuracies, CKA matrices, policies)

Writes are shard-aligned: a writer owns whole shards, writes a shard's rows in one call (one object per
shard) and only then sets its `done` element, which lives in its own chunk so concurrent writers never
touch the same object (zarr#3514, #3682). Resume skips done shards and never rewrites them.
"""

from __future__ import annotations

import datetime
import difflib
import platform
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from ..errors import DiffstoreError
from ..key import FeatureKey
from .arrays import ShardedArray

FORMAT = 1
CHUNK_BYTES = 1 << 20  # target raw size of one chunk (the unit a reader decompresses)


def provenance() -> dict:
    versions = {}
    for pkg in ("diffstore", "torch", "diffusers", "zarr", "numpy"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "packages": versions}


def zarr_store(url: str, read_only: bool, storage_options: dict | None = None):
    """A zarr Store for a local path or an fsspec URL; a missing filesystem library is named."""
    if "://" not in url or url.startswith("file://"):
        path = Path(url.removeprefix("file://")).expanduser()
        if path.exists() and not path.is_dir():
            raise DiffstoreError(f"{url} is a file, not a diffstore store: pass a directory path (e.g. data/f.zarr)")
        return zarr.storage.LocalStore(path, read_only=read_only)
    try:
        return zarr.storage.FsspecStore.from_url(url, storage_options=storage_options, read_only=read_only)
    except (ImportError, ValueError) as e:
        protocol = url.split("://")[0]
        pkg = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}.get(protocol, f"the fsspec backend for {protocol}://")
        raise DiffstoreError(f"cannot open {url}: {e}. Install {pkg} (pip install {pkg}) to use {protocol}:// stores") from e


@dataclass
class SplitRecord:
    dataset: str
    split: str
    ids: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    ids_sha256: str


def fingerprint_diff(stored: dict, wanted: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two attrs dicts (which setting changed)."""
    out = []
    for k in sorted(set(stored) | set(wanted)):
        a, b = stored.get(k), wanted.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: stored {a!r}, requested {b!r}")
    return out


class Store:
    def __init__(self, url: str, root: zarr.Group):
        self.url = url
        self.root = root

    @classmethod
    def open(cls, url: str, mode: str = "a", storage_options: dict | None = None) -> "Store":
        """mode "r": the store must exist. mode "a": created when absent. Never opens a non-diffstore path."""
        zs = zarr_store(url, read_only=(mode == "r"), storage_options=storage_options)
        try:
            root = zarr.open_group(zs, mode="r" if mode == "r" else "r+")
        except FileNotFoundError:
            root = None
        except Exception as e:  # a zarr *array* or a broken zarr.json at the root
            raise DiffstoreError(f"{url} is not a diffstore store ({type(e).__name__}: {e}); pass another --store path") from e
        if root is None:
            if mode == "r":
                raise DiffstoreError(f"no diffstore store at {url}: run `diffstore extract --store {url}` first")
            local = Path(url) if "://" not in url else None
            if local is not None and local.is_dir() and any(local.iterdir()):
                raise DiffstoreError(f"{url} is a non-empty directory without a store in it; refusing to write there. "
                                     "Pass a new or empty path (e.g. data/f.zarr)")
            root = zarr.open_group(zs, mode="w-", attributes={"diffstore": {"format": FORMAT}})
        elif "diffstore" not in root.attrs:
            raise DiffstoreError(f"{url} is a Zarr group but not a diffstore store (no 'diffstore' attribute); "
                                 "refusing to touch it. Pass another --store path")
        elif root.attrs["diffstore"].get("format", 0) > FORMAT:
            raise DiffstoreError(f"{url} has store format {root.attrs['diffstore']['format']}; upgrade diffstore to read it")
        return cls(url, root)

    # --- sharded arrays -------------------------------------------------------------------------
    def _group(self, path: str) -> zarr.Group | None:
        try:
            node = self.root[path]
        except KeyError:
            return None
        return node if isinstance(node, zarr.Group) else None

    def open_array(self, path: str) -> ShardedArray:
        g = self._group(path)
        if g is None or "x" not in g:
            raise DiffstoreError(f"no array at {path} in {self.url}")
        return ShardedArray(g)

    def check(self, path: str, fingerprint: str, attrs: dict) -> None:
        """Refuse (before anything is written) when `path` holds another fingerprint, naming what differs."""
        g = self._group(path)
        if g is not None and g.attrs.get("fingerprint") != fingerprint:
            diff = fingerprint_diff(dict(g.attrs).get("recipe", {}), attrs.get("recipe", {})) or ["(fingerprint only)"]
            raise DiffstoreError(
                f"{path} in {self.url} already holds features with another fingerprint; refusing to mix them.\n  "
                + "\n  ".join(diff)
                + "\nNothing was written. Use another --store, or --model-name to store other weights under another name.")

    def create(self, path: str, fingerprint: str, attrs: dict, row_shape: tuple, n_rows: int, shard_rows: int,
               dtype: str = "float16") -> ShardedArray:
        """Pre-sized array at `path`. If one exists: the same fingerprint reopens it (resume); a different
        fingerprint is refused, naming the settings that differ, and nothing is written."""
        self.check(path, fingerprint, attrs)
        g = self._group(path)
        if g is not None:
            if "x" in g and "done" in g:
                return ShardedArray(g)
        else:
            g = self.root.create_group(path, attributes={**attrs, "fingerprint": fingerprint, "provenance": provenance()})
        row_bytes = int(np.prod(row_shape)) * np.dtype(dtype).itemsize
        chunk_rows = max(1, min(shard_rows, CHUNK_BYTES // max(row_bytes, 1)))
        while shard_rows % chunk_rows:
            chunk_rows -= 1
        n_shards = -(-n_rows // shard_rows)
        if "x" not in g:
            g.create_array("x", shape=(n_rows, *row_shape), dtype=dtype, chunks=(chunk_rows, *row_shape),
                           shards=(shard_rows, *row_shape), compressors=[ZstdCodec(level=1), Crc32cCodec()],
                           fill_value=np.nan, dimension_names=("sample", *[f"d{i}" for i in range(len(row_shape))]))
        if "done" not in g:
            g.create_array("done", shape=(n_shards,), dtype="uint8", chunks=(1,), fill_value=0,
                           compressors=None, dimension_names=("shard",))
        return ShardedArray(g)

    def arrays(self) -> list[ShardedArray]:
        """Every sharded array (features and targets), in path order."""
        return [ShardedArray(node) for _, node in sorted(self.root.members(max_depth=None), key=lambda m: m[0])
                if isinstance(node, zarr.Group) and "x" in node and "done" in node]

    # --- feature arrays ---------------------------------------------------------------------------
    def feature_keys(self) -> list[FeatureKey]:
        g = self._group("features")
        if g is None:
            return []
        keys = [FeatureKey.from_path(f"features/{path}") for path, node in g.members(max_depth=None)
                if isinstance(node, zarr.Group) and path.count("/") == 6]
        return sorted(keys, key=lambda k: (k.dataset, k.split, k.model, k.input, k.t, k.block, k.pool))

    def features(self, key: FeatureKey) -> ShardedArray:
        g = self._group(key.path)
        if g is None or "x" not in g:
            known = [k.path for k in self.feature_keys()]
            close = difflib.get_close_matches(key.path, known, n=3, cutoff=0.5)
            hint = ("closest: " + ", ".join(close)) if close else f"the store holds {len(known)} arrays (`diffstore ls`)"
            raise DiffstoreError(f"{key.path} is not in {self.url}; {hint}")
        return ShardedArray(g)

    # --- dataset splits (ids and labels stored once per split) -----------------------------------
    def check_split(self, split) -> None:
        g = self._group(f"datasets/{split.name}/{split.split}")
        if g is not None and g.attrs["ids_sha256"] != split.ids_sha256():
            raise DiffstoreError(f"{self.url} holds {split.name}/{split.split} with other sample ids "
                                 f"({g.attrs['n']} samples, you have {len(split)}); refusing to mix them. Use another --store")

    def put_split(self, split) -> SplitRecord:
        path = f"datasets/{split.name}/{split.split}"
        self.check_split(split)
        if self._group(path) is not None:
            return self.split(split.name, split.split)
        sha = split.ids_sha256()
        g = self.root.create_group(path, attributes={"class_names": list(split.class_names), "ids_sha256": sha,
                                                     "n": len(split), "source": split.source, "skipped": split.skipped})
        for name, values in (("ids", split.ids), ("labels", split.labels)):
            g.create_array(name, data=np.asarray(values, dtype=np.int64), chunks=(max(1, min(len(values), 1 << 16)),))
        return self.split(split.name, split.split)

    def split(self, dataset: str, split: str) -> SplitRecord:
        g = self._group(f"datasets/{dataset}/{split}")
        if g is None:
            raise DiffstoreError(f"{self.url} has no {dataset}/{split} split: run `diffstore extract --dataset {dataset} --split {split}`")
        return SplitRecord(dataset, split, g["ids"][:], g["labels"][:], list(g.attrs["class_names"]), g.attrs["ids_sha256"])

    # --- results written next to the features ----------------------------------------------------
    def put_result(self, kind: str, name: str, payload: dict) -> None:
        path = f"results/{kind}/{name}"
        if self._group(path) is not None:
            del self.root[path]
        self.root.create_group(path, attributes={"payload": payload, "provenance": provenance()})

    def results(self, kind: str) -> list[dict]:
        g = self._group(f"results/{kind}")
        if g is None:
            return []
        return [dict(node.attrs)["payload"] for _, node in sorted(g.members(), key=lambda m: m[0])]
