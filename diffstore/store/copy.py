"""`diffstore copy SRC DST [SELECTOR...]`: a key-level merge of one store into another (local <-> s3://, s3 -> s3).

For each selected array (features and targets, default all; plus the students' weights a copied result names):
absent from DST, it is created from SRC's objects byte for byte (group zarr.json with fingerprint and provenance,
x/, sample/, label/, then done/, as Store.create orders them); present with the same fingerprint, only the done
shards DST lacks move; present with another fingerprint, the copy is refused listing what differs. The split's ids
and labels move when DST lacks them and must be identical otherwise; results that name a copied array come along
when DST lacks them.

Planning (here) reads SRC's small objects once into memory (a snapshot: one consistent view, written verbatim)
and checks, before anything is written: names (no `..`, absolute path or control character), SRC's metadata
(layout, key attribute, codecs, coordinates), and every conflict with DST, all listed at once. transfer.py then
checks every shard's crc32c and writes in an order that keeps DST consistent at every instant: killed at any
instant, a re-run plans from what DST holds and ends with the same bytes. Nothing read from either store is
executed, imported or unpickled: objects are bytes, attributes JSON.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from zarr.core.buffer import Buffer, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore, MemoryStore

from ..errors import DiffstoreError
from ..key import FeatureKey
from .listing import ROOTS, ArrayInfo, array_paths, bounded, listing, objects_of, read_arrays, select
from .remove import referencing
from .store import Store, fingerprint_diff
from .transfer import ShardCheck, run_copy

UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
ALL_ROOTS = (*ROOTS, "repfusion", "datasets", "results")


def check_key(key: str) -> None:
    """Refuse an object key that could leave the store or hide in a terminal (`..`, absolute, control chars)."""
    parts = key.split("/")
    if key.startswith("/") or "\\" in key or UNSAFE.search(key) or any(p in ("", ".", "..") for p in parts):
        raise DiffstoreError(f"{key!r} is not a safe store path (absolute, '..', an empty part or a control "
                             "character); nothing was copied. Remove it from SRC, or pass selectors that leave it out")


@dataclass
class Shard:
    index: int
    data: str  # key of its object, relative to the array
    flag: str  # key of its done flag, relative to the array
    nbytes: int


@dataclass
class ArrayMove:
    path: str
    action: str  # create | complete (metadata DST lacks) | merge (shards only) | up to date
    meta: list[str]  # metadata keys (relative) DST lacks, in write order
    shards: list[Shard]
    check: ShardCheck

    def keys(self) -> list[str]:
        """Every key this move writes, in order."""
        return [f"{self.path}/{k}" for k in [*self.meta, *(key for s in self.shards for key in (s.data, s.flag))]]


@dataclass
class CopyPlan:
    src: Store
    dst: Store
    sizes: dict[str, int]  # SRC key -> bytes
    snapshot: dict[str, Buffer] = field(default_factory=dict)  # SRC's small objects, read once (see snapshot)
    parents: list[str] = field(default_factory=list)  # parent groups' zarr.json DST lacks, root first
    splits: dict[str, list[str]] = field(default_factory=dict)  # split path -> keys to write, its zarr.json last
    arrays: list[ArrayMove] = field(default_factory=list)
    results: list[str] = field(default_factory=list)  # result zarr.json keys DST lacks
    kept: dict[str, str] = field(default_factory=dict)  # result path -> why it is not copied

    def keys(self) -> list[str]:
        return [*self.parents, *(k for keys in self.splits.values() for k in keys),
                *(k for m in self.arrays for k in m.keys()),
                *self.results]

    def rows(self) -> list[dict]:
        """What moves (or would move), one row per split, array and result, with its bytes."""
        def row(what, action, keys, shards=0):
            return {"what": what, "action": action, "shards": shards, "objects": len(keys),
                    "bytes": sum(self.sizes.get(k, 0) for k in keys)}

        return ([row("(parent groups)", "create", self.parents)] if self.parents else []) + \
            [row(p, "copy ids, labels" if keys else "identical", keys) for p, keys in self.splits.items()] + \
            [row(m.path, m.action, m.keys(), len(m.shards)) for m in self.arrays] + \
            [row(k.removesuffix("/zarr.json"), "copy", [k]) for k in self.results] + \
            [row(path, why, []) for path, why in self.kept.items()]


def meta_order(key: str) -> tuple:
    """Store.create's order: the group (fingerprint) first, x, the coordinates, done last (its presence says the
    rest is there); inside an array, its zarr.json before its chunks."""
    rank = {"zarr.json": 0, "x": 1, "done": 3}.get(key.split("/")[0], 2)
    return rank, key.split("/")[0], not key.endswith("zarr.json"), key


def plan_split(src: Store, dst: Store, dataset: str, split: str, objects: dict, theirs: dict):
    """(SRC's split record, the keys of its ids and labels to write, group zarr.json last); [] when DST holds the
    same. Other ids or labels in DST are refused."""
    path = f"datasets/{dataset}/{split}"
    record = src.split(dataset, split)  # checks the ids against their sha256, naming the split
    keys = sorted((k for k in objects if k.startswith(f"{path}/")), key=lambda k: (k == f"{path}/zarr.json", k))
    if f"{path}/zarr.json" not in theirs:
        return record, keys
    stored = dst._group(path)
    same_ids = stored is not None and stored.attrs.get("ids_sha256") == record.ids_sha256
    try:
        mine = dst.split(dataset, split)
    except DiffstoreError:
        if same_ids:  # a copy or extraction stopped before the ids and labels: write them
            return record, keys[:-1]
        raise DiffstoreError(f"{path}: DST holds another version of this split, and its ids cannot be read; "
                             f"refusing to mix them. Copy into another store") from None
    if same_ids:
        if np.array_equal(mine.labels, record.labels) and list(mine.class_names) == list(record.class_names):
            return record, []
        raise DiffstoreError(f"{path}: DST holds the same sample ids with other labels or class names; refusing to "
                             "mix them. Copy into another store")
    n = min(len(mine.ids), len(record.ids))
    if np.array_equal(mine.ids[:n], record.ids[:n]):
        longer, shorter = ("SRC", "DST") if len(record.ids) > n else ("DST", "SRC")
        raise DiffstoreError(f"{path}: {shorter}'s {n} sample ids are a prefix of {longer}'s "
                             f"{max(len(mine.ids), len(record.ids))} (one store holds a --limit subset); copying "
                             "between a split and its prefix is not supported yet. Copy into another store")
    raise DiffstoreError(f"{path}: DST holds other sample ids ({len(mine.ids)} samples; SRC {len(record.ids)}); "
                         "refusing to mix them. Copy into another store")


def split_of(path: str) -> tuple[str, str] | None:
    """(dataset, split) of an array: features/ and targets/ paths name them; students' weights have none."""
    parts = path.split("/")
    return (parts[1], parts[2]) if parts[0] in ROOTS and len(parts) > 3 else None


def plan_array(dst: Store, info: ArrayInfo, mine: ArrayInfo | None, theirs: dict, rows: int | None) -> ArrayMove:
    """What of SRC's array `info` DST lacks; refused (DiffstoreError) when SRC's array is broken or DST's differs."""
    path = info.path
    if info.error:
        raise DiffstoreError(f"SRC {info.error}")
    a = info.array
    fp = a.attrs.get("fingerprint")
    if not (isinstance(fp, str) and re.fullmatch(r"[0-9a-f]{64}", fp)):
        raise DiffstoreError(f"{a.where}: its fingerprint attribute is not a sha256 ({str(fp)[:80]!r}); nothing was "
                             "copied. Remove the array from SRC with `diffstore rm`, or leave it out with selectors")
    if path.startswith("features/"):
        key = FeatureKey.from_path(path).to_dict()
        if a.attrs.get("key") != key:
            raise DiffstoreError(f"{a.where}: its key attribute does not match its path; nothing was copied")
    if rows is not None and a.n_rows != rows:
        raise DiffstoreError(f"{a.where} has {a.n_rows} rows but its split {rows}; nothing was copied. Fix it with "
                             f"{a.fix_command}")
    check = ShardCheck.of(a)
    done = np.zeros(a.n_shards, bool)
    stored = None
    if mine is not None and mine.array is not None:
        stored, done = mine.array.attrs, mine.done
    elif f"{path}/zarr.json" in theirs:  # DST holds the group without x or done: a stopped run, completed below
        stored = dict(dst._group(path).attrs)
    if stored is not None:
        if stored.get("fingerprint") != fp:
            diff = fingerprint_diff(stored.get("recipe", {}), a.attrs.get("recipe", {})) or ["(fingerprint only)"]
            raise DiffstoreError(f"{path}: DST holds it with another fingerprint (stored: DST, requested: SRC):\n    "
                                 + "\n    ".join(diff))
        if stored.get("layout") != a.attrs.get("layout"):
            raise DiffstoreError(f"{path}: DST lays it out as {stored.get('layout')}, SRC as {a.attrs.get('layout')}; "
                                 "shards cannot move between them. Copy into another store")
        if f"{path}/x/zarr.json" in theirs:
            wanted = {k: v for k, v in a.x.metadata.to_dict().items() if k not in ("attributes", "dimension_names")}
            have = {k: v for k, v in dst._node(f"{path}/x").metadata.to_dict().items() if k in wanted}
            if have != wanted:
                raise DiffstoreError(f"{path}: DST encodes its shards otherwise ({fingerprint_diff(have, wanted)}); "
                                     "shards cannot move between them. Copy into another store")
    meta = sorted((k for k in info.objects if not k.startswith(("x/c/", "done/c/")) and f"{path}/{k}" not in theirs),
                  key=meta_order)
    shards = []
    for i in np.flatnonzero(info.done & ~done):
        data = "x/" + a.x.metadata.encode_chunk_key((int(i),) + (0,) * (a.ndim - 1))
        if data not in info.objects:
            raise a.error(int(i), "is marked done but its object is missing")
        shards.append(Shard(int(i), data, "done/" + a._done.metadata.encode_chunk_key((int(i),)), info.objects[data]))
    action = "create" if stored is None else "complete" if meta else "merge" if shards else "up to date"
    return ArrayMove(path, action, meta, shards, check)


def plan_results(src: Store, objects: dict, theirs: dict, infos: dict[str, ArrayInfo], plan: CopyPlan) -> set[str]:
    """Results naming a copied array (repair.referencing) that DST lacks go into the plan; returns the paths of
    the students' weights they name (copied with them)."""
    paths = sorted(k.removesuffix("/zarr.json") for k in objects if k.startswith("results/") and k.count("/") == 3
                   and k.endswith("/zarr.json"))
    arrays = [(p, i.array.attrs.get("key"), i.array.attrs.get("fingerprint")) for p, i in infos.items() if i.array]
    named = set()
    with src.prefetched(paths):
        for path in paths:
            try:
                payload = dict(src._group(path).attrs).get("payload", {})
            except DiffstoreError as e:
                plan.kept[path] = f"left out: unreadable in SRC ({e})"
                continue
            if not any(referencing(payload, p, k if isinstance(k, dict) else None, f) for p, k, f in arrays):
                continue
            if f"{path}/zarr.json" in theirs:
                plan.kept[path] = "DST has it (kept as it is)"
            else:
                plan.results.append(f"{path}/zarr.json")
            named |= {s for s in strings(payload) if s.startswith("repfusion/")}
    return named


def strings(value):
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for v in value:
            yield from strings(v)
    elif isinstance(value, str):
        yield value


def plan_copy(src: Store, dst: Store, texts: list[str] | None = None) -> CopyPlan:
    """Everything a copy would write, checked against both stores; refuses (DiffstoreError, listing every
    problem) before anything is written. Reads listings and small objects: no shard data."""
    if same_place(src.url, dst.url):
        raise DiffstoreError(f"SRC and DST are the same store ({src.url}); pass another DST")
    objects, theirs = listing(src, ALL_ROOTS), listing(dst, ALL_ROOTS)
    objects["zarr.json"] = sync(src.zs.getsize("zarr.json"))
    if dst._root is not None:
        theirs["zarr.json"] = 0
    every = array_paths(objects)
    chosen = select(src, every, texts) if texts else [p for p in every if p.split("/")[0] in ROOTS]
    plan = CopyPlan(src, dst, objects)
    seen = snapshot(src, objects, every, chosen, plan.snapshot)
    infos = {i.path: i for i in read_arrays(seen, chosen, objects)}
    weights = sorted(plan_results(seen, objects, theirs, infos, plan) & set(every) - set(infos))
    snapshot(src, objects, every, weights, plan.snapshot)
    infos.update({i.path: i for i in read_arrays(seen, weights, objects)})
    in_dst = set(array_paths(theirs))
    mine = {i.path: i for i in read_arrays(dst, [p for p in infos if p in in_dst], theirs)}
    problems, records = [], {}
    for name in sorted({split_of(p) for p in infos} - {None}):
        try:
            records[name], plan.splits[f"datasets/{name[0]}/{name[1]}"] = plan_split(seen, dst, *name, objects, theirs)
        except DiffstoreError as e:
            problems.append(str(e))
    for path, info in infos.items():
        record = records.get(split_of(path))
        try:
            plan.arrays.append(plan_array(dst, info, mine.get(path), theirs, len(record.ids) if record else None))
        except DiffstoreError as e:
            problems.append(str(e))
    problems += coordinate_problems(seen, plan, records)
    if problems:
        raise DiffstoreError("copy refused; nothing was written:\n  " + "\n  ".join(problems))
    keys = plan.keys()
    for key in keys:
        check_key(key)
    plan.parents = sorted({f"{d}/zarr.json".lstrip("/") for k in keys for d in ancestors(k)}
                          & set(objects) - set(theirs) - set(keys), key=lambda k: k.count("/"))
    refuse_links(dst, plan.parents + keys)
    return plan


def snapshot(src: Store, objects: dict, every: list[str], arrays: list[str], into: dict) -> Store:
    """Read SRC's small objects once, concurrently, into `into`: everything outside the arrays (zarr.json of the
    root and parent groups, splits, results) and everything of `arrays` but their shard data. Returns a read-only
    Store over them: planning reads that one consistent view, and the copy writes those very bytes."""
    owned = objects_of(objects, every)
    inside = {f"{p}/{k}" for p, keys in owned.items() for k in keys}
    keys = [k for k in objects if k not in inside] + [f"{p}/{k}" for p in arrays for k in owned[p]
                                                       if not k.startswith("x/c/")]
    keys = [k for k in keys if k not in into]

    async def one(key):
        return await src.zs.get(key, prototype=default_buffer_prototype())

    for key, buf in zip(keys, sync(bounded(one(k) for k in keys)) if keys else []):
        if buf is not None:  # (removed since the listing)
            into[key] = buf
    memory = MemoryStore(into, read_only=True)
    return Store(src.url, memory, zarr.open_group(memory, mode="r"))


def ancestors(key: str) -> list[str]:
    parts = key.split("/")[:-1]
    return ["/".join(parts[:n]) for n in range(len(parts) + 1)]


def same_place(a: str, b: str) -> bool:
    local = "://" not in a and "://" not in b
    return Path(a).resolve() == Path(b).resolve() if local else a.rstrip("/") == b.rstrip("/")


def coordinate_problems(src: Store, plan: CopyPlan, records: dict) -> list[str]:
    """The sample/label coordinates an array brings (no checksum of their own) must decode to its split's."""
    todo = [(m.path, name, want) for m in plan.arrays if (record := records.get(split_of(m.path)))
            for name, want in (("sample", record.ids), ("label", record.labels))
            if any(k.startswith(f"{name}/") for k in m.meta)]

    async def one(path, name):
        try:
            return np.asarray(await (await src._root._async_group.getitem(f"{path}/{name}")).getitem(slice(None)))
        except Exception:  # noqa: BLE001 - reported below as not matching
            return None

    values = sync(bounded(one(p, n) for p, n, _ in todo)) if todo else []
    return [f"{src.url.rstrip('/')}/{p}/{n} does not match its split's {'ids' if n == 'sample' else 'labels'}; "
            f"nothing was copied. Fix it with `diffstore repair --store {src.url} {p}`"
            for (p, n, want), got in zip(todo, values) if got is None or not np.array_equal(got, want)]


def refuse_links(dst: Store, keys: list[str]) -> None:
    """Writes into a local DST never go through a symbolic link (it could point outside the store)."""
    if not isinstance(dst.zs, LocalStore):
        return
    root, seen = Path(dst.zs.root), set()
    for key in keys:
        p = root / key
        while p != root and p not in seen:
            seen.add(p)
            if p.is_symlink():
                raise DiffstoreError(f"{p} is a symbolic link inside DST; copy does not write through links. Replace "
                                     "it with a folder, or copy into another store")
            p = p.parent


def copy(src: str, dst: str, texts: list[str] | None = None, dry_run: bool = False, workers: int = 16,
         show_progress: bool = True, storage_options: dict | None = None) -> list[dict]:
    """Copy the arrays `texts` select (default all) from store `src` into `dst` (see the module doc); returns one
    row per split, array and result with what moved (dry_run: would move) and its bytes."""
    if workers < 1:
        raise DiffstoreError(f"--workers must be >= 1, got {workers}")
    plan = plan_copy(Store.open(src, mode="r", storage_options=storage_options),
                     Store.open(dst, mode="a", storage_options=storage_options), texts)
    if not dry_run:
        run_copy(plan, workers=workers, show_progress=show_progress)
    return plan.rows()
