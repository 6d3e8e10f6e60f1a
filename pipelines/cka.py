"""`make cka`: CKA heatmaps (PNG) and matrices (JSON) for a store, extracting the default store first if needed.

For each (model, input) of one split of the store:
    block x block   at every (t, pool)          (the paper's Figure 6 axes)
    t x t           at every (block, pool)
    pool x pool     at every (t, block)         (only with --axes block,t,pool)
(default split: test, as `diffstore cka`).
An axis with a single value is skipped. Each matrix is also stored in the store (results/cka/...).
Unbiased linear CKA on all rows by default (diffstore/cka/math.py); --method exact gives the full-batch value,
inflated when N is not much larger than D, and minibatch the streaming estimator for very wide features.

    python pipelines/cka.py --store data/default.zarr --out data/cka [--split train] \\
        [--method unbiased|exact|minibatch|auto]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from itertools import groupby
from pathlib import Path

from diffstore.cka.options import CKAOptions
from diffstore.cka.stage import cka_command
from diffstore.errors import DiffstoreError
from diffstore.store import Store

GROUP = ("dataset", "split", "model", "input")
FIXED = {"block": ("t", "pool"), "t": ("block", "pool"), "pool": ("t", "block")}  # axis -> fields held fixed


def ensure_store(url: str) -> Store:
    """Open the store; when it is missing or holds no features, run `diffstore extract` on it first."""
    try:
        store = Store.open(url, mode="r")
        if store.feature_keys():
            return store
    except DiffstoreError:
        pass
    print(f"{url} has no features yet: running `diffstore extract --store {url}`", file=sys.stderr)
    done = subprocess.run([str(Path(sys.executable).with_name("diffstore")), "extract", "--store", url])
    if done.returncode:
        raise DiffstoreError(f"`diffstore extract --store {url}` failed (exit {done.returncode}, its message is "
                             "above); fix that, or pass --store with an extracted store")
    return Store.open(url, mode="r")


def grids(keys: list, axes: list[str]) -> list[dict]:
    """cka_command arguments for every matrix: one per axis and per combination of the fixed fields."""
    out = []
    for group, members in groupby(keys, key=lambda k: tuple(getattr(k, f) for f in GROUP)):
        members = list(members)
        for axis in axes:
            for values in sorted({tuple(getattr(k, f) for f in FIXED[axis]) for k in members}):
                along = {getattr(k, axis) for k in members if tuple(getattr(k, f) for f in FIXED[axis]) == values}
                if len(along) > 1:
                    dataset, split, model, input_mode = group
                    out.append({"by": axis, "dataset": dataset, "split": split, "model": model,
                                "input": input_mode, **dict(zip(FIXED[axis], values))})
    return out


def pick_split(store: Store, split: str | None) -> list:
    """The feature keys of one split: the one asked for, else "test" when present (as `diffstore cka`), else
    the first."""
    keys = store.feature_keys()
    splits = sorted({k.split for k in keys})
    split = split or ("test" if "test" in splits else splits[0])
    if split not in splits:
        raise DiffstoreError(f"{store.url} has no features for split {split!r}: choose one of {', '.join(splits)}")
    return [k for k in keys if k.split == split]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="data/default.zarr", help="store path or URL")
    ap.add_argument("--out", default="data/cka", help="folder for the JSON matrices and PNG heatmaps")
    ap.add_argument("--split", default=None, help="split to compare on (default: test when present)")
    ap.add_argument("--axes", default="block,t", help="comma list of block, t, pool")
    ap.add_argument("--method", default="unbiased", choices=("unbiased", "exact", "minibatch", "auto"),
                    help="CKA estimator (see `diffstore cka --help`)")
    ap.add_argument("--batch-size", type=int, default=256, help="minibatch size (minibatch method)")
    ap.add_argument("--seed", type=int, default=0, help="sample-order seed (minibatch method)")
    args = ap.parse_args()
    try:
        store = ensure_store(args.store)
        axes = [a.strip() for a in args.axes.split(",") if a.strip()]
        if unknown := set(axes) - set(FIXED):
            raise DiffstoreError(f"--axes takes block, t and pool, got {', '.join(sorted(unknown))}")
        todo = grids(pick_split(store, args.split), axes)
        if not todo:
            raise DiffstoreError(f"{args.store} has a single array per model: extract several blocks, t or pools "
                                 "(e.g. `diffstore extract --blocks all --t 10,50,90`) to compare them")
        for spec in todo:
            cka_command(CKAOptions.build(store=args.store, **spec, method=args.method, batch_size=args.batch_size,
                                         seed=args.seed, out=args.out, plot=args.out))
    except DiffstoreError as e:
        sys.exit(f"error: {e}")
    print(f"{len(todo)} CKA matrices: JSON + PNG in {args.out}/, also under results/cka in {args.store}")


if __name__ == "__main__":
    main()
