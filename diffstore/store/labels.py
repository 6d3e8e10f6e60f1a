"""What xarray needs to label a store: dimension names and coordinates (one source of names).

Format-2 stores are labelled on disk: `xr.open_datatree(url, engine="zarr")` opens the whole store, and a
feature group opens as a Dataset whose `x` has dims (sample, channel, height, width) with the sample ids and
labels as coordinates (`sample`, `label`) and the done flags as a coordinate on `shard`. (The spatial dims
are height/width, not y/x: xarray refuses a variable named like one of its own dimensions, and `x` is the
array's name in every store.) `to_xarray` gives the same labelled view of any array, format 1 included (its dims were d0..d2 and its
ids/labels had no dimension names, so only diffstore labels it).
"""

from __future__ import annotations

SAMPLE = "sample"
ROW_DIMS = {3: ("channel", "height", "width")}  # named dims of a row, by rank (others: d0, d1, ...)


def row_dims(rank: int, features: bool = True) -> tuple[str, ...]:
    """Names of a row's dims: (channel, height, width) for a feature map; d0, d1, ... otherwise (targets)."""
    return ROW_DIMS[rank] if features and rank in ROW_DIMS else tuple(f"d{i}" for i in range(rank))


def to_xarray(array, lazy: bool = True):
    """A labelled xarray.DataArray of a ShardedArray: dims (sample, *row dims), coordinates sample (ids) and
    label from the array's group (format 2) or, for a format-1 feature array, from its split's ids and labels.
    lazy: a dask array read shard by shard through the checked reader; else the rows in memory (checked too)."""
    import xarray as xr
    import zarr

    g, key, coords = array.group, array.key, {}
    if SAMPLE in g and "label" in g:
        coords = {SAMPLE: g[SAMPLE][:], "label": (SAMPLE, g["label"][:])}
    elif key is not None:  # format 1: the split's record
        split = zarr.open_group(g.store, mode="r").get(f"datasets/{key.dataset}/{key.split}")
        if split is not None:
            coords = {SAMPLE: split["ids"][:], "label": (SAMPLE, split["labels"][:])}
    attrs = {k: array.attrs[k] for k in ("fingerprint",) if k in array.attrs}
    dims = (SAMPLE, *row_dims(array.ndim - 1, features=key is not None))  # format 1 stored d0..d2 for features
    return xr.DataArray(array.to_dask() if lazy else array.read(), dims=dims,
                        coords=coords, name=array.path, attrs=attrs)
