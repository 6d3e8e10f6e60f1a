"""The public Python API: open a store, pick features by key, read them as numpy, torch, dask or xarray;
run the stages (extract, probe, cka) with the CLI's defaults. The CLI is a thin layer over these functions.

    import diffstore as ds
    store = ds.open("data/default.zarr")
    store.keys(t=50, pool=2)                          # FeatureKeys matching a selector
    f = store.features(t=50, block="mid", pool=2, split="train")
    x, y = f.numpy(), f.labels                        # [N, C, p, p] float16, [N] int64
    f.to_xarray()                                     # dims (sample, channel, y, x), ids and labels as coordinates

Reading needs only numpy and zarr (xarray, dask, torch when asked for); nothing here imports torch until a
stage runs or `to_torch()` is called.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterable
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


def as_spec(value: Any) -> str:
    """A CLI-style comma list from a Python value: [10, 50] -> "10,50"; a string passes through."""
    if isinstance(value, str):
        return value
    if isinstance(value, Iterable):
        return ",".join(str(v) for v in value)
    return str(value)


def as_set(value: Any) -> set | None:
    if value is None:
        return None
    return set(value) if isinstance(value, (list, tuple, set, frozenset)) else {value}


class Features:
    """One stored feature array, read lazily: nothing is read until numpy()/to_*() is called.

    `np.asarray(f)` works too. Rows follow the split's sample ids (`ids`), `labels` are aligned with them.
    """

    def __init__(self, store: Store, array: ShardedArray):
        self.store = store
        self.array = array
        self.key: FeatureKey = array.key
        self.attrs: dict = array.attrs

    def __repr__(self) -> str:
        return f"Features({self.key.path}, shape={self.shape}, dtype={self.dtype}, block={self.block_name!r})"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.x.dtype)

    @property
    def block_name(self) -> str:
        return self.attrs.get("block", {}).get("name", "")

    @property
    def ids(self) -> np.ndarray:
        return self.store.split(self.key.dataset, self.key.split).ids

    @property
    def labels(self) -> np.ndarray:
        return self.store.split(self.key.dataset, self.key.split).labels

    @property
    def class_names(self) -> list[str]:
        return self.store.split(self.key.dataset, self.key.split).class_names

    def _check_complete(self) -> None:
        missing = self.array.missing()
        if missing:
            raise DiffstoreError(f"{self.key.path} in {self.store.url} is incomplete ({len(missing)} of "
                                 f"{self.array.n_shards} shards missing): re-run the `diffstore extract` that wrote it")

    def numpy(self, dtype=None) -> np.ndarray:
        """All rows as a numpy array in the stored dtype (float16 by default), or in `dtype` (float32 is decoded
        straight into a float32 array: no float16 copy)."""
        self._check_complete()
        return self.array.read(dtype=dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.numpy(dtype)

    def to_torch(self, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
        """A CPU tensor (the stored dtype unless `dtype` is given)."""
        torch = require("torch")
        x = torch.from_numpy(self.numpy(np.float32 if dtype == torch.float32 else None))
        return x if dtype is None else x.to(dtype)

    def to_dask(self) -> "dask.array.Array":
        """A dask array with one chunk per shard: for features larger than memory."""
        self._check_complete()
        require("dask.array", "all")
        return self.array.to_dask()

    def to_xarray(self, lazy: bool = False) -> "xarray.DataArray":
        """A labelled DataArray: dims (sample, channel, y, x); coordinates sample (the ids), label and
        label_name per sample, channel, y, x; the key, block name and fingerprint in attrs. lazy=True keeps
        the data as dask."""
        xr = require("xarray", "xarray")
        data = self.to_dask() if lazy else self.numpy()
        split = self.store.split(self.key.dataset, self.key.split)
        n, c, h, w = self.shape
        names = np.asarray(split.class_names, dtype=object)
        coords = {"sample": split.ids, "label": ("sample", split.labels),
                  "label_name": ("sample", names[split.labels] if len(names) else split.labels.astype(str)),
                  "channel": np.arange(c), "y": np.arange(h), "x": np.arange(w)}
        attrs = {**self.key.to_dict(), "block_name": self.block_name, "fingerprint": self.attrs.get("fingerprint", ""),
                 "store": self.store.url, "path": self.key.path}
        return xr.DataArray(data, dims=("sample", "channel", "y", "x"), coords=coords, attrs=attrs,
                            name=f"t{self.key.t}_b{self.key.block}_p{self.key.pool}")


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
        if "block" in want:
            want["block"] = {int(b) for b in want["block"] if not (isinstance(b, str) and not b.isdigit())}
        if "t" in want:
            want["t"] = {int(t) for t in want["t"]}

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

    def features(self, key: FeatureKey | str | None = None, **selector: Any) -> Features:
        """The one feature array matching a FeatureKey, a store path, or a selector (as `keys`). When several
        match, the error lists the fields that tell them apart."""
        if isinstance(key, FeatureKey):
            return Features(self.store, self.store.features(key))
        if isinstance(key, str):
            return Features(self.store, self.store.features(FeatureKey.from_path(key)))
        found = self.keys(**selector)
        asked = ", ".join(f"{f}={v}" for f, v in selector.items()) or "(no selector)"
        if not found:
            raise DiffstoreError(f"no feature array in {self.url} matches {asked}; store.keys() lists them")
        if len(found) > 1:
            differ = {f: sorted({str(getattr(k, f)) for k in found}) for f in FIELDS}
            choices = "; ".join(f"{f}: {', '.join(v)}" for f, v in differ.items() if len(v) > 1)
            raise DiffstoreError(f"{len(found)} feature arrays in {self.url} match {asked}; pick one ({choices})")
        return Features(self.store, self.store.features(found[0]))

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


def open(url: str = DEFAULT_STORE, storage_options: dict | None = None) -> FeatureStore:  # noqa: A001 (ds.open)
    """Open an existing store (local path or fsspec URL such as s3://bucket/team.zarr) for reading."""
    return FeatureStore(Store.open(url, mode="r", storage_options=storage_options))


@contextlib.contextmanager
def _cluster(workers: int | None, scheduler: str | None):
    """A dask client when workers/scheduler is given, else None (everything in-process)."""
    if not (workers or scheduler):
        yield None
        return
    require("distributed", "dask")
    from .distributed import cluster_client

    with cluster_client(workers, scheduler) as client:
        yield client


def extract(store: str = DEFAULT_STORE, *, dataset: str = "digits", data_root: str | None = None,
            split: str | list[str] = "train,test", model: str = "default", model_name: str | None = None,
            random_init: int | None = None, adm_config: str | None = None, class_label: int | None = None,
            prompt: str = "", resolution: int | None = None, t: str | list[int] = "10,50,150,300",
            blocks: str | list = "all", pools: str | list = "1,2", input: str = "noised", noise_seed: int = 0,
            noise_draws: int = 1, batch_size: int = 64, device: str = "auto", dtype: str = "float16",
            compute_dtype: str = "float32", shard_rows: int | None = None, micro_batch: int | None = None,
            attention: str | None = None, compile: bool | None = None, loader_workers: int | None = None,
            skip_bad: bool = False,
            limit: int | None = None, workers: int | None = None, scheduler: str | None = None,
            show_progress: bool = True) -> list[dict]:
    """Run the U-Net once per (batch, t) and store every requested (t, block, pool) array; the same options
    and defaults as `diffstore extract`. Returns one summary per split: the arrays' paths, shards run and total.
    Keys already stored are skipped, so a re-run is a no-op."""
    from .datasets import load_split
    from .extract import extract_features, pick_device, plan_extraction
    from .models import load_model

    if limit is not None and limit < 1:  # before the store is opened (created) below
        raise DiffstoreError(f"limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise DiffstoreError(f"batch_size must be >= 1, got {batch_size}")
    m = load_model(model, name=model_name, random_init=random_init, adm_config=adm_config, class_label=class_label,
                   prompt=prompt, resolution=resolution).to(pick_device(device))
    s = Store.open(store)
    rows = []
    with _cluster(workers, scheduler) as client:  # one cluster (and one model load per worker) for all splits
        for sp in [x.strip() for x in as_spec(split).split(",") if x.strip()]:
            data = load_split(dataset, sp, data_root, skip_bad=skip_bad, limit=limit)
            plan = plan_extraction(s, m, data, as_spec(t), as_spec(blocks), as_spec(pools), input, noise_seed,
                                   noise_draws, compute_dtype, dtype, shard_rows, micro_batch, attention, compile)
            if client is not None:
                from .distributed import extract_distributed

                summary = extract_distributed(
                    plan, store, client=client, batch_size=batch_size, device=device, show_progress=show_progress,
                    model_spec=dict(spec=model, name=model_name, random_init=random_init, adm_config=adm_config,
                                    class_label=class_label, prompt=prompt, resolution=resolution),
                    data_spec=dict(name=dataset, split=sp, root=data_root, skip_bad=skip_bad, limit=limit))
            else:
                with s.undo_if_unstarted(plan.created):  # a failure before any shard is done leaves nothing behind
                    summary = extract_features(plan, batch_size=batch_size, show_progress=show_progress,
                                               workers=loader_workers)
            rows.append({"store": s.url, "dataset": dataset, "split": sp, "model": m.name, "rows": len(data),
                         "micro_batch": plan.recipe.micro_batch,
                         "arrays": [a.path for a in plan.arrays.values()],
                         "shards_run": summary["tasks_run"], "shards_total": summary["tasks_total"],
                         "status": "already stored" if summary["tasks_run"] == 0 else "extracted"})
    return rows


def probe(store: str = DEFAULT_STORE, **options: Any) -> dict:
    """Train heads on stored features, as `diffstore probe` (same options as keywords, same defaults:
    `help(diffstore.probe.stage.probe_command)`); returns {"results": [...], ...} without printing."""
    from .probe.stage import probe_command

    return probe_command(store, **options, echo=False)


def cka(store: str = DEFAULT_STORE, **options: Any) -> dict:
    """A CKA matrix between stored arrays, as `diffstore cka` (same options as keywords, same defaults:
    `help(diffstore.cka.stage.compute)`); returns the payload (matrix, rows, cols, estimator) without printing."""
    from .cka.stage import compute

    return compute(store, **options)


class StageModule(types.ModuleType):
    """The class of the stage packages diffstore.extract, diffstore.probe and diffstore.cka: calling the package
    runs the API function of the same name, so `ds.cka(...)` works while `import diffstore.cka.math` and
    `from diffstore.cka import stage` stay ordinary imports (a function named like a subpackage would be
    replaced by the subpackage as soon as it is imported)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return globals()[self.__name__.rpartition(".")[2]](*args, **kwargs)
