"""Where a probe's rows come from: a stored key with its test twin, several keys fused, or raw pixels; and which
train keys match the probe's filters (--dataset/--model/--input/--t/--blocks/--pools)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

import numpy as np

from ..datasets import stored_split
from ..errors import DiffstoreError
from ..key import FeatureKey, fingerprint
from ..key import select as match_selector
from ..preprocess import Preprocess
from ..store import Store
from ..views import view_name, view_set
from .feed import Rows, first_rows, fuse_rows

ROW_FIELDS = ("dataset", "model", "input", "t", "block", "pool")


@dataclass
class Source:
    """The train and test rows one head reads, and the identity shown in the table and stored with results."""

    row: dict  # dataset, model, input, t, block, pool
    kind: str  # "store" | "fuse" | "pixels"
    keys: list[FeatureKey]  # train keys read (empty for pixels)
    fingerprints: list[str]  # what the values depend on: a changed array invalidates cached results
    train: Rows
    test: Rows
    fix: str  # how to get spatial maps, for heads that need them


def views_of(key: FeatureKey, augment: str) -> FeatureKey:
    """The key of `key`'s stored views (the split SPLIT+VIEWS that `extract --views` writes)."""
    return replace(key, split=view_name(key.split, augment))


def key_source(store: Store, key: FeatureKey, limit: int | None = None, augment: str | None = None) -> Source:
    """A train key and its test twin, both done on rows [0, limit); augment: train on the key's stored views
    (the split SPLIT+VIEWS that `extract --views` writes), every view of a sample a row."""
    views = 1
    if augment:
        views = len(view_set(augment))
        view_key = views_of(key, augment)
        if store._group(view_key.path) is None:
            raise DiffstoreError(f"--augment {augment}: {key.path} has no stored views {view_key.path}; extract them "
                                 f"with `{store.features(key).extract_hint()} --views {augment}`")
        key = view_key
    train = store.features(key).require_done(limit * views if limit else None)
    test_key = replace(key, split="test")
    try:
        store.features(test_key)
    except DiffstoreError:
        hint = train.extract_hint().replace(f"--split {key.split}", "--split test")
        raise DiffstoreError(f"{key.path} has no test twin {test_key.path}; extract it with:\n  {hint}") from None
    test = store.features(test_key).require_done(limit)
    row = {"dataset": key.dataset, "model": key.model, "input": key.input, "t": key.t, "block": key.block,
           "block_name": train.attrs.get("block", {}).get("name", str(key.block)), "pool": key.pool}
    fix = (f"Extract spatial maps with `{train.extract_hint('full')}` (and the same for "
           "--split test), or use a larger pool.")
    return Source(row, "store", [key], [train.attrs["fingerprint"], test.attrs["fingerprint"]],
                  first_rows(Rows.of(train), limit * views if limit else None), first_rows(Rows.of(test), limit), fix)


def with_views(store: Store, keys: list[FeatureKey], augment: str) -> tuple[list[FeatureKey], list[FeatureKey]]:
    """(keys whose views `augment` names are stored, keys without them). A store often holds views for some models
    only (the trained model's, not its twin's): those are probed, the rest named. None with views: key_source's
    refusal, which says how to extract them."""
    has = {k: store._group(views_of(k, augment).path) is not None for k in keys}
    if keys and not any(has.values()):
        key_source(store, keys[0], augment=augment)  # raises, naming the extraction
    return [k for k in keys if has[k]], [k for k in keys if not has[k]]


def joined(values: list) -> str:
    """One value when all agree, else all of them joined by '+' (a fused key's table cell)."""
    return str(values[0]) if len({str(v) for v in values}) == 1 else "+".join(map(str, values))


def fuse_source(sources: list[Source]) -> Source:
    """One source of several keys' features (same samples), channels concatenated (feed.fuse_rows)."""
    if len({s.row["dataset"] for s in sources}) > 1:
        raise DiffstoreError("--fuse needs keys of one dataset (the same samples): pass --dataset")
    row = {f: joined([s.row[f] for s in sources]) for f in (*ROW_FIELDS, "block_name")}
    return Source(row, "fuse", [k for s in sources for k in s.keys], [f for s in sources for f in s.fingerprints],
                  fuse_rows([s.train for s in sources]), fuse_rows([s.test for s in sources]), sources[0].fix)


def parse_fuse(spec: str, keys: list[FeatureKey]) -> list[FeatureKey]:
    """'t=90/b=5/p=2,t=150/b=6/p=2' (key.py selectors) -> one train key each, among `keys` (already filtered)."""
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        try:
            found = match_selector(keys, item)
        except ValueError as e:
            raise DiffstoreError(f"--fuse: {e}") from None
        if len(found) != 1:
            close = difflib.get_close_matches(item, sorted({k.short() for k in keys}), n=3, cutoff=0.3)
            why = ("no array" if not found
                   else f"{len(found)} arrays (add model=/input=/dataset= to the item to pick one)")
            raise DiffstoreError(f"--fuse {item}: {why} in the store matches; closest: {', '.join(close) or 'none'}")
        out.append(found[0])
    if len(out) < 2:
        raise DiffstoreError("--fuse needs at least two keys, e.g. t=90/b=5/p=2,t=150/b=6/p=2")
    return out


def pixel_source(store: Store, dataset: str, attrs: dict, data_root: str | None, limit: int | None = None) -> Source:
    """The raw images, preprocessed exactly as the features' extraction did (attrs['preprocess'])."""
    pre = Preprocess(**attrs["preprocess"])
    root = data_root  # the command line's (or the dataset's default location), never a folder the store names
    rows, fps = {}, []
    for split in ("train", "test"):
        record = store.split(dataset, split)
        data = stored_split(dataset, split, attrs.get("dataset", {}).get("source"), root)
        data = data.take(record.ids, "pass --data-root of the data it was extracted from")
        x = np.concatenate([pre(data.load(np.arange(i, min(i + 1024, len(data))))).numpy()
                            for i in range(0, len(data), 1024)])
        rows[split] = first_rows(Rows.of(x), limit)
        fps.append(fingerprint({"pixels": dataset, "split": split, "ids_sha256": record.ids_sha256,
                                "source": data.source, "preprocess": pre.to_dict()}))
    row = {"dataset": dataset, "model": "pixels", "input": "-", "t": "-", "block": "-", "block_name": "-",
           "pool": f"{pre.size}"}
    return Source(row, "pixels", [], fps, rows["train"], rows["test"], "")


def block_names(store: Store, keys: list[FeatureKey]) -> dict[FeatureKey, str]:
    """Each key's block name, as its array recorded it (the model's block table: 'mid', 'down1.0', ...)."""
    return {k: store.features(k).attrs.get("block", {}).get("name", str(k.block)) for k in keys}


def select_keys(store: Store, dataset=None, model=None, input=None, ts=None, blocks=None,
                pools=None) -> list[FeatureKey]:
    """Train keys matching the filters; a model filter also keeps its random-init twins (the baseline). Blocks
    are indices or the names `extract --blocks` accepts ('mid', 'down1.0')."""
    blocks, pools = (None if v is not None and tuple(v) == ("all",) else v for v in (blocks, pools))
    every = [k for k in store.feature_keys() if k.split == "train"]
    keys = [k for k in every if (dataset is None or k.dataset == dataset)
            and (model is None or k.model == model or k.model.startswith(f"{model}.random-init-"))
            and (input is None or k.input == input) and (ts is None or k.t in ts)
            and (pools is None or k.pool in pools)]
    if blocks is not None:
        names = block_names(store, keys)
        unknown = [b for b in blocks if not b.isdigit() and b not in names.values()]
        if unknown and keys:
            raise DiffstoreError(f"--blocks {','.join(unknown)}: no such block among the matching arrays; they hold "
                                 + ", ".join(f"{i} {n}" for i, n in sorted({(k.block, names[k]) for k in keys})))
        keys = [k for k in keys if str(k.block) in blocks or names[k] in blocks]
    if not keys:
        asked = {"dataset": dataset, "model": model, "input": input, "t": ts, "block": blocks, "pool": pools}
        given = {f: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v for f, v in asked.items()}
        want = "/".join(f"{f}={v}" for f, v in given.items() if v is not None)
        spell = lambda get: "/".join(f"{f}={get(f)}" for f in ROW_FIELDS)  # noqa: E731
        close = difflib.get_close_matches(spell(lambda f: given[f] or "*"),
                                          [spell(lambda f: getattr(k, f)) for k in every], n=3, cutoff=0.3)
        held = "; ".join(f"{f}: {', '.join(sorted({str(getattr(k, f)) for k in every}))}" for f in ROW_FIELDS)
        raise DiffstoreError(f"no train feature array in {store.url} matches {want or '(no filter)'}. "
                             + (f"Closest: {'; '.join(close)}. " if close else "")
                             + (f"The store holds {held}" if every
                                else "The store is empty: run `diffstore extract` first"))
    return keys
