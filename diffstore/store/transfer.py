"""How `diffstore copy` moves objects: checked, concurrent, in an order that keeps DST consistent at every instant.

A shard is checked on its raw object, not by decoding it through the codec: the crc32c of the shard's index and of
every inner chunk (Zarr v3 sharding, which Store.create writes with crc32c on both). This checks the very bytes that
land in DST (copied verbatim, so DST is bit-identical), costs one crc32c pass instead of a zstd decompression, and
the index also shows an inner chunk that is missing (rows that would read as NaN). Every shard to move is checked
before the first write, so a corrupt SRC changes nothing; checked shards stay in memory up to `cache_bytes`, so a
copy of that size reads SRC once.

Writes: parent groups, splits (their zarr.json last), arrays (metadata in Store.create's order, then each shard's
data before its done flag), results last; every object whole (local: temporary file + rename; S3: one PUT).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import crc32c
import numpy as np
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.buffer import Buffer, default_buffer_prototype
from zarr.core.sync import sync

from ..errors import DiffstoreError

EMPTY = 2**64 - 1  # a shard index entry of a chunk that was never written


@dataclass(frozen=True)
class ShardCheck:
    """How one array's shard objects are checked: Zarr v3 sharding with the index at the end, crc32c on the index
    and on every inner chunk (the layout Store.create writes)."""

    grid: tuple[int, ...]  # inner chunks per shard along each axis
    chunk_rows: int
    shard_rows: int
    n_rows: int

    @classmethod
    def of(cls, a) -> "ShardCheck":
        codecs = a.x.metadata.codecs
        sharding = codecs[0] if len(codecs) == 1 else None
        if not (isinstance(sharding, ShardingCodec) and sharding.index_location == ShardingCodecIndexLocation.end
                and sharding.index_codecs == (BytesCodec(), Crc32cCodec())
                and isinstance(sharding.codecs[-1], Crc32cCodec)):
            raise DiffstoreError(f"{a.where}/x/zarr.json: its codecs are not shards with crc32c checksums, which copy "
                                 f"checks on every chunk; nothing was copied ({codecs})")
        grid = tuple(s // c for s, c in zip(a.x.shards, sharding.chunk_shape))
        return cls(grid, int(sharding.chunk_shape[0]), a.shard_rows, a.n_rows)

    def problem(self, blob: bytes, shard: int) -> str | None:
        """What is wrong with shard `shard`'s object; None when its index and every chunk pass their crc32c."""
        size, end = 16 * math.prod(self.grid) + 4, len(blob)
        if end < size:
            return f"is truncated ({end} bytes; its index alone takes {size})"
        if not crc_ok(blob, end - size, end):
            return "has a chunk index that fails its crc32c"
        entries = np.frombuffer(blob, "<u8", count=(size - 4) // 8, offset=end - size).reshape(*self.grid, 2)
        filled = -(-min(self.shard_rows, self.n_rows - shard * self.shard_rows) // self.chunk_rows)
        for pos in np.ndindex(*self.grid):
            offset, nbytes = (int(v) for v in entries[pos])
            if offset == EMPTY and nbytes == EMPTY:
                if pos[0] < filled:
                    return f"lacks its inner chunk {pos} (those rows would read as NaN)"
            elif nbytes < 4 or offset + nbytes > end - size:
                return f"has its inner chunk {pos} outside the object"
            elif not crc_ok(blob, offset, offset + nbytes):
                return f"has its inner chunk {pos} failing its crc32c"
        return None


def crc_ok(blob: bytes, start: int, end: int) -> bool:
    """Whether blob[start:end - 4] carries its crc32c in the last 4 bytes (zarr's Crc32cCodec: little endian)."""
    view = memoryview(blob)
    return crc32c.crc32c(view[start:end - 4]) == int.from_bytes(view[end - 4:end], "little")


def run_copy(plan, workers: int = 16, cache_bytes: int = 1 << 30, show_progress: bool = True) -> None:
    """Carry out a copy.CopyPlan: check every shard to move, then write, at most `workers` objects in flight.
    Small objects come from the plan's snapshot of SRC (read once while planning); shard data is read here."""
    from ..progress import progress

    src, dst = plan.src, plan.dst
    moves = [(m, s) for m in plan.arrays for s in m.shards]
    held: dict[str, Buffer] = dict(plan.snapshot)  # + checked shards (up to cache_bytes) until written
    room = [cache_bytes]
    gate = asyncio.Semaphore(workers)

    async def get(key: str) -> Buffer:
        buf = await src.zs.get(key, prototype=default_buffer_prototype())
        if buf is None:
            raise DiffstoreError(f"{src.url.rstrip('/')}/{key} disappeared during the copy (removed by another "
                                 "process?); re-run the copy: what is in DST already is kept")
        return buf

    async def checked(m, s) -> Buffer:
        buf = await get(f"{m.path}/{s.data}")
        problem = m.check.problem(buf.to_bytes(), s.index)
        if problem:
            raise DiffstoreError(f"{src.url.rstrip('/')}/{m.path}: shard {s.index} {problem}. Fix SRC first with: "
                                 f"diffstore repair --store {src.url} {m.path} (or leave the array out with selectors)")
        return buf

    async def check(m, s, bar, task) -> None:
        async with gate:
            buf = await checked(m, s)
        if len(buf) <= room[0]:
            held[f"{m.path}/{s.data}"], room[0] = buf, room[0] - len(buf)
        bar.advance(task, len(buf) / 1e6)

    async def copy_object(key: str) -> None:
        async with gate:
            await dst.zs.set(key, held.pop(key, None) or await get(key))

    async def copy_shard(m, s, bar, task) -> None:
        async with gate:
            buf = held.pop(f"{m.path}/{s.data}", None) or await checked(m, s)  # not held: read and checked again
            await dst.zs.set(f"{m.path}/{s.data}", buf)
            await dst.zs.set(f"{m.path}/{s.flag}", held.pop(f"{m.path}/{s.flag}"))  # once the data is stored
        bar.advance(task, len(buf) / 1e6)

    async def copy_split(keys: list[str]) -> None:
        await gather(*(copy_object(k) for k in keys[:-1]))
        if keys:
            await copy_object(keys[-1])  # the split's zarr.json last: the split exists once it is whole

    async def copy_array(m, bar, task) -> None:
        for key in m.meta:
            await copy_object(f"{m.path}/{key}")
        await gather(*(copy_shard(m, s, bar, task) for s in m.shards))

    async def everything(bar) -> None:
        total = sum(s.nbytes for _, s in moves) / 1e6
        task = bar.add_task("check crc32c", total=total)
        await gather(*(check(m, s, bar, task) for m, s in moves))
        for key in plan.parents:
            await copy_object(key)
        await gather(*(copy_split(keys) for keys in plan.splits.values()))
        task = bar.add_task(f"copy -> {dst.url}", total=total)
        await gather(*(copy_array(m, bar, task) for m in plan.arrays))
        await gather(*(copy_object(k) for k in plan.results))

    with progress("MB", disable=not show_progress) as bar:
        sync(everything(bar))


async def gather(*coros):
    """asyncio.gather that cancels the others when one fails (no write goes on after the copy has stopped)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise
