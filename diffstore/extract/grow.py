"""Growing a split that an older diffstore stored as a prefix.

A split is its dataset's whole canonical order, and every array of it has a row per sample; `--limit N` and
`--rows A:B` compute only the shards holding those rows. Before that, `--limit N` stored the first N ids as the
split and N-row arrays whose dataset fingerprint recorded the limit. The first extraction that meets such a split
extends it in place, so old stores keep opening, reading and resuming:

    every array of the split   x and done resized to the whole split; the shard that held the last old rows (a
                               partial shard) is marked not done, so it is recomputed whole; the coordinates, the
                               fingerprint (the whole split's) and the layout are rewritten, the layout last
    the split                  ids and labels rewritten to the whole order, its attributes last

Each step is idempotent and an array counts as grown once its layout says so, so a run killed midway is finished by
the next one. Values do not change: a row's features are a function of its key, its sample id and the fixed
micro-batch partition from row 0, which a prefix shares with the whole split.
"""

from __future__ import annotations

import numpy as np
from zarr.core.sync import sync

from ..datasets import Split
from ..errors import DiffstoreError
from ..key import FeatureKey, Recipe
from ..preprocess import Preprocess
from ..store import Store
from ..store.attrs import checked_layout, checked_recipe
from ..store.labels import label_names


def stored_prefix(store: Store, split: Split) -> int | None:
    """The number of rows of a stored split whose ids are a strict prefix of `split`'s order, else None."""
    g = store._group(f"datasets/{split.name}/{split.split}")
    if g is None or g.attrs.get("ids_sha256") == split.ids_sha256():
        return None
    ids = store.split(split.name, split.split).ids  # checked: a corrupt ids chunk names repair
    n = len(ids)
    return n if n < len(split) and np.array_equal(split.ids[:n], ids) else None


def grow_array(store: Store, path: str, split: Split) -> None:
    """Resize one array of the split to the whole split (see the module docstring)."""
    g = store._group(path)
    attrs = dict(g.attrs)
    if "layout" not in attrs:
        raise DiffstoreError(f"{path} was written by an old diffstore (store format 1) for the first rows of the split "
                             f"only, and cannot grow: remove it with `diffstore rm --store {store.url} {path}` and "
                             "extract it again")
    layout = checked_layout(attrs["layout"], path)
    n, old, shard_rows = len(split), layout["n_rows"], layout["shard_rows"]
    if old >= n:
        return
    x, done = g["x"], g["done"]
    x.resize((n, *x.shape[1:]))
    done.resize((-(-n // shard_rows),))
    for name, values in (("sample", split.ids), ("label", split.labels),
                         ("label_name", label_names(split.labels, split.class_names))):
        if name in g:
            g[name].resize((n,))
            g[name][:] = values
    if old % shard_rows:  # the old last shard held fewer rows than a shard: computed again, whole
        i = old // shard_rows
        done[i] = 0
        sync(x.store_path.store.delete(f"{x.path}/c/{i}" + "/0" * (x.ndim - 1)))
    recipe = checked_recipe(attrs, path).to_dict()
    recipe["dataset_fingerprint"] = split.fingerprint(Preprocess(**attrs["preprocess"]))
    key = FeatureKey.from_path(path)
    dataset = attrs.get("dataset", {})
    g.attrs.update({"recipe": recipe, "fingerprint": Recipe.from_dict(recipe).fingerprint(key),
                    "dataset": {**dataset, "source": split.source}, "layout": {**layout, "n_rows": n}})


def grow_split(store: Store, split: Split) -> list[str]:
    """Extend a split stored as a prefix of `split` (and every array of it) to the whole split; returns the arrays
    grown. A split holding other ids is left alone (Store.check_split refuses it)."""
    if stored_prefix(store, split) is None:
        return []
    base = f"features/{split.name}/{split.split}"
    grown = store.array_paths(base)
    for path in grown:
        grow_array(store, path, split)
    g = store._group(f"datasets/{split.name}/{split.split}")
    for name, values in (("ids", split.ids), ("labels", split.labels)):
        g[name].resize((len(values),))
        g[name][:] = values
    g.attrs.update(store.split_attrs(split))
    return grown
