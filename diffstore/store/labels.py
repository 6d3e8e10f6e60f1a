"""What xarray needs to label a store: dimension names and coordinates (one source of names).

Format-2 stores are labelled on disk: `xr.open_datatree(url, engine="zarr")` opens the whole store, and a
feature group opens as a Dataset whose `x` has dims (sample, channel, height, width) with the sample ids, labels
and class names as coordinates (`sample`, `label`, `label_name`; arrays written before label_name was stored lack
it on disk, `to_xarray` adds it) and the done flags as a coordinate on `shard`. (The spatial dims
are height/width, not y/x: xarray refuses a variable named like one of its own dimensions, and `x` is the
array's name in every store.) `to_xarray` gives the same labelled view of any array, format 1 included (its dims
were d0..d2 and its ids/labels had no dimension names, so only diffstore labels it).
"""

from __future__ import annotations

SAMPLE = "sample"
ROW_DIMS = {3: ("channel", "height", "width")}  # named dims of a row, by rank (others: d0, d1, ...)


def row_dims(rank: int, features: bool = True) -> tuple[str, ...]:
    """Names of a row's dims: (channel, height, width) for a feature map; d0, d1, ... otherwise (targets)."""
    return ROW_DIMS[rank] if features and rank in ROW_DIMS else tuple(f"d{i}" for i in range(rank))


def label_names(labels, class_names: list[str]):
    """Each sample's class name (its label as text when the split has no class names)."""
    import numpy as np

    labels = np.asarray(labels)
    names = np.asarray([str(c) for c in class_names]) if len(class_names) else None
    return names[labels] if names is not None and len(labels) and labels.max() < len(names) else labels.astype(str)


def to_xarray(array, lazy: bool = True, rows: int | None = None, attrs: dict | None = None):
    """A labelled xarray.DataArray of a ShardedArray: the view `xr.open_datatree` gives of a format-2 store (dims
    (sample, *row dims); coordinates sample, label and label_name), for any array: format 1 is labelled from its
    split's record. rows: only the first `rows` (their shards must be done). lazy: a dask array read shard by
    shard through the checked reader; else the rows in memory (checked too)."""
    import xarray as xr
    import zarr

    n = array.n_rows if rows is None else rows
    g, key, coords = array.group, array.key, {}
    if SAMPLE in g and "label" in g:
        ids, labels, names = g[SAMPLE][:n], g["label"][:n], g["label"].attrs.get("class_names", [])
    else:  # format 1: the split's record
        split = zarr.open_group(g.store, mode="r").get(f"datasets/{key.dataset}/{key.split}") if key else None
        ids, labels = (split["ids"][:n], split["labels"][:n]) if split is not None else (None, None)
        names = split.attrs.get("class_names", []) if split is not None else []
    if ids is not None:
        text = g["label_name"][:n] if "label_name" in g else label_names(labels, names)
        coords = {SAMPLE: ids, "label": (SAMPLE, labels), "label_name": (SAMPLE, text)}
    array.require_done(n)
    data = array.to_dask()[:n] if lazy else array.read(slice(0, n))
    dims = (SAMPLE, *row_dims(array.ndim - 1, features=key is not None))  # format 1 stored d0..d2 for features
    return xr.DataArray(data, dims=dims, coords=coords, name=array.path,
                        attrs={"fingerprint": array.attrs.get("fingerprint", ""), **(attrs or {})})
