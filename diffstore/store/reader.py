"""Checked reads at the speed of the storage: a key's shard objects fetched concurrently and decoded straight into
one preallocated output.

A shard object (zarr's sharding codec) holds its inner chunks, each `payload | crc32c`, and an index of (offset,
length) per chunk with its own crc32c. A read fetches every shard it touches whole (or, when it needs only some
of a shard's chunks, the index and the span of those chunks), checks each crc32c, decompresses each chunk into its
place in the output (through a per-thread scratch when only some of its rows are wanted or the output is float32)
and checks it for NaN while its bytes are in cache. Shards are decoded by a pool of threads (the checksum and the
decompressors release the GIL); local files are read by the same threads, an fsspec store's objects (S3) by at
most IO_CONCURRENCY GETs in flight, each decoded as soon as it arrives.

Arrays laid out otherwise (another codec chain, another shard index) are read by zarr itself, with the same checks.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import crc32c
import numpy as np
import zarr
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .codec import payload_decoder

DEFAULT_THREADS = min(8, os.cpu_count() or 1)  # decode threads (CPU-bound: more than the cores only adds switching)
DEFAULT_IO = 16  # GETs in flight on a remote store (each holds one raw shard in memory until decoded)
THREADS, IO_CONCURRENCY = DEFAULT_THREADS, DEFAULT_IO
EMPTY = 2**64 - 1  # a shard index entry of a chunk never written
KEEP = 16 << 20  # largest scratch buffer a decode thread keeps between reads
PARALLEL_BYTES = 1 << 20  # shards of at least this many raw bytes are decoded by several threads
PIECE = 1 << 15  # float16 -> float32 widening runs in pieces of torch's grain size: inline, on the calling thread

_pool: ThreadPoolExecutor | None = None
_local = threading.local()  # per-thread scratch: raw object bytes, one decoded chunk


class Bad(Exception):
    """What is wrong with a shard, in the words of ShardedArray.error."""


MISSING = "is marked done but holds NaN rows (its data is missing)"


def pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(THREADS, thread_name_prefix="diffstore-read")
    return _pool


def set_concurrency(threads: int | None = None, io: int | None = None) -> None:
    """Decode threads and remote GETs in flight for the reads that follow (bench_read.py's concurrency table)."""
    global THREADS, IO_CONCURRENCY, _pool
    if threads is not None and threads != THREADS:
        if _pool is not None:
            _pool.shutdown(wait=False)  # its running tasks finish
        THREADS, _pool = threads, None
    IO_CONCURRENCY = io or IO_CONCURRENCY


def scratch(name: str, nbytes: int) -> np.ndarray:
    """This thread's reusable buffer `name` of nbytes (uint8); above KEEP bytes a new one, not kept."""
    if nbytes > KEEP:
        return np.empty(nbytes, np.uint8)
    buf = getattr(_local, name, None)
    if buf is None or buf.nbytes < nbytes:
        buf = np.empty(max(nbytes, 1), np.uint8)
        setattr(_local, name, buf)
    return buf[:nbytes]


def flags(done: zarr.Array) -> np.ndarray:
    """The elements of a 1-d uint8 array of one-element chunks (the done flags), read file by file on a local store
    (zarr's own read costs ~80 us an element); by zarr elsewhere, or when a file is not the one byte expected."""
    store = done.store_path.store
    plain = done.chunks == (1,) and done.dtype == np.uint8 and list(done.metadata.to_dict()["codecs"]) == [
        {"name": "bytes"}]
    if not (plain and isinstance(store, zarr.storage.LocalStore)):
        return done[:]
    folder, key = os.path.join(store.root, done.store_path.path), done.metadata.encode_chunk_key
    out = np.full(done.shape, done.fill_value, np.uint8)
    for i in range(len(out)):
        try:
            fd = os.open(os.path.join(folder, key((i,))), os.O_RDONLY)
        except FileNotFoundError:
            continue
        byte = os.read(fd, 2)
        os.close(fd)
        if len(byte) != 1:
            return done[:]  # zarr names what is wrong with it
        out[i] = byte[0]
    return out


class Layout:
    """How to decode one array's shards without zarr, for what diffstore writes (bytes, one known compressor or
    none, crc32c per chunk; the index as bytes + crc32c). `of` gives None for anything else."""

    def __init__(self, x: zarr.Array, chunk_rows: int, index_at_end: bool, decode: Callable | None):
        self.shard_rows, self.chunk_rows, self.row_shape = x.shards[0], chunk_rows, tuple(x.shape[1:])
        self.dtype, self.index_at_end, self.decode = np.dtype(x.dtype), index_at_end, decode  # decode(payload, dst)
        self.chunks = self.shard_rows // chunk_rows  # per shard
        self.chunk_shape = (chunk_rows, *self.row_shape)
        self.chunk_nbytes = int(np.prod(self.chunk_shape)) * self.dtype.itemsize
        self.index_nbytes = 16 * self.chunks + 4

    @classmethod
    def of(cls, x: zarr.Array) -> "Layout | None":
        codecs = x.metadata.to_dict().get("codecs", ())
        if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
            return None
        conf = codecs[0]["configuration"]
        inner, index, chunk = list(conf["codecs"]), list(conf["index_codecs"]), tuple(conf["chunk_shape"])
        little = {"name": "bytes", "configuration": {"endian": "little"}}
        plain = inner[:1] in ([little], [{"name": "bytes"}], [{"name": "bytes", "configuration": {}}])
        if not (plain and 2 <= len(inner) <= 3 and inner[-1] == {"name": "crc32c"}
                and index == [little, {"name": "crc32c"}] and chunk[1:] == tuple(x.shape[1:])
                and x.shards[0] % chunk[0] == 0 and x.dtype.byteorder in "<=|"):
            return None
        try:
            decode = payload_decoder(inner[1] if len(inner) == 3 else None)
        except KeyError:
            return None
        return cls(x, chunk[0], conf["index_location"] == "end", decode)


class Selection:
    """The rows a read returns, in order: a contiguous range, or an index array (numpy's indexing semantics)."""

    def __init__(self, rows, n: int):
        self.scalar = np.ndim(rows) == 0 and not isinstance(rows, slice)
        if isinstance(rows, slice) and rows.step in (None, 1):
            start, stop, _ = rows.indices(n)
            self.start, self.stop, self.index = start, max(start, stop), None
        else:
            self.index = np.atleast_1d(np.arange(n)[rows])  # raises IndexError as numpy does
        self.size = self.stop - self.start if self.index is None else len(self.index)

    def chunks(self, chunk_rows: int) -> dict[int, tuple]:
        """{global chunk id: (output positions, rows within the chunk)}, each a slice when contiguous."""
        if self.index is None:
            out = {}
            for c in range(self.start // chunk_rows, -(-self.stop // chunk_rows)):
                lo, hi = max(self.start, c * chunk_rows), min(self.stop, (c + 1) * chunk_rows)
                out[c] = (slice(lo - self.start, hi - self.start), slice(lo - c * chunk_rows, hi - c * chunk_rows))
            return out
        ids = self.index // chunk_rows
        order = np.argsort(ids, kind="stable")
        cuts = np.flatnonzero(np.diff(ids[order])) + 1
        return {int(ids[g[0]]): (as_slice(g), as_slice(self.index[g] - ids[g[0]] * chunk_rows))
                for g in np.split(order, cuts) if len(g)}


def as_slice(a: np.ndarray):
    """a as a slice when it is a run of consecutive integers (a cheap view instead of a gather), else a itself."""
    run = a[-1] - a[0] == len(a) - 1 and (len(a) < 2 or bool((np.diff(a) == 1).all()))
    return slice(int(a[0]), int(a[-1]) + 1) if run else a


def widen(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src; float16 -> float32 through torch's vectorised cast (numpy's runs at ~0.4 GB/s)."""
    if dst.dtype == src.dtype:
        np.copyto(dst, src)
    elif src.dtype == np.float16 and dst.dtype == np.float32 and dst.flags.c_contiguous and src.flags.c_contiguous:
        try:
            import torch
        except ImportError:  # a reader without torch (README: reading needs no torch) takes numpy's cast
            np.copyto(dst, src)
            return
        d, s = torch.from_numpy(dst.reshape(-1)), torch.from_numpy(src.reshape(-1))
        for i in range(0, len(s), PIECE):
            d[i:i + PIECE].copy_(s[i:i + PIECE])
    else:
        np.copyto(dst, src, casting="unsafe")


def put(out: np.ndarray, where, chunk: np.ndarray, rows) -> None:
    """out[where] = chunk[rows] in out's dtype."""
    src = chunk[rows]
    if isinstance(where, slice):
        widen(out[where], np.ascontiguousarray(src))
    elif out.dtype == src.dtype:
        out[where] = src
    else:
        tmp = np.empty(src.shape, out.dtype)
        widen(tmp, np.ascontiguousarray(src))
        out[where] = tmp


ABS_INF = {2: (0x7FFF, 0x7C00), 4: (0x7FFF_FFFF, 0x7F80_0000), 8: (2**63 - 1, 0x7FF0 << 48)}  # per float width


def has_nan(x: np.ndarray) -> bool:
    """Any NaN in a float array, on its bits: |x| above infinity's pattern (~10x numpy's isnan on float16)."""
    if x.dtype.kind != "f" or x.size == 0:
        return False
    bits = np.ascontiguousarray(x).reshape(-1).view(f"u{x.itemsize}")
    magnitude, inf = ABS_INF[x.itemsize]
    tmp = scratch("nan", bits.nbytes).view(bits.dtype)
    return bool(np.bitwise_and(bits, bits.dtype.type(magnitude), out=tmp).max() > inf)


class ShardReader:
    """Reads (and checks) shards of one array into an output, per the Layout; see the module docstring."""

    def __init__(self, x: zarr.Array, layout: Layout, n_rows: int):
        self.layout, self.n_rows = layout, n_rows
        self.store, path = x.store_path.store, x.store_path.path
        # shard i's key, "{path}/c/{i}/0/0/0" in the default encoding: the key of a marker index, cut around it
        head, tail = x.metadata.encode_chunk_key((987654321,) + (0,) * (x.ndim - 1)).split("987654321")
        self.key = lambda i: f"{path}/{head}{i}{tail}"
        root = getattr(self.store, "root", None)
        self.local = root if isinstance(self.store, zarr.storage.LocalStore) else None

    def run(self, shards: list[int], sel: Selection | None, out: np.ndarray | None) -> dict[int, str]:
        """Decode `shards` (the rows of sel into out, or only check them when out is None): {shard: problem}."""
        lay = self.layout
        wanted = sel.chunks(lay.chunk_rows) if sel is not None else {}
        tasks = []
        for i in shards:
            ids = range(i * lay.chunks, min((i + 1) * lay.chunks, -(-self.n_rows // lay.chunk_rows)))
            plan = {c: wanted.get(c) for c in ids if sel is None or c in wanted}
            tasks.append((i, plan, len(plan) == len(ids)))
        if self.local is None:
            found = sync(self._remote(tasks, out))
        else:
            # Threads pay only when the GIL-free work (read, checksum, decompress, copy) outweighs a shard's ~30 us
            # of Python: on big shards. Each thread takes every k-th shard (one future per thread, not per shard).
            k = min(THREADS, len(tasks)) if lay.chunk_nbytes * lay.chunks >= PARALLEL_BYTES else 1
            every = lambda j: [self._local_task(t, out) for t in tasks[j::k]]  # noqa: E731
            parts = list(pool().map(every, range(k))) if k > 1 else [every(0)]
            found = [parts[n % k][n // k] for n in range(len(tasks))]
        return {i: what for i, what in zip(shards, found) if what}

    # --- fetching ---------------------------------------------------------------------------------
    def _span(self, index: np.ndarray, plan: dict, i: int) -> tuple[int, int]:
        """Byte range [start, stop) of the object holding every chunk of the plan that was written."""
        entries = [index[c - i * self.layout.chunks] for c in plan]
        written = [(int(o), int(o + n)) for o, n in entries if o != EMPTY]
        return (min(s for s, _ in written), max(e for _, e in written)) if written else (0, 0)

    def _local_task(self, task, out) -> str | None:
        i, plan, whole = task
        path = f"{self.local}/{self.key(i)}"
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return MISSING
        try:
            size = os.fstat(fd).st_size
            if whole:
                raw = scratch("raw", size)
                got = os.readv(fd, [raw])
                self.decode(i, plan, raw[:got], 0, got, None, out)
                return None
            index = self.index_of(os.pread(fd, self.layout.index_nbytes, max(0, self.index_offset(size))))
            lo, hi = self._span(index, plan, i)
            self.decode(i, plan, np.frombuffer(os.pread(fd, hi - lo, lo), np.uint8), lo, size, index, out)
            return None
        except Bad as e:
            return str(e)
        finally:
            os.close(fd)

    async def _remote(self, tasks, out) -> list[str | None]:
        limit, loop, proto = asyncio.Semaphore(IO_CONCURRENCY), asyncio.get_running_loop(), default_buffer_prototype()

        async def get(key, byte_range=None):
            buf = await self.store.get(key, proto, byte_range)
            return None if buf is None else buf.as_numpy_array().view(np.uint8).reshape(-1)

        async def one(task):
            i, plan, whole = task
            async with limit:  # held until decoded: at most IO_CONCURRENCY raw shards in memory
                try:
                    if whole:
                        raw = await get(self.key(i))
                        if raw is None:
                            return MISSING
                        return await loop.run_in_executor(pool(), self._guarded, i, plan, raw, 0, len(raw), None, out)
                    nbytes = self.layout.index_nbytes
                    tail = await get(self.key(i), SuffixByteRequest(nbytes) if self.layout.index_at_end
                                     else RangeByteRequest(0, nbytes))
                    if tail is None:
                        return MISSING
                    index = self.index_of(tail.tobytes())
                    lo, hi = self._span(index, plan, i)
                    raw = await get(self.key(i), RangeByteRequest(lo, hi)) if hi > lo else np.empty(0, np.uint8)
                    return await loop.run_in_executor(pool(), self._guarded, i, plan, raw, lo, None, index, out)
                except Bad as e:
                    return str(e)

        return await asyncio.gather(*(one(t) for t in tasks))

    def _guarded(self, *args) -> str | None:
        try:
            self.decode(*args)
        except Bad as e:
            return str(e)
        return None

    # --- decoding ---------------------------------------------------------------------------------
    def index_offset(self, size: int) -> int:
        return size - self.layout.index_nbytes if self.layout.index_at_end else 0

    def index_of(self, raw: bytes) -> np.ndarray:
        """The shard index [chunks, 2] (offset, length), its crc32c checked."""
        if len(raw) != self.layout.index_nbytes:
            raise Bad(f"fails its checksum or cannot be decoded (its index needs {self.layout.index_nbytes} bytes, "
                      f"the object has {len(raw)})")
        check(raw[:-4], raw[-4:], "its index")
        return np.frombuffer(raw[:-4], "<u8").reshape(-1, 2)

    def decode(self, i: int, plan: dict, raw: np.ndarray, base: int, size: int | None, index, out) -> None:
        """Check and decode the chunks of `plan` from `raw` (object bytes from offset `base`; `size`: the object's,
        when raw is all of it) into out (None: check only); raises Bad naming what is wrong."""
        lay = self.layout
        try:
            if index is None:
                start = max(0, self.index_offset(size))
                index = self.index_of(raw[start:start + lay.index_nbytes].tobytes())
            entries = index.tolist()
            for c, place in plan.items():
                j = c - i * lay.chunks
                offset, n = entries[j]
                if offset == EMPTY:
                    raise Bad(MISSING)
                if n < 4 or offset < base or offset - base + n > len(raw):
                    raise Bad(f"fails its checksum or cannot be decoded (chunk {j} lies outside the object)")
                src = raw[offset - base:offset - base + n]
                check(src[:-4], src[-4:], f"chunk {j}")
                valid = min(lay.chunk_rows, self.n_rows - c * lay.chunk_rows)
                direct = (place is not None and valid == lay.chunk_rows and out.dtype == lay.dtype
                          and isinstance(place[0], slice) and isinstance(place[1], slice)
                          and place[1] == slice(0, lay.chunk_rows))
                dst = out[place[0]] if direct else scratch("chunk", lay.chunk_nbytes).view(lay.dtype)
                dst = dst.reshape(lay.chunk_shape)
                if lay.decode is not None:
                    lay.decode(src[:-4], dst)
                elif n - 4 == lay.chunk_nbytes:
                    dst.reshape(-1).view(np.uint8)[:] = src[:-4]
                else:
                    raise Bad(f"fails its checksum or cannot be decoded (chunk {j} holds {n - 4} bytes, not "
                              f"{lay.chunk_nbytes})")
                if has_nan(dst[:valid]):
                    raise Bad(MISSING)
                if place is not None and not direct:
                    put(out, place[0], dst, place[1])
        except Bad:
            raise
        except Exception as e:  # noqa: BLE001 - a decompressor refusing its input: a corrupt chunk
            raise Bad(f"fails its checksum or cannot be decoded ({type(e).__name__}: {e})") from None


class ZarrShards:
    """The same reads and checks through zarr itself, shard by shard: for layouts ShardReader does not decode."""

    def __init__(self, x: zarr.Array, n_rows: int):
        self.x, self.n_rows = x, n_rows

    def run(self, shards: list[int], sel: Selection | None, out: np.ndarray | None) -> dict[int, str]:
        rows = self.x.shards[0]
        wanted, problems = sel.chunks(rows) if sel is not None else {}, {}
        for i in shards:
            try:
                data = self.x[i * rows:min((i + 1) * rows, self.n_rows)]
            except Exception as e:  # noqa: BLE001 - zarr: checksum mismatch, truncated or undecodable shard
                problems[i] = f"fails its checksum or cannot be decoded ({type(e).__name__}: {e})"
                continue
            if has_nan(data):
                problems[i] = MISSING
            elif out is not None:
                where, local = wanted[i]
                put(out, where, data, local)
        return problems


def check(payload, stored, what: str) -> None:
    want, have = int.from_bytes(bytes(stored), "little"), crc32c.crc32c(payload)
    if want != have:
        raise Bad(f"fails its checksum or cannot be decoded ({what}: crc32c {have:08x}, stored {want:08x})")
