"""One sharded array of a store: rows [N, *row_shape] in shards, with per-shard done markers (see store.py)."""

from __future__ import annotations

import numpy as np
import zarr

from ..errors import DiffstoreError
from ..key import FeatureKey


class ShardedArray:
    """One feature (or target) array: rows [N, *row_shape] in shards, with per-shard done markers."""

    def __init__(self, group: zarr.Group):
        self.group = group
        self.path = group.path
        self.attrs = dict(group.attrs)
        self.x = group["x"]
        self._done = group["done"]

    @property
    def shape(self) -> tuple:
        return self.x.shape

    @property
    def n_rows(self) -> int:
        return self.x.shape[0]

    @property
    def shard_rows(self) -> int:
        return self.x.shards[0]

    @property
    def n_shards(self) -> int:
        return self._done.shape[0]

    @property
    def key(self) -> FeatureKey | None:
        return FeatureKey(**self.attrs["key"]) if self.path.startswith("features/") else None

    def shard_slice(self, i: int) -> slice:
        return slice(i * self.shard_rows, min((i + 1) * self.shard_rows, self.n_rows))

    def done_mask(self) -> np.ndarray:
        return self._done[:].astype(bool)

    def is_done(self, i: int) -> bool:
        return bool(self._done[i])  # reads one chunk: the shard's own marker

    def missing(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.done_mask())]

    @property
    def complete(self) -> bool:
        return bool(self.done_mask().all())

    def write_shard(self, i: int, data: np.ndarray) -> None:
        """Write shard i whole, then mark it done. A done shard is never rewritten."""
        if self.is_done(i):
            raise DiffstoreError(f"shard {i} of {self.path} is already done; refusing to rewrite it")
        sl = self.shard_slice(i)
        if data.shape != (sl.stop - sl.start, *self.x.shape[1:]):
            raise ValueError(f"shard {i} of {self.path} needs shape {(sl.stop - sl.start, *self.x.shape[1:])}, got {data.shape}")
        self.x[sl] = data.astype(self.x.dtype, copy=False)
        self._done[i] = 1  # after the data write returned: the store holds the shard's object

    def read(self, rows=slice(None)) -> np.ndarray:
        return self.x[rows]

    def to_dask(self):
        import dask.array as da

        return da.from_zarr(self.x, chunks=(self.shard_rows, *self.x.shape[1:]))

    def nbytes_stored(self) -> int:
        return int(self.x.nbytes_stored()) + int(self._done.nbytes_stored())
