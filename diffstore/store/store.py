"""The feature store: a Zarr v3 group on a local path or any fsspec URL (s3://bucket/team.zarr).

Layout (readable without diffstore: `xr.open_datatree(url, engine="zarr")`, `zarr.open_array(url, path=".../x")`):

    zarr.json                                  attrs {"diffstore": {"format": 2}}
    datasets/{dataset}/{split}/ids, labels     int64 [sample]; attrs: class_names, ids_sha256, source
    features/{dataset}/{split}/{model}/{input}/t{t}/b{block}/p{pool}/
        zarr.json                              attrs: key, recipe, fingerprint, layout, codec, block, preprocess,
                                               provenance
        x                                      [sample, channel, height, width] (p x p, or H x W for p=full),
                                               float16 by default, chunked along rows, sharded, codec + crc32c
        done                                   uint8 [shard], one chunk per shard: 1 = shard durable
        sample, label                          int64 [sample]: the split's ids and labels (xarray coordinates)
    targets/...                                RepFusion teacher targets, same ShardedArray layout
    results/{kind}/{name}                      attrs: JSON results (probe accuracies, CKA matrices, policies)
    results/heads/{name}                       a fitted probe head (probe --save-heads): its weights as arrays,
                                               what it is in attrs (probe.saved); name = its probe result's

Format 1 (still read): no `layout` attribute, no sample/label arrays, dims d0..d2, ids/labels without dims.

Writes are shard-aligned: a writer owns whole shards, writes a shard's rows in one call (one object per shard,
replaced atomically) and only then sets its `done` element, which lives in its own chunk so concurrent writers
never touch the same object (zarr#3514, #3682). Resume skips done shards and never rewrites them.

Every creation step is idempotent and safe to race: the root group is made on the first write (a refused
command leaves nothing), a node someone else created is "already there" when its fingerprint matches, and a
group without its arrays (a killed run) is completed. Sharing on S3: see README "Sharing a store".
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import os
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.core.sync import sync
from zarr.errors import ContainsArrayError, ContainsGroupError

from ..errors import DiffstoreError
from ..key import BadName, FeatureKey, select
from .arrays import ShardedArray
from .attrs import shown
from .backend import describe_failure, zarr_store
from .codec import DEFAULT as DEFAULT_CODEC
from .codec import LEGACY as LEGACY_CODEC
from .codec import compressors
from .labels import SAMPLE, label_names, row_dims
from .provenance import provenance
from .results import ResultsMixin
from .splits import SplitRecord, SplitsMixin

FORMAT = 2
READS = (1, 2)  # store formats this version reads
CHUNK_BYTES = 1 << 20  # target raw size of one chunk (the unit a reader decompresses)


def fingerprint_diff(stored: dict, wanted: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two attrs dicts (which setting changed)."""
    out = []
    for k in sorted(set(stored) | set(wanted)):
        a, b = stored.get(k), wanted.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: stored {a!r}, requested {b!r}")
    return out


def entries(folder: Path) -> list[str]:
    """Names in a local folder; none when it is absent, or removed meanwhile by another writer's open (above)."""
    try:
        return os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []


def check_path(path) -> str:
    """A node path inside the store: relative, no empty, '.' or '..' segment, no control characters. Paths come
    from users (selectors, `rm PATH`) and from listings of a shared bucket; none may reach outside the store."""
    bad = not isinstance(path, str) or path.startswith("/") or "\\" in path or \
        any(seg in ("", ".", "..") for seg in path.split("/")) or any(ord(c) < 32 for c in path)
    if bad:
        raise DiffstoreError(f"{str(path)[:200]!r} is not a path inside a store (relative, no '..', '.' or empty "
                             "parts): name arrays as `diffstore ls` shows them, or by selectors like t=90/b=5/p=2")
    return path


UNREAD = object()  # a node prefetched() could not read: _node reads it again and names the failure


class Store(SplitsMixin, ResultsMixin):
    """A store: nodes, arrays and keys here; dataset splits (splits.py) and results (results.py) as mixins."""

    def __init__(self, url: str, zs, root: zarr.Group | None):
        self.url = url
        self.zs = zs
        self._root = root  # None until the first write creates it (mode "a" on a new path)
        self.created_here = root is None
        self._prefetched: dict | None = None  # path -> node or None, inside prefetched()
        self.invalid: list[str] = []  # paths under features/ that are not valid keys (see feature_keys)

    @classmethod
    def open(cls, url: str, mode: str = "a", storage_options: dict | None = None) -> "Store":
        """mode "r": the store must exist. mode "a": created on the first write, so a command refused before
        writing leaves no store behind. Never opens a non-diffstore path."""
        if not isinstance(url, (str, os.PathLike)) or not str(url).strip():
            raise DiffstoreError(f"a store is a path or an fsspec URL (e.g. data/f.zarr, s3://bucket/f.zarr), got "
                                 f"{url!r}")
        url = str(url)
        zs = zarr_store(url, read_only=(mode == "r"), storage_options=storage_options)
        local = None if "://" in url else Path(url)
        existed = local is None or local.exists()
        root = cls._open_root(url, zs, mode)
        if root is None and not existed:
            with contextlib.suppress(OSError):  # zarr made the folder on opening; the first write makes it again
                local.rmdir()  # (unless another writer already wrote into it)
        if root is None and mode == "r":
            raise DiffstoreError(f"no diffstore store at {url}: run `diffstore extract --store {url}` first")
        if root is None and local is not None and any(not name.startswith("zarr.json") for name in entries(local)):
            for _ in range(40):  # another writer may be creating it right now: give its zarr.json time to land
                root = cls._open_root(url, zs, mode)
                if root is not None:
                    break
                time.sleep(0.05)
            if root is None:
                raise DiffstoreError(f"{url} is a non-empty directory without a store in it; refusing to write there. "
                                     "Pass a new or empty path (e.g. data/f.zarr)")
        return cls(url, zs, root)

    @staticmethod
    def _open_root(url: str, zs, mode: str) -> zarr.Group | None:
        try:
            root = zarr.open_group(zs, mode="r" if mode == "r" else "r+")
        except FileNotFoundError:
            return None
        except Exception as e:  # no credentials, unreachable endpoint, a zarr *array*, a broken zarr.json
            raise DiffstoreError(describe_failure(url, e, "zarr.json")) from None
        info = root.attrs.get("diffstore")
        if not isinstance(info, dict):
            raise DiffstoreError(f"{url} is a Zarr group but not a diffstore store (no 'diffstore' attribute); "
                                 "refusing to touch it. Pass another --store path")
        if info.get("format", 0) not in READS:
            raise DiffstoreError(f"{url} has store format {info.get('format')}; this diffstore reads formats "
                                 f"{READS}: upgrade diffstore to read it")
        return root

    @property
    def root(self) -> zarr.Group:
        """The root group, created on first use (by a write); a concurrent creator wins harmlessly."""
        for attempt in range(20):
            if self._root is not None:
                break
            try:
                self._root = zarr.open_group(self.zs, mode="w-", attributes={"diffstore": {"format": FORMAT}})
            except (ContainsGroupError, ContainsArrayError, FileExistsError):
                self._root = self._open_root(self.url, self.zs, "a")
            except FileNotFoundError:  # another writer's open removed the empty folder meanwhile: try again
                if attempt == 19:
                    raise
                time.sleep(0.01)
        return self._root

    @property
    def format(self) -> int:
        return FORMAT if self._root is None else int(self._root.attrs["diffstore"].get("format", 1))

    # --- nodes: a missing node is None, a broken zarr.json is named -----------------------------
    def _exists(self, key: str) -> bool:
        return bool(sync(self.zs.exists(key)))

    @contextlib.contextmanager
    def prefetched(self, paths: list[str]):
        """Within: nodes at `paths` come from one concurrent read of their zarr.json instead of one round trip per
        read (planning reads each array's group several times). Unreadable nodes are left to _node, which names
        them; nodes created within are recorded by create()."""
        async def one(path):
            try:
                return await self._root._async_group.getitem(path)
            except KeyError:
                return None
            except Exception:  # noqa: BLE001 - read again outside, where the failure is named
                return UNREAD

        async def every():
            return await asyncio.gather(*(one(p) for p in paths))

        nodes = sync(every()) if self._root is not None else [None] * len(paths)
        wrap = {zarr.AsyncGroup: zarr.Group, zarr.AsyncArray: zarr.Array}
        self._prefetched = {p: wrap[type(n)](n) if type(n) in wrap else n for p, n in zip(paths, nodes)
                            if n is not UNREAD}
        try:
            yield
        finally:
            self._prefetched = None

    def _node(self, path: str):
        check_path(path)
        if self._root is None:
            return None
        if self._prefetched is not None and path in self._prefetched:
            return self._prefetched[path]
        for attempt in range(2):  # a node another writer creates between our read and our check: read again
            try:
                return self._root[path]
            except KeyError:
                if not self._exists(f"{path}/zarr.json"):
                    return None
                problem = "unreadable"
            except Exception as e:
                problem = f"unreadable: {type(e).__name__}: {e}"
        raise DiffstoreError(f"{self.url.rstrip('/')}/{path}/zarr.json is {problem}. Fix it with "
                             f"`diffstore repair --store {self.url} {path}`, or remove the node with "
                             f"`diffstore rm --store {self.url} {path}` and re-run the command that wrote it")

    def _group(self, path: str) -> zarr.Group | None:
        node = self._node(path)
        return node if isinstance(node, zarr.Group) else None

    def _children(self, prefix: str) -> list[str]:
        async def listing():
            return [k async for k in self.zs.list_dir(prefix)]

        return sorted(k.rstrip("/") for k in sync(listing())) if self._root is not None else []

    def child_groups(self, prefix: str) -> list[str]:
        """Names of the nodes under `prefix` (not its zarr.json, nor a killed write's *.partial file)."""
        return [c for c in self._children(prefix) if c != "zarr.json" and not c.endswith(".partial")]

    def array_paths(self, under: str = "") -> list[str]:
        """Paths of every sharded array (group with x and done, or a feature group a killed run left without
        them), found by listing keys, so one broken zarr.json does not hide the others."""
        out, todo = [], [under.strip("/")] if under else ["features", "targets"]
        while todo:
            path = todo.pop()
            children = set(self.child_groups(path))
            if {"x", "done"} & children or (path.startswith("features/") and path.count("/") == 7):
                out.append(path)
                continue
            todo += [f"{path}/{c}" for c in children]
        return sorted(out)

    # --- sharded arrays -------------------------------------------------------------------------
    def open_array(self, path: str) -> ShardedArray:
        g = self._group(path)
        if g is None:
            raise DiffstoreError(f"no array at {path} in {self.url}")
        try:
            return ShardedArray(g, self.url)
        except DiffstoreError:
            raise
        except Exception:  # noqa: BLE001 - find out which part is missing or broken, and name it
            pass
        for name in ("x", "done"):
            self._node(f"{path}/{name}")  # raises, naming a broken zarr.json
            if name not in g:
                raise DiffstoreError(f"{self.url.rstrip('/')}/{path} has no {name} array (a run was stopped while "
                                     f"creating it): re-run the command that wrote it, or `diffstore repair --store "
                                     f"{self.url} {path}`")
        return ShardedArray(g, self.url)

    def check(self, path: str, fingerprint: str, attrs: dict) -> None:
        """Refuse (before anything is written) when `path` holds another fingerprint, naming what differs."""
        g = self._group(path)
        if g is not None and g.attrs.get("fingerprint") != fingerprint:
            stored, wanted = dict(g.attrs).get("recipe", {}), attrs.get("recipe", {})
            stored = stored if isinstance(stored, dict) else {}
            diff = fingerprint_diff(stored, wanted) or ["(fingerprint only)"]
            changed = {k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k)}
            if "model_fingerprint" in changed:
                fix = "Pass --model-name NAME to store these weights beside the old ones, or use another --store"
            elif "dataset_fingerprint" in changed:
                fix = "These are other images or another preprocessing than the stored ones: use another --store"
            else:  # a recipe setting: resume with the stored value, or keep the other value in another store
                fix = ("To add to the stored arrays, pass the stored value (or drop the option: a resume uses what "
                       "the arrays hold); a store keeps one recipe per key, so for the new value use another --store")
            raise DiffstoreError(
                f"{path} in {self.url} already holds features with another fingerprint; refusing to mix them.\n  "
                + "\n  ".join(shown(d) for d in diff) + f"\nNothing was written. {fix}")

    def stored_shard_rows(self, path: str) -> int | None:
        """Shard size of the array at `path` as recorded (layout attr or its x), None when there is no array."""
        g = self._group(path)
        if g is None:
            return None
        if "layout" in g.attrs:
            return int(g.attrs["layout"]["shard_rows"])
        return self.open_array(path).shard_rows if "x" in g else None

    def create(self, path: str, fingerprint: str, attrs: dict, row_shape: tuple, n_rows: int, shard_rows: int,
               dtype: str = "float16", split: SplitRecord | None = None, codec: str = DEFAULT_CODEC) -> ShardedArray:
        """Pre-sized array at `path`, created step by step so that any step can be re-run or raced: the same
        fingerprint reopens (and completes) what is there; a different one is refused, naming the settings that
        differ, before anything is written. `split` adds its ids and labels as xarray coordinates. `codec` (see
        codec.py) is recorded in the group; an array that exists keeps its own."""
        if not (isinstance(shard_rows, int) and shard_rows > 0 and n_rows > 0):
            raise DiffstoreError(f"{path}: shard rows and rows must be positive, got {shard_rows} and {n_rows}")
        layout = {"n_rows": int(n_rows), "row_shape": [int(s) for s in row_shape], "shard_rows": int(shard_rows),
                  "dtype": str(np.dtype(dtype))}
        compressors(codec)  # an unknown codec is refused before anything is written
        self.check(path, fingerprint, attrs)
        g = self._group(path)
        if g is None:
            try:
                g = self.root.create_group(path, attributes={**attrs, "fingerprint": fingerprint, "layout": layout,
                                                             "codec": codec, "provenance": provenance()})
            except (ContainsGroupError, ContainsArrayError):  # another writer was first: read what it made
                if self._prefetched is not None:
                    self._prefetched.pop(path, None)
                self.check(path, fingerprint, attrs)
                g = self._group(path)
        if self._prefetched is not None:
            self._prefetched[path] = g
        stored = g.attrs.get("layout")
        if stored is not None and stored != layout:
            raise DiffstoreError(f"{path} in {self.url} is laid out as {stored}, not {layout}; nothing was written. "
                                 f"Keep --shard-rows {stored['shard_rows']} for this key, or use another --store")
        if stored is not None:  # done is made last (below): when it opens, so does everything before it
            with contextlib.suppress(Exception):
                return ShardedArray(g, self.url)
        row_bytes = int(np.prod(row_shape)) * np.dtype(dtype).itemsize
        chunk_rows = max(1, min(shard_rows, CHUNK_BYTES // max(row_bytes, 1)))
        while shard_rows % chunk_rows:
            chunk_rows -= 1
        dims = row_dims(len(row_shape), features=path.startswith("features/"))
        coords = stored is not None and split is not None  # format 2: labelled for xarray
        self._create_array(g, "x", shape=(n_rows, *row_shape), dtype=dtype, chunks=(chunk_rows, *row_shape),
                           shards=(shard_rows, *row_shape),
                           compressors=[*compressors(g.attrs.get("codec", LEGACY_CODEC)), Crc32cCodec()],
                           fill_value=np.nan, dimension_names=(SAMPLE, *dims),
                           attributes={"coordinates": "done label label_name" if coords else "done"})
        if coords:
            self._put_values(g, SAMPLE, split.ids)
            self._put_values(g, "label", split.labels, {"class_names": list(split.class_names)})
            self._put_values(g, "label_name", label_names(split.labels, split.class_names))
        self._create_array(g, "done", shape=(-(-n_rows // shard_rows),), dtype="uint8", chunks=(1,), fill_value=0,
                           compressors=None, dimension_names=("shard",))
        return self.open_array(path)

    def _create_array(self, g: zarr.Group, name: str, **kw) -> None:
        if name in g:
            return
        try:
            g.create_array(name, **kw)
        except (ContainsArrayError, ContainsGroupError):
            pass  # another writer created it; its metadata is the same function of the same attrs

    def _put_values(self, g: zarr.Group, name: str, values, attributes: dict | None = None) -> None:
        """A small [sample] array (int64, or text for label names), written whole (deterministic bytes: re-writing
        after a kill is safe)."""
        values = np.asarray(values, dtype=np.int64) if np.asarray(values).dtype.kind != "U" else np.asarray(values)
        dtype = "int64" if values.dtype.kind != "U" else str
        self._create_array(g, name, shape=values.shape, dtype=dtype, chunks=(max(1, min(len(values), 1 << 16)),),
                           dimension_names=(SAMPLE,), attributes=attributes or {})
        arr = g[name]
        try:
            same = np.array_equal(np.asarray(arr[:], dtype=values.dtype), values)
        except Exception:  # noqa: BLE001 - an unreadable (corrupt) chunk: write it again
            same = False
        if not same:
            arr[:] = values

    def match(self, texts: list[str], paths: list[str] | None = None) -> list[str]:
        """Array paths named by store paths (features/..., targets/...) or selectors like t=90/b=5/p=2, among
        `paths` (default: every array of the store)."""
        if paths is None:
            paths, keys = self.array_paths(), self.feature_keys()
        else:
            keys = [FeatureKey.from_path(p) for p in paths if p.startswith("features/") and p.count("/") == 7]
        out = []
        for text in texts:
            if text.rstrip("/") in paths:
                out.append(text.rstrip("/"))
                continue
            if "=" not in text:
                check_path(text.rstrip("/"))  # '../x' is refused as what it is, not as a missing array
            try:
                found = [k.path for k in select(keys, text)] if "=" in text or text.startswith("features/") else []
            except ValueError as e:
                raise DiffstoreError(str(e)) from None
            if not found:
                raise DiffstoreError(f"no array in {self.url} matches {text!r}; `diffstore ls --store {self.url}` "
                                     "lists the keys (paths like features/... or selectors like t=90/b=5/p=2)")
            out += found
        return list(dict.fromkeys(out))

    def arrays(self) -> list[ShardedArray]:
        """Every sharded array (features and targets), in path order."""
        return [self.open_array(p) for p in self.array_paths()]

    def remove(self, path: str) -> None:
        """Delete the node at `path` and everything under it."""
        sync(self.zs.delete_dir(path))

    @contextlib.contextmanager
    def undo_if_unstarted(self, created: list[str]):
        """On a DiffstoreError (e.g. an undecodable image), remove the arrays in `created` of which no shard is
        done, and the store itself if this process created it and nothing else is in it."""
        try:
            yield
        except DiffstoreError:
            for path in created:
                if path.startswith("datasets/"):  # a split this run added: kept while an array still uses it
                    if self._group(path) is not None and not self.array_paths("features/" + path[len("datasets/"):]):
                        self.remove(path)
                        self.prune(path)
                elif self._group(path) is not None and not self.open_array(path).done_mask().any():
                    self.remove(path)
                    self.prune(path)
            if self.created_here and not self.array_paths():
                self.remove("")
            raise

    def prune(self, path: str) -> None:
        """Remove the groups above `path` (not the root) that hold nothing but their own zarr.json."""
        parent = path.rpartition("/")[0]
        while parent and not self.child_groups(parent):
            self.remove(parent)
            parent = parent.rpartition("/")[0]

    def remove_key(self, key: str) -> None:
        sync(self.zs.delete(key))

    # --- feature arrays ---------------------------------------------------------------------------
    def feature_keys(self) -> list[FeatureKey]:
        """Keys of every feature array. A path that is not a valid key (a name edited by hand, a stray folder) is
        left out and listed in `self.invalid`: it cannot hide the others, and `rm PATH` removes it."""
        keys, self.invalid = [], []
        for path in self.array_paths("features"):
            try:
                keys.append(FeatureKey.from_path(path))
            except BadName:
                self.invalid.append(path)
        return sorted(keys, key=lambda k: (k.dataset, k.split, k.model, k.input, k.t, k.block, k.pool))

    def features(self, key: FeatureKey) -> ShardedArray:
        if self._group(key.path) is None:
            known = [k.path for k in self.feature_keys()]
            close = difflib.get_close_matches(key.path, known, n=3, cutoff=0.5)
            hint = ("closest: " + ", ".join(close) if close
                    else f"the store holds {len(known)} arrays (`diffstore ls`)")
            raise DiffstoreError(f"{key.path} is not in {self.url}; {hint}")
        return self.open_array(key.path)
