"""One sharded array of a store: rows [N, *row_shape] in shards, with per-shard done markers (see store.py).

Reads are checked (`read`, `x[a:b]` on the array itself, `to_dask`): every shard a read touches must be done,
pass its crc32c checksums and hold no NaN rows, or a DiffstoreError names the array, the shard and the command
that fixes it. `.x` is the raw zarr array, unchecked, for code that knows what it does (verify, repair).
"""

from __future__ import annotations

import time

import numpy as np
import zarr
from zarr.core.sync import sync

from ..errors import DiffstoreError
from ..key import FeatureKey
from .provenance import iso


class ShardedArray:
    """One feature (or target) array: rows [N, *row_shape] in shards, with per-shard done markers."""

    def __init__(self, group: zarr.Group, url: str = "", x: zarr.Array | None = None, done: zarr.Array | None = None,
                 mask: np.ndarray | None = None):
        """`x`, `done` and `mask` (the done flags): nodes already read (store.listing reads many concurrently)."""
        self.group = group
        self.url = url
        self.path = group.path
        self.attrs = dict(group.attrs)
        self.x = group["x"] if x is None else x
        self._done = group["done"] if done is None else done
        self._mask: np.ndarray | None = mask  # done flags as last read; re-read when a shard looks unfinished
        self.check_layout()

    # --- shape ------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return self.x.shape

    @property
    def dtype(self):
        return self.x.dtype

    @property
    def ndim(self) -> int:
        return self.x.ndim

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

    def check_layout(self) -> None:
        """The arrays' zarr.json agree with the layout recorded at creation (a hand-edited shape is refused)."""
        want = self.attrs.get("layout")  # format 2; format-1 arrays carry only the x/done consistency
        have = {"n_rows": self.n_rows, "row_shape": list(self.shape[1:]), "shard_rows": self.shard_rows,
                "dtype": str(self.dtype)}
        wrong = [f"{k}: stored {have[k]!r}, expected {want[k]!r}" for k in want or {} if have.get(k) != want[k]]
        if self.n_shards != -(-self.n_rows // self.shard_rows):
            wrong.append(f"done has {self.n_shards} flags for {-(-self.n_rows // self.shard_rows)} shards")
        if wrong:
            raise DiffstoreError(f"{self.where}/x/zarr.json does not match the array's layout ({'; '.join(wrong)}). "
                                 f"Fix it with: {self.fix_command}")

    @property
    def where(self) -> str:
        return f"{self.url.rstrip('/')}/{self.path}" if self.url else self.path

    @property
    def fix_command(self) -> str:
        return f"diffstore repair --store {self.url or 'STORE'} {self.path}"

    # --- done flags -------------------------------------------------------------------------------
    def shard_slice(self, i: int) -> slice:
        return slice(i * self.shard_rows, min((i + 1) * self.shard_rows, self.n_rows))

    def done_mask(self) -> np.ndarray:
        self._mask = self._done[:].astype(bool)
        return self._mask.copy()

    def is_done(self, i: int) -> bool:
        return bool(self._done[i])  # reads one chunk: the shard's own marker

    def missing(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.done_mask())]

    @property
    def complete(self) -> bool:
        return bool(self.done_mask().all())

    # --- writes -----------------------------------------------------------------------------------
    def write_shard(self, i: int, data: np.ndarray) -> bool:
        """Write shard i whole, then mark it done; False (nothing written) when it is done already, e.g. finished
        by another writer. The shard's object is replaced atomically (local rename, S3 PUT)."""
        if self.is_done(i):
            return False
        sl = self.shard_slice(i)
        if data.shape != (sl.stop - sl.start, *self.x.shape[1:]):
            raise ValueError(f"shard {i} of {self.path} needs shape {(sl.stop - sl.start, *self.x.shape[1:])}, got {data.shape}")
        self.x[sl] = data.astype(self.x.dtype, copy=False)
        self._done[i] = 1  # after the data write returned: the store holds the shard's object
        if self._mask is None:
            self.done_mask()
        self._mask[i] = True
        if self._mask.all() and self.done_mask().all():  # this process completed the array: its end time
            recorded = self.attrs.get("provenance")
            recorded = recorded if isinstance(recorded, dict) else {}
            self.attrs["provenance"] = {**recorded, "finished": iso(time.time())}
            self.group.attrs["provenance"] = self.attrs["provenance"]
        return True

    def invalidate(self, shards: list[int]) -> None:
        """Clear the done flags of `shards`, then delete their objects (repair rewrites them from scratch)."""
        for i in shards:
            self._done[i] = 0
            index = "/".join([str(i)] + ["0"] * (self.x.ndim - 1))
            sync(self.x.store_path.store.delete(f"{self.x.path}/c/{index}"))
        self._mask = None

    # --- checked reads ----------------------------------------------------------------------------
    def read(self, rows=slice(None)) -> np.ndarray:
        """Rows (a slice, an int or an index array), checked: every shard touched is done, passes its crc32c
        checksums and holds no NaN rows; otherwise a DiffstoreError naming array, shard and fix."""
        index = np.arange(self.n_rows)[rows]
        shards = np.unique(np.atleast_1d(index) // self.shard_rows)
        self._check_done(shards)
        try:
            data = self.x[rows]
        except Exception as e:  # zarr: checksum mismatch, truncated or undecodable shard
            bad = next((int(i) for i in shards if self.shard_error(int(i))), int(shards[0]))
            raise self.error(bad, f"fails its checksum or cannot be decoded ({type(e).__name__}: {e})") from None
        if data.dtype.kind == "f":
            nan = np.isnan(data.reshape(np.atleast_1d(index).size, -1)).any(axis=1)
            if nan.any():
                raise self.error(int(np.atleast_1d(index)[np.argmax(nan)] // self.shard_rows),
                                 "is marked done but holds NaN rows (its data is missing)")
        return data

    def __getitem__(self, rows) -> np.ndarray:
        """x[a:b] with the checks of `read` (so cka and dask can take the array itself)."""
        if not isinstance(rows, tuple):
            return self.read(rows)
        first, rest = rows[0], rows[1:]
        scalar = not isinstance(first, slice) and np.ndim(first) == 0  # an int row drops the sample axis
        return self.read(first)[rest if scalar else (slice(None), *rest)]

    def _check_done(self, shards: np.ndarray) -> None:
        if self._mask is None or not self._mask[shards].all():
            self.done_mask()
        undone = [int(i) for i in shards if not self._mask[i]]
        if undone:
            raise self.error(undone[0], f"is not done (the array is incomplete: {int((~self._mask).sum())} of "
                                        f"{self.n_shards} shards missing)")

    def shard_error(self, i: int) -> str | None:
        """What is wrong with done shard i's data (None: it decodes, checksums match, no NaN row)."""
        try:
            data = self.x[self.shard_slice(i)]
        except Exception as e:
            return f"fails its checksum or cannot be decoded ({type(e).__name__}: {e})"
        if data.dtype.kind == "f" and np.isnan(data).any():
            return "is marked done but holds NaN rows (its data is missing)"
        return None

    def error(self, shard: int, what: str) -> DiffstoreError:
        sl = self.shard_slice(shard)
        return DiffstoreError(f"{self.where}: shard {shard} (rows {sl.start}-{sl.stop - 1}) {what}. "
                              f"Nothing was computed from it. Fix it with: {self.fix_command}")

    def to_dask(self):
        """A dask array with one block per shard, each read through the checks of `read`."""
        import dask.array as da

        return da.from_array(self, chunks=(self.shard_rows, *self.x.shape[1:]), asarray=True, lock=False,
                             name=f"diffstore-{self.url}-{self.path}-{self.attrs.get('fingerprint', '')}")

    def to_xarray(self, lazy: bool = True):
        """A labelled xarray.DataArray (dims, sample ids and labels): see labels.to_xarray."""
        from .labels import to_xarray

        return to_xarray(self, lazy)

    def nbytes_stored(self) -> int:
        return int(self.x.nbytes_stored()) + int(self._done.nbytes_stored())
