"""What a store holds, read concurrently: `ls`, `du` and `copy` plan from one listing, not one round trip per object.

One recursive listing with sizes (a paginated LIST on S3) finds every array, its objects and their bytes; the
zarr.json of each selected array (group, x, done) and its done flags are then read in one asyncio.gather, bounded
by CONCURRENCY. On S3 a store of 1,000 arrays lists in seconds instead of minutes (bench/bench_team.py (d)).
Why not a catalog object that writers keep up to date: S3 has no lock, so two writers would overwrite each other's
update, a writer killed between its shard and the catalog would leave it stale, and stores written before it would
lack one; the listing is the store itself, always current.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
import zarr
from zarr.core.sync import sync
from zarr.storage import FsspecStore

from ..errors import DiffstoreError
from ..key import FeatureKey
from .arrays import ShardedArray
from .store import Store

CONCURRENCY = 64  # requests in flight: enough to hide S3 latency, few enough for a laptop's open-file limit
ROOTS = ("features", "targets")  # where sharded arrays live (repfusion/ holds students' weights, named by results)


async def bounded(coros, limit: int = CONCURRENCY) -> list:
    """asyncio.gather with at most `limit` coroutines running at once; results in order."""
    gate = asyncio.Semaphore(limit)

    async def one(coro):
        async with gate:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))


async def sizes(zs, prefix: str) -> dict[str, int]:
    """Every object under `prefix` (a folder) -> its size in bytes."""
    if isinstance(zs, FsspecStore):  # one paginated listing that carries the sizes
        base = zs.path.rstrip("/")
        found = await zs.fs._find(f"{base}/{prefix}", detail=True, withdirs=False)
        return {name.removeprefix(f"{base}/"): int(info.get("size") or 0) for name, info in found.items()}
    keys = [k async for k in zs.list_prefix(f"{prefix}/")]
    return dict(zip(keys, await bounded(zs.getsize(k) for k in keys)))


def listing(store: Store, roots: tuple[str, ...] = ROOTS) -> dict[str, int]:
    """Object key -> bytes for everything under `roots` (nothing when the store is not created yet)."""
    if store._root is None:
        return {}

    async def every():
        return await asyncio.gather(*(sizes(store.zs, r) for r in roots))

    return {k: v for part in sync(every()) for k, v in part.items() if not k.endswith(".partial")}


def array_paths(objects: dict[str, int]) -> list[str]:
    """Paths of the sharded arrays among `objects`: folders holding x/ or done/ metadata, and feature groups a
    killed run left without them (as Store.array_paths finds them)."""
    out = set()
    for key in objects:
        parts = key.split("/")
        if parts[-1] != "zarr.json":
            continue
        if len(parts) >= 3 and parts[-2] in ("x", "done"):
            out.add("/".join(parts[:-2]))
        elif parts[0] == "features" and len(parts) == 9:
            out.add("/".join(parts[:-1]))
    return sorted(out)


def objects_of(objects: dict[str, int], paths: list[str]) -> dict[str, dict[str, int]]:
    """Array path -> its objects (key relative to the array -> bytes)."""
    out: dict[str, dict[str, int]] = {p: {} for p in paths}
    for key, size in objects.items():
        parts = key.split("/")
        for n in range(len(parts) - 1, 0, -1):
            owner = "/".join(parts[:n])
            if owner in out:
                out[owner]["/".join(parts[n:])] = size
                break
    return out


@dataclass
class ArrayInfo:
    """One array as listed: its objects and bytes, and the opened array (None, with `error`, when it cannot open)."""

    path: str
    objects: dict[str, int] = field(default_factory=dict)  # key relative to the array -> bytes
    array: ShardedArray | None = None
    error: str | None = None

    @property
    def bytes(self) -> int:
        return sum(self.objects.values())

    @property
    def done(self) -> np.ndarray:
        return self.array._mask.copy()

    @property
    def rows_done(self) -> int:
        a = self.array
        return sum(a.shard_slice(int(i)).stop - a.shard_slice(int(i)).start for i in np.flatnonzero(self.done))


def read_arrays(store: Store, paths: list[str], objects: dict[str, int], listed_flags: bool = False) -> list[ArrayInfo]:
    """ArrayInfo of each path, the metadata and done flags of all of them read concurrently. listed_flags: a shard
    is done when its flag object is listed (writers store 1; zarr deletes a flag set back to its fill value 0),
    which spares one read per shard (`ls`); readers, verify and copy read the values."""
    owned = objects_of(objects, paths)

    async def one(path):
        try:
            g = await store._root._async_group.getitem(path)
            x, done = await asyncio.gather(g.getitem("x"), g.getitem("done"))
            return g, x, done, listed(done, owned[path]) if listed_flags else await done.getitem(slice(None))
        except Exception:  # noqa: BLE001 - opened again below, where the failure is named
            return None

    nodes = sync(bounded(one(p) for p in paths)) if store._root is not None and paths else [None] * len(paths)
    out = []
    for path, node in zip(paths, nodes):
        info = ArrayInfo(path, owned[path])
        try:
            if node is None:  # names what is broken (or, if another writer just finished it, opens it)
                info.array = store.open_array(path)
                info.array.done_mask()
            else:
                g, x, done, flags = node
                info.array = ShardedArray(zarr.Group(g), store.url, zarr.Array(x), zarr.Array(done),
                                          np.asarray(flags).astype(bool))
        except DiffstoreError as e:
            info.array, info.error = None, str(e)
        out.append(info)
    return out


def listed(done, objects: dict[str, int]) -> np.ndarray:
    """Done flags from the listing: shard i is done when its flag object done/c/{i} is there."""
    prefix = "done/" + done.metadata.encode_chunk_key((0,))[:-1]
    mask = np.zeros(done.shape[0], bool)
    found = [int(k[len(prefix):]) for k in objects if k.startswith(prefix) and k[len(prefix):].isdigit()]
    mask[[i for i in found if i < len(mask)]] = True
    return mask


def select(store: Store, paths: list[str], texts: list[str] | None) -> list[str]:
    """The paths that `texts` (store paths or selectors such as t=10/model=digits-ddpm) name; all without texts.
    A text naming nothing is refused (Store.match)."""
    return store.match(texts, paths) if texts else paths


def survey(store: Store, texts: list[str] | None = None, roots: tuple[str, ...] = ROOTS) -> list[ArrayInfo]:
    """The arrays under `roots` that `texts` select, listed and their metadata read concurrently (done flags as
    listed: see read_arrays)."""
    objects = listing(store, roots)
    return read_arrays(store, select(store, array_paths(objects), texts), objects, listed_flags=True)


USAGE_FIELDS = ("kind", "dataset", "split", "model", "input", "t", "block", "pool")


def usage(store: Store, texts: list[str] | None = None,
          by: tuple[str, ...] = ("dataset", "split", "model")) -> list[dict]:
    """Bytes of the feature and target arrays grouped by key fields (`du`): from the listing alone, no metadata read.
    An array's bytes are every object in its folder (x shards, done flags, sample/label coordinates, zarr.json)."""
    wrong = [f for f in by if f not in USAGE_FIELDS]
    if wrong or not by:
        raise DiffstoreError(f"cannot group by {', '.join(wrong) or 'nothing'}: use comma-separated fields among "
                             f"{', '.join(USAGE_FIELDS)} (e.g. --by dataset,split,model)")
    objects = listing(store)
    paths = select(store, array_paths(objects), texts)
    groups: dict[tuple, list[int]] = {}
    for path, owned in objects_of(objects, paths).items():
        parts = path.split("/") + ["-"] * 8  # targets/{dataset}/{split}/{model}/{layer}/{input}/{kind}
        fields = dict(zip(USAGE_FIELDS, [parts[0], *parts[1:4], parts[5] if parts[0] == "targets" else "-"]))
        if parts[0] == "features" and path.count("/") == 7:
            try:
                fields.update(FeatureKey.from_path(path).to_dict())
            except ValueError:  # a folder name that is no key (t and block not numbers): grouped by its path parts
                pass
        total = groups.setdefault(tuple(fields[f] for f in by), [0, 0])
        total[0] += 1
        total[1] += sum(owned.values())
    return [{**dict(zip(by, g)), "arrays": n, "bytes": b}
            for g, (n, b) in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0])))]
