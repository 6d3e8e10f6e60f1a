"""The reading side of the public Python API: open a store, pick features by key, read them as numpy, torch,
dask or xarray. The stages (ds.extract, ds.probe, ds.cka, ds.repair) live in their packages, each built from its
options dataclass like the CLI commands are.

    import diffstore as ds
    store = ds.open("data/default.zarr")
    store.keys(t=50, pool=2)                          # FeatureKeys matching a selector
    f = store.features(t=50, block="mid", pool=2, split="train")
    x, y = f.numpy(), f.labels                        # [N, C, p, p] float16, [N] int64
    f.to_xarray()                                     # dims (sample, channel, y, x), ids and labels as coordinates
    store.head(t=50, block="mid", pool=2, head="linear").predict(x)  # a head `probe --save-heads` stored

Reading needs only numpy and zarr (xarray, dask, torch when asked for); nothing here imports torch until a
stage runs or `to_torch()` is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import DiffstoreError, require
from .key import DEFAULT_STORE, FeatureKey
from .store import ShardedArray, Store

if TYPE_CHECKING:
    import dask.array
    import torch
    import xarray

FIELDS = ("dataset", "split", "model", "input", "t", "block", "pool")


def as_set(value: Any) -> set | None:
    if value is None:
        return None
    return set(value) if isinstance(value, (list, tuple, set, frozenset)) else {value}


def whole(value: Any, name: str) -> int:
    """A key field that is an integer (t, block index), from an int or a string of digits."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    raise DiffstoreError(f"{name}= takes integers" + (" or block names such as 'mid'" if name == "block" else "")
                         + f", got {value!r}")


class Features:
    """One stored feature array, read lazily: nothing is read until numpy()/to_*() is called.

    `np.asarray(f)` works too. Rows follow the split's sample ids (`ids`), `labels` are aligned with them.
    """

    def __init__(self, store: Store, array: ShardedArray, limit: int | None = None):
        self.store = store
        self.array = array
        self.key: FeatureKey = array.key
        self.attrs: dict = array.attrs
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
            raise DiffstoreError(f"limit= takes a number of rows >= 1, got {limit!r}")
        self.n = array.n_rows if limit is None else min(int(limit), array.n_rows)  # rows [0, n) (limit=)

    def __repr__(self) -> str:
        return f"Features({self.key.path}, shape={self.shape}, dtype={self.dtype}, block={self.block_name!r})"

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n, *self.array.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.x.dtype)

    @property
    def block_name(self) -> str:
        return self.attrs.get("block", {}).get("name", "")

    @property
    def ids(self) -> np.ndarray:
        return self.store.split(self.key.dataset, self.key.split).ids[:self.n]

    @property
    def labels(self) -> np.ndarray:
        return self.store.split(self.key.dataset, self.key.split).labels[:self.n]

    @property
    def class_names(self) -> list[str]:
        return self.store.split(self.key.dataset, self.key.split).class_names

    def numpy(self, dtype=None) -> np.ndarray:
        """The rows as a numpy array in the stored dtype (float16 by default), or in `dtype` (float32 is decoded
        straight into a float32 array: no float16 copy): all of them, or the first `limit` (their shards must be
        done; the refusal names the missing ones)."""
        self.array.require_done(self.n)
        return self.array.read(slice(0, self.n), dtype=dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.numpy(dtype)

    def to_torch(self, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
        """A CPU tensor (the stored dtype unless `dtype` is given)."""
        torch = require("torch")
        x = torch.from_numpy(self.numpy(np.float32 if dtype == torch.float32 else None))
        return x if dtype is None else x.to(dtype)

    def to_torch_dataset(self, shuffle: bool = True, buffer: int = 8192, seed: int = 0,
                         batch_size: int | None = None) -> "torch.utils.data.IterableDataset":
        """A torch IterableDataset of (features float32, label) for keys larger than memory: whole shards read in a
        seeded shuffled order into a shuffle buffer of `buffer` rows; DataLoader workers read disjoint shards
        (stream.py). batch_size: yield ready batches instead of rows (faster than collating rows)."""
        from .stream import shard_stream

        return shard_stream(self.array, self.labels, self.n, shuffle, buffer, seed, batch_size)

    def to_dask(self) -> "dask.array.Array":
        """A dask array with one chunk per shard: for features larger than memory."""
        self.array.require_done(self.n)
        require("dask.array", "all")
        return self.array.to_dask()[:self.n]

    def to_xarray(self, lazy: bool = False) -> "xarray.DataArray":
        """A labelled DataArray, the view `xr.open_datatree` gives of the store: dims (sample, channel, height,
        width); coordinates sample (the ids), label and label_name; the key, block name and fingerprint in attrs.
        lazy=True keeps the data as dask."""
        require("xarray", "xarray")
        attrs = {**self.key.to_dict(), "block_name": self.block_name, "store": self.store.url, "path": self.key.path}
        return self.array.to_xarray(lazy, self.n, attrs).rename(f"t{self.key.t}_b{self.key.block}_p{self.key.pool}")


class FeatureStore:
    """A diffstore store opened for reading (`ds.open(url)`)."""

    def __init__(self, store: Store):
        self.store = store
        self.url = store.url

    def __repr__(self) -> str:
        return f"FeatureStore({self.url!r}, {len(self.store.feature_keys())} feature arrays)"

    def keys(self, **selector: Any) -> list[FeatureKey]:
        """Feature keys matching a selector: any of dataset, split, model, input, t, block (index or name,
        e.g. "mid"), pool (int or "full"); a value may be a list. No selector: every key."""
        unknown = set(selector) - set(FIELDS)
        if unknown:
            raise DiffstoreError(f"unknown key field(s) {', '.join(sorted(unknown))}: use {', '.join(FIELDS)}")
        want = {f: as_set(v) for f, v in selector.items() if v is not None}
        if "pool" in want:
            want["pool"] = {str(p) for p in want["pool"]}
        names = {b for b in want.get("block", ()) if isinstance(b, str) and not b.isdigit()}
        for f in ("t", "block"):
            if f in want:
                want[f] = {whole(v, f) for v in want[f] if not (f == "block" and v in names)}

        def matches(k: FeatureKey) -> bool:
            for f, vals in want.items():
                if f == "block":
                    if k.block in vals:
                        continue
                    if names and self.store.features(k).attrs.get("block", {}).get("name") in names:
                        continue
                    return False
                if getattr(k, f) not in vals:
                    return False
            return True

        return [k for k in self.store.feature_keys() if matches(k)]

    def features(self, key: FeatureKey | str | None = None, *, limit: int | None = None, **selector: Any) -> Features:
        """The one feature array matching a FeatureKey, a store path, or a selector (as `keys`); limit=N: its
        first N rows (a split fills shard by shard). When several match, the error lists the fields that tell them
        apart."""
        if isinstance(key, FeatureKey):
            return Features(self.store, self.store.features(key), limit)
        if isinstance(key, str):
            return Features(self.store, self.store.features(FeatureKey.from_path(key)), limit)
        if key is not None:
            raise DiffstoreError(f"features() takes a FeatureKey, a store path or selector keywords, got {key!r}")
        found = self.keys(**selector)
        asked = ", ".join(f"{f}={v}" for f, v in selector.items()) or "(no selector)"
        if not found:
            raise DiffstoreError(f"no feature array in {self.url} matches {asked}; store.keys() lists them")
        if len(found) > 1:
            differ = {f: sorted({str(getattr(k, f)) for k in found}) for f in FIELDS}
            choices = "; ".join(f"{f}: {', '.join(v)}" for f, v in differ.items() if len(v) > 1)
            raise DiffstoreError(f"{len(found)} feature arrays in {self.url} match {asked}; pick one ({choices})")
        return Features(self.store, self.store.features(found[0]), limit)

    def _dataset(self, dataset: str | None, split: str) -> str:
        if dataset is not None:
            return dataset
        held = sorted({k.dataset for k in self.store.feature_keys() if k.split == split})
        if len(held) != 1:
            raise DiffstoreError(f"{self.url} holds split {split!r} of {held or 'no dataset'}: pass dataset=")
        return held[0]

    def labels(self, split: str, dataset: str | None = None) -> np.ndarray:
        """Labels of a split, int64 [N], in the stored row order."""
        return self.store.split(self._dataset(dataset, split), split).labels

    def ids(self, split: str, dataset: str | None = None) -> np.ndarray:
        """Sample ids of a split, int64 [N]: row i of every feature array of the split is sample ids[i]."""
        return self.store.split(self._dataset(dataset, split), split).ids

    def class_names(self, split: str, dataset: str | None = None) -> list[str]:
        return self.store.split(self._dataset(dataset, split), split).class_names

    def heads(self, **selector: Any) -> list[dict]:
        """The heads `diffstore probe --save-heads` stored: what each is (name = its result's, key fields, head,
        recipe, chosen C/k/lr, class names, top-1). Selector: dataset, model, input, t, block, pool, head (kind or
        label), estimator; a value may be a list."""
        from .probe.saved import find_heads

        return find_heads(self.store, **selector)

    def head(self, name: str | None = None, **selector: Any) -> Any:
        """A saved head as a fitted scikit-learn estimator (LinearProbe, KNNProbe or HeadProbe) that predicts on new
        features of its key: by name, or the one head matching a selector (as `heads`), e.g.
        `store.head(t=50, block="mid", pool=2, head="linear").predict(f.numpy())`."""
        from .probe.saved import load_head

        return load_head(self.store, name, **selector)


def open(url: str = DEFAULT_STORE, storage_options: dict | None = None) -> FeatureStore:  # noqa: A001 (ds.open)
    """Open an existing store (local path or fsspec URL such as s3://bucket/team.zarr) for reading."""
    return FeatureStore(Store.open(url, mode="r", storage_options=storage_options))
