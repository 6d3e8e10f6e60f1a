"""One sharded array of a store: rows [N, *row_shape] in shards, with per-shard done markers (see store.py).

Reads are checked (`read`, `x[a:b]` on the array itself, `to_dask`): every shard a read touches must be done,
pass its crc32c checksums and hold no NaN rows, or a DiffstoreError names the array, the shard and the command
that fixes it. `.x` is the raw zarr array, unchecked, for code that knows what it does (verify, repair).
"""

from __future__ import annotations

import asyncio
import posixpath
import time

import numpy as np
import zarr
from zarr.core.sync import sync

from ..errors import DiffstoreError
from ..key import FeatureKey
from .attrs import check_size, checked_layout
from .codec import name_of
from .provenance import iso
from .reader import Layout, Selection, ShardReader, ZarrShards, flags


class ShardedArray:
    """One feature (or target) array: rows [N, *row_shape] in shards, with per-shard done markers."""

    def __init__(self, group: zarr.Group, url: str = "", x: zarr.Array | None = None, done: zarr.Array | None = None,
                 mask: np.ndarray | None = None):
        """`x`, `done` and `mask` (the done flags): nodes already read (store.listing reads many concurrently)."""
        self.group = group
        self.url = url
        self.path = group.path
        self.attrs = dict(group.attrs)
        check_size(self.attrs, self.where)
        if "layout" in self.attrs:
            checked_layout(self.attrs["layout"], self.where)
        self.x = group["x"] if x is None else x
        self._done = group["done"] if done is None else done
        self._mask: np.ndarray | None = mask  # done flags as last read; re-read when a shard looks unfinished
        self._reader = None
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
    def codec(self) -> str:
        """The codec of its chunks (codec.py): as recorded at creation, else (older arrays) read from x."""
        return self.attrs.get("codec") or name_of(self.x)

    @property
    def key(self) -> FeatureKey | None:
        return FeatureKey.from_path(self.path) if self.path.startswith("features/") else None  # the path, not attrs

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
        self._mask = flags(self._done).astype(bool)
        return self._mask.copy()

    def is_done(self, i: int) -> bool:
        return bool(self._done[i])  # reads one chunk: the shard's own marker

    def stored_shards(self) -> set[int]:
        """Shards whose data object exists (done or not), from one listing of the array's chunk folder."""
        async def listing():
            return [k async for k in self.x.store_path.store.list_dir(f"{self.x.path}/c")]

        return {int(k.rstrip("/")) for k in sync(listing()) if k.rstrip("/").isdigit()}

    def missing(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.done_mask())]

    def done_rows(self) -> int:
        """Rows in done shards (a split fills shard by shard: --limit and --rows runs add rows)."""
        mask = self.done_mask()
        return int(sum(self.shard_slice(int(i)).stop - self.shard_slice(int(i)).start for i in np.flatnonzero(mask)))

    def done_prefix(self) -> int:
        """Rows [0, k) that are done: what `--limit k` can read."""
        mask = self.done_mask()
        first = int(np.argmin(mask)) if not mask.all() else len(mask)
        return min(first * self.shard_rows, self.n_rows)

    @property
    def complete(self) -> bool:
        return bool(self.done_mask().all())

    def require_done(self, rows: int | None = None) -> "ShardedArray":
        """The one refusal of an incomplete array: unless every shard holding rows [0, rows) (default: all) is
        done, a DiffstoreError names the array, the missing shards and the command that completes them."""
        n = self.n_rows if rows is None else min(rows, self.n_rows)
        missing = [i for i in self.missing() if i * self.shard_rows < n]
        if missing:
            shown = ", ".join(map(str, missing[:12])) + (", ..." if len(missing) > 12 else "")
            prefix = self.done_prefix()
            partial = f"\nRows 0-{prefix - 1} are done: --limit {prefix} reads them." if prefix else ""
            raise DiffstoreError(f"{self.where} is incomplete: {len(missing)} of {self.n_shards} shards are not done "
                                 f"({shown}). Complete it (done shards are skipped) with:\n  {self.extract_hint()}"
                                 + partial)
        return self

    def extract_hint(self, pools: str | None = None) -> str:
        """The command that writes (or completes) this array, from what its attrs recorded (text, never run)."""
        key = self.key
        if key is None:
            return "diffstore repfusion targets (the same options as the run that wrote them)"
        base, _, seed = key.model.partition(".random-init-s")
        spec = self.attrs.get("model", {}).get("source", {}).get("spec", base)
        source = self.attrs.get("dataset", {}).get("source", {})
        root, loader = source.get("root"), source.get("loader")
        dataset = f"--dataset {loader} --dataset-name {key.dataset}" if loader else f"--dataset {key.dataset}"
        return " ".join(["diffstore extract", f"--store {self.url or 'STORE'}", dataset,
                         *([f"--data-root {root}"] if root else []), f"--split {key.split}", f"--model {spec}",
                         f"--model-name {base}", *([f"--random-init {seed}"] if seed else []), f"--input {key.input}",
                         f"--t {key.t}", f"--blocks {key.block}", f"--pools {pools or key.pool}"])

    # --- writes -----------------------------------------------------------------------------------
    def write_shard(self, i: int, data: np.ndarray) -> bool:
        """Write shard i whole, then mark it done; False (nothing written) when it is done already, e.g. finished
        by another writer. The shard's object is replaced atomically (local rename, S3 PUT)."""
        if self.is_done(i):
            return False
        sl = self.shard_slice(i)
        if data.shape != (sl.stop - sl.start, *self.x.shape[1:]):
            raise ValueError(f"shard {i} of {self.path} needs shape "
                             f"{(sl.stop - sl.start, *self.x.shape[1:])}, got {data.shape}")
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
    def read(self, rows=slice(None), dtype=None) -> np.ndarray:
        """Rows (a slice, an int or an index array) in `dtype` (default: the stored one; float32 is decoded
        straight into a float32 output), checked: every shard touched is done, passes its crc32c checksums and
        holds no NaN rows; otherwise a DiffstoreError naming array, shard and fix. See reader.py."""
        sel = Selection(rows, self.n_rows)
        sr = self.shard_rows
        shards = (range(sel.start // sr, -(-sel.stop // sr)) if sel.index is None
                  else np.unique(sel.index // sr).tolist())
        out = np.empty((sel.size, *self.shape[1:]), np.dtype(dtype or self.dtype))
        if len(shards):
            self._check_done(np.asarray(shards))
            self._raise_first(self.reader().run(list(shards), sel, out))
        return out[0] if sel.scalar else out

    def reader(self):
        """The shard reader of this array's layout (zarr's own for layouts diffstore does not decode)."""
        if self._reader is None:
            layout = Layout.of(self.x)
            self._reader = ShardReader(self.x, layout, self.n_rows) if layout else ZarrShards(self.x, self.n_rows)
        return self._reader

    def _raise_first(self, problems: dict[int, str]) -> None:
        if problems:
            first = min(problems)
            raise self.error(first, problems[first])

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

    def problems(self, shards: list[int]) -> dict[int, str]:
        """{shard: what is wrong with its data} for done shards (decodes, checksums match, no NaN row), read
        concurrently and checked without keeping the rows."""
        return self.reader().run([int(i) for i in shards], None, None)

    def shard_error(self, i: int) -> str | None:
        """What is wrong with done shard i's data (None: it decodes, checksums match, no NaN row)."""
        return self.problems([i]).get(i)

    def error(self, shard: int, what: str) -> DiffstoreError:
        sl = self.shard_slice(shard)
        return DiffstoreError(f"{self.where}: shard {shard} (rows {sl.start}-{sl.stop - 1}) {what}. "
                              f"Nothing was computed from it. Fix it with: {self.fix_command}")

    def to_dask(self):
        """A dask array with one block per shard, each read through the checks of `read`."""
        import dask.array as da

        return da.from_array(self, chunks=(self.shard_rows, *self.x.shape[1:]), asarray=True, lock=False,
                             name=f"diffstore-{self.url}-{self.path}-{self.attrs.get('fingerprint', '')}")

    def to_xarray(self, lazy: bool = True, rows: int | None = None, attrs: dict | None = None):
        """A labelled xarray.DataArray (dims, sample ids, labels, class names): see labels.to_xarray."""
        from .labels import to_xarray

        return to_xarray(self, lazy, rows, attrs)

    def nbytes_stored(self) -> int:
        return int(self.x.nbytes_stored()) + int(self._done.nbytes_stored())


def done_masks(arrays: dict) -> dict:
    """{key: bool [n_shards]} for `arrays` (key -> ShardedArray) from one concurrent listing of their done
    flags' directories, not one read per (array, shard): a done flag's chunk is stored only once it is set
    (its fill value 0 is never written), so a re-run of a finished extraction costs one round of listings."""
    if not arrays:
        return {}
    some = next(iter(arrays.values()))
    chunk_key = some.group["done"].metadata.encode_chunk_key  # every done array is made by Store.create alike
    folder = posixpath.dirname(chunk_key((0,)))  # "c"

    async def listing(a):
        return {k async for k in a.group.store.list_dir(f"{a.path}/done/{folder}")}

    async def every():
        return await asyncio.gather(*(listing(a) for a in arrays.values()))

    present = dict(zip(arrays, sync(every())))
    return {k: np.array([posixpath.basename(chunk_key((i,))) in present[k] for i in range(a.n_shards)])
            for k, a in arrays.items()}
