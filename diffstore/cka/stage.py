"""The `diffstore cka` stage: pick feature arrays from a store, check they cover the same samples, compute
the CKA matrix (math.py; unbiased by default), store it with store.put_result("cka", ...); cka_command also
writes JSON + a PNG heatmap (report.py) and prints it.

Two ways to choose arrays:
    --by block|t|pool     one axis varies, the other key fields are fixed by --t/--block/--pool/--model/...;
                          a field left out defaults to the only value the store holds (else: an error
                          listing the values); the split defaults to test when the store holds several.
                          With --store-b the columns come from the second store.
    --a KEYSET [--b KEYSET]  explicit keys, "t=90/b=5/p=2,model=NAME/t=10/b=5/p=2"; --b may read --store-b.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import DiffstoreError, require
from ..key import FeatureKey, check_name, parse_selector
from ..options import api, check_folder, spell
from ..progress import progress, write_csv
from ..store import ShardedArray, Store
from .math import CKAConfig, bias_floor, cka_matrix, width
from .options import CKAOptions
from .report import draw, label, render

FIELDS = ("dataset", "split", "model", "input", "t", "block", "pool")


def as_filter(value) -> set | None:
    """An option's value as a key filter: None (no filter), or the set of values allowed."""
    if value is None:
        return None
    return set(value) if isinstance(value, tuple) else {value}


def parse_keyset(spec: str) -> list[dict]:
    """'t=90/b=5/p=2,model=ddpm/t=10/b=5/p=2' -> [{"t": 90, "block": 5, "pool": "2"}, ...] (key.py's selectors)."""
    try:
        out = [parse_selector(item) for item in spec.split(",") if item.strip()]
    except ValueError as e:
        raise DiffstoreError(f"bad key set {spec!r}: {e}") from None
    if not out:
        raise DiffstoreError(f"empty key set {spec!r}: pass e.g. --a t=90/b=5/p=2")
    return out


def axis_order(field: str, value):
    return (value == "full", int(value) if value != "full" else 0) if field == "pool" else value


def select(store: Store, keys: list[FeatureKey], want: dict, free: str | None) -> list[FeatureKey]:
    """Keys matching `want` ({field: set}); every field except `free` must then have one value."""
    matches = [k for k in keys if all(getattr(k, f) in vals for f, vals in want.items() if vals is not None)]
    asked = ", ".join(f"{f}={','.join(map(str, sorted(v, key=str)))}"
                      for f, v in want.items() if v is not None) or "(no filter)"
    if not matches:
        held = "; ".join(f"{f}: {', '.join(map(str, sorted({getattr(k, f) for k in keys}, key=str)))}" for f in FIELDS)
        raise DiffstoreError(f"no feature array in {store.url} matches {asked}. "
                             + (f"The store holds {held}" if keys else "It is empty: run `diffstore extract` first"))
    for f in FIELDS:
        values = sorted({getattr(k, f) for k in matches}, key=lambda v: axis_order(f, v))
        if f != free and len(values) > 1:
            raise DiffstoreError(f"{store.url} holds several {f} values for {asked}: {', '.join(map(str, values))}. "
                                 f"Pick one with --{f} (or {f}= in a key set)")
    return sorted(matches, key=lambda k: axis_order(free, getattr(k, free)) if free else 0)


def check_same_samples(entries: list[tuple[Store, ShardedArray]]) -> dict:
    """Refuse to compare arrays over different samples: same dataset, split, source and the same ids in the
    same order. Preprocessing may differ, so a network with another input size (a 224-px CNN brought in
    through a py: plugin) compares with the diffusion features of the same images."""
    sets = {}
    for store, arr in entries:
        source = {k: v for k, v in arr.attrs.get("dataset", {}).get("source", {}).items() if k != "root"}
        group = json.dumps([arr.key.dataset, arr.key.split, source], sort_keys=True)
        sets.setdefault(group, []).append(f"{store.url}:{arr.path}")
    if len(sets) > 1:
        groups = "\n  ".join(f"{', '.join(paths[:3])}{' ...' if len(paths) > 3 else ''}" for paths in sets.values())
        raise DiffstoreError("these arrays cover different sample sets (dataset, split or source differ), so CKA "
                             f"between them is meaningless:\n  {groups}\nCompare features extracted "
                             "from the same dataset split")
    # The stored ids decide: the same images in the same order.
    splits = {}
    for store, arr in entries:
        where = (store.url, arr.key.dataset, arr.key.split)
        if where not in splits:
            splits[where] = store.split(arr.key.dataset, arr.key.split)
    (first_url, *_), first = next(iter(splits.items()))
    for (url, dataset, split), rec in splits.items():
        if rec.ids_sha256 != first.ids_sha256 or not np.array_equal(rec.ids, first.ids):
            raise DiffstoreError(f"{url} stores {dataset}/{split} with other sample ids than {first_url}: "
                                 "extract both stores from the same dataset split (same ids in the same order)")
    return {"dataset_fingerprints": sorted({arr.attrs["recipe"]["dataset_fingerprint"] for _, arr in entries}),
            "ids_sha256": first.ids_sha256}


def varying_fields(keys: list[FeatureKey]) -> list[str]:
    return [f for f in FIELDS if len({getattr(k, f) for k in keys}) > 1]


def choose(store: Store, store_b: Store | None, by: str | None, a: str | None, b: str | None, filters: dict):
    """(row keys from `store`, column store, column keys): what the matrix compares."""
    if by:
        if a or b:
            raise DiffstoreError("pass either --by or --a/--b, not both")
        rows = select(store, store.feature_keys(), filters, by)
        if store_b is None:
            return rows, store, rows
        return rows, store_b, select(store_b, store_b.feature_keys(), filters, by)
    if not a:
        raise DiffstoreError("say what to compare: --by block|t|pool, or --a KEYSET [--b KEYSET]")

    def resolve(s: Store, spec: str) -> list[FeatureKey]:
        keys = s.feature_keys()
        return [select(s, keys, {**filters, **{f: {v} for f, v in item.items()}}, None)[0]
                for item in parse_keyset(spec)]

    rows = resolve(store, a)
    col_store = store_b or store
    return rows, col_store, resolve(col_store, b) if b else (rows if store_b is None else resolve(col_store, a))


def result_name(by: str | None, rows: list[FeatureKey], cols: list[FeatureKey], method: str, stores: list[str]) -> str:
    if by and rows == cols and len(stores) == 1:
        k = rows[0]
        fixed = "_".join(f"{short}{getattr(k, f)}" for f, short in (("t", "t"), ("block", "b"), ("pool", "p"))
                         if f != by)
        return f"{k.dataset}-{k.split}-{k.model}-{k.input}_by-{by}_{fixed}_{method}"
    pairs = json.dumps([stores, [k.path for k in rows], [k.path for k in cols]])
    digest = hashlib.sha256(pairs.encode()).hexdigest()[:10]
    return f"pairs-{digest}_{method}"


class RowPrefix:
    """The first `n` rows of an array-like, read lazily (--limit)."""

    def __init__(self, x, n: int):
        self.x, self.shape, self.dtype = x, (min(n, x.shape[0]), *x.shape[1:]), x.dtype

    def __getitem__(self, rows: slice):
        start, stop, _ = rows.indices(self.shape[0])
        return self.x[start:stop]


def default_split(store: Store, filters: dict) -> dict:
    """No --split and the store holds several: compare on test (held-out images, and the split every
    dataset has). One split: that one."""
    if filters.get("split") is None:
        splits = {k.split for k in store.feature_keys()}
        if len(splits) > 1 and "test" in splits:
            return {**filters, "split": {"test"}}
    return filters


def bias_warning(payload: dict, dims: list[int], command: str) -> str | None:
    """The full-batch estimate with N not much larger than D: say how large its floor is and how to avoid it."""
    if payload["method"] != "exact":
        return None
    floor = bias_floor(payload["n"], min(dims), min(dims))
    if floor < 0.05:
        return None
    return ("warning: exact (full-batch) CKA is biased upwards when N is not much larger than D: "
            f"with N={payload['n']} and D={min(dims)}, two independent arrays would score about {floor:.2f}. "
            f"For values that mean what they say, run: {command} --method unbiased")


def compute(o: CKAOptions) -> dict:
    """One CKA matrix from the store(s), stored under results/cka/ (save=True), its heatmap written under `plot`
    in each of `plot_format`; returns its payload (matrix, row and column keys with labels, estimator, N, sample
    fingerprints). Nothing is printed."""
    by, a, b, limit, workers, scheduler = o.by, o.a, o.b, o.limit, o.workers, o.scheduler
    store, store_b, name, save, show_progress = o.store, o.store_b, o.name, o.save, o.show_progress
    check_folder(o, "plot", "out")
    if o.plot:  # refused before any work: a missing extra, no format
        require("matplotlib", "plots")
        if not o.plot_format:
            raise DiffstoreError(f"{spell('plot_format', CKAOptions)} needs a format: png, pdf or svg")
    if o.name is not None:
        check_name("result", o.name)
    cfg = CKAConfig(method=o.method, kernel=o.kernel, batch_size=o.batch_size, seed=o.seed, sigma_frac=o.sigma_frac)
    if limit and (workers or scheduler):
        raise DiffstoreError("--limit is not supported on a dask cluster yet: drop --limit or --workers/--scheduler")
    filters = {f: as_filter(getattr(o, f)) for f in FIELDS}
    st = Store.open(store, mode="r")
    st_b = Store.open(store_b, mode="r") if store_b else None
    row_keys, col_store, col_keys = choose(st, st_b, by, a, b, default_split(st, filters))
    row_arrays = [st.features(k).require_done(limit) for k in row_keys]
    col_arrays = row_arrays if (col_store is st and col_keys == row_keys) else \
        [col_store.features(k).require_done(limit) for k in col_keys]
    samples = check_same_samples([(st, arr) for arr in row_arrays] + [(col_store, arr) for arr in col_arrays])

    # An array in both rows and columns is passed as the same object, so cka_matrix reads it once.
    # ShardedArray: checked reads (checksums, NaN rows)
    view = (lambda x: RowPrefix(x, limit)) if limit else (lambda x: x)
    xs_rows = {arr.path: view(arr) for arr in row_arrays}
    xs_cols = [xs_rows[arr.path] if col_store is st and arr.path in xs_rows else view(arr) for arr in col_arrays]
    n = min(row_arrays[0].n_rows, limit or row_arrays[0].n_rows)
    started = time.perf_counter()
    if workers or scheduler:  # tiles of the matrix on a dask cluster
        from .distributed import cka_distributed

        result = cka_distributed([(st.url, k) for k in row_keys], [(col_store.url, k) for k in col_keys], cfg,
                                 workers=workers, scheduler=scheduler, show_progress=show_progress)
    else:
        with progress("row", disable=not show_progress) as bar:
            on = ", ".join(dict.fromkeys(f"{k.dataset}/{k.split} {k.model}" for k in row_keys + col_keys))
            task = bar.add_task(f"CKA {len(row_keys)}x{len(col_keys)} on {on}", total=n)
            result = cka_matrix(list(xs_rows.values()), xs_cols, cfg, on_rows=lambda k: bar.advance(task, k))
    seconds = time.perf_counter() - started

    def describe(s: Store, keys, arrays):
        vary = [by] if by else varying_fields(keys) or []
        return [{"store": s.url, "key": k.to_dict(), "short": k.short(), "label": label(k, arr, vary),
                 "tick": label(k, None, vary), "block_name": arr.attrs.get("block", {}).get("name"),
                 "width": width(arr.x)} for k, arr in zip(keys, arrays)]

    # Title: the fixed key fields users choose between (dataset, split and input are in the name and JSON).
    fixed = {f: getattr(row_keys[0], f) for f in ("split", "model", "t", "block", "pool")
             if f not in varying_fields(row_keys + col_keys)}
    if "block" in fixed:  # by name too, as on the axes
        fixed["block"] = label(row_keys[0], row_arrays[0], ["block"]).removeprefix("b")
    urls = sorted({st.url, col_store.url})
    payload = {
        "name": (name or result_name(by, row_keys, col_keys, f"{result.method}-{cfg.kernel}", urls)
                 + (f"_first{limit}" if limit else "")),
        "title": (f"by {by}, " if by else "") + " ".join(f"{f}={v}" for f, v in fixed.items()),
        "by": by, "rows": describe(st, row_keys, row_arrays), "cols": describe(col_store, col_keys, col_arrays),
        "matrix": [[None if np.isnan(v) else float(v) for v in row] for row in result.matrix],
        "method": result.method, "kernel": cfg.kernel,
        "batch_size": cfg.batch_size if result.method == "minibatch" else None,
        "seed": cfg.seed if result.method == "minibatch" else None,
        "sigma_frac": cfg.sigma_frac if cfg.kernel == "rbf" else None,
        "n": n, "n_used": result.n_used, "limit": limit, **samples, "stores": urls, "seconds": round(seconds, 3),
    }
    if save:
        Store.open(store, mode="a").put_result("cka", payload["name"], payload)
    if o.plot:
        draw(payload, Path(o.plot) / payload["name"], o.plot_format, o.dpi)
    return payload


def cka_command(o: CKAOptions, fmt: str | None = None, command: str = "diffstore cka") -> dict:
    """`diffstore cka`: compute() (which writes the heatmap, --plot), then write JSON (--out) and print the matrix
    (or the payload as JSON, or the matrix as CSV). A biased estimate on few rows prints a warning naming the
    command that avoids it."""
    payload = compute(o)
    if o.out:
        Path(o.out).mkdir(parents=True, exist_ok=True)
        (Path(o.out) / f"{payload['name']}.json").write_text(json.dumps(payload, indent=1))
    warning = bias_warning(payload, [e["width"] for e in payload["rows"] + payload["cols"]], command)
    if warning:
        print(warning, file=sys.stderr)
    if fmt == "json":
        print(json.dumps(payload))
    elif fmt == "csv":
        cols = [c["label"] for c in payload["cols"]]
        write_csv([{"": r["label"], **dict(zip(cols, row))} for r, row in zip(payload["rows"], payload["matrix"])],
                  ["", *cols])
    else:
        render(payload)
    return payload


def labelled(payload: dict):
    """A CKA payload as a labelled xarray.DataArray: dims (row, col), labels as coordinates with each side's key
    fields (t, block, block_name, pool, model, ...); estimator, N and the sample fingerprints in attrs."""
    xr = require("xarray", "xarray")
    coords = {}
    for dim, side in (("row", payload["rows"]), ("col", payload["cols"])):
        coords[dim] = [e["label"] for e in side]
        for field in FIELDS:
            coords[f"{dim}_{field}"] = (dim, [e["key"][field] for e in side])
        coords[f"{dim}_block_name"] = (dim, [e.get("block_name") or "" for e in side])
    attrs = {k: v for k, v in payload.items() if k not in ("rows", "cols", "matrix") and v is not None
             and not isinstance(v, (dict, list))}
    matrix = np.array([[np.nan if v is None else v for v in row] for row in payload["matrix"]], dtype=float)
    return xr.DataArray(matrix, dims=("row", "col"), coords=coords, name=payload["name"], attrs=attrs)


def cka(o: CKAOptions):
    """Linear (or RBF) CKA between stored feature arrays, stored under results/cka/; returns the matrix as a
    labelled xarray.DataArray (dims row, col; .to_pandas() gives a DataFrame). Nothing is printed."""
    return labelled(compute(o))


cka = api(CKAOptions)(cka)  # noqa: F811 - the API function: the signature and help of CKAOptions
