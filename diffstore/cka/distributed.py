"""CKA on a dask cluster (`diffstore cka --workers N` or `--scheduler`): the matrix is cut into tiles, each one
cka_matrix call on a worker that opens the arrays by (store URL, key) and reads them through the checked reader;
the tiles gather into the same matrix as the single-machine path."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ..key import FeatureKey
from ..scale import cluster_client, run_all, worker_url
from ..store import Store
from .math import CKAConfig, CKAResult, cka_matrix, exact_gib


def cka_tile(rows: list[tuple[str, FeatureKey]], cols: list[tuple[str, FeatureKey]] | None, cfg):
    """On a worker: cka_matrix over one tile; an array named twice is opened (and read) once."""
    stores, arrays = {}, {}

    def x(url: str, key: FeatureKey):
        if url not in stores:
            stores[url] = Store.open(url, "r")
        if (url, key) not in arrays:
            arrays[(url, key)] = stores[url].features(key)  # checked reads
        return arrays[(url, key)]

    return cka_matrix([x(*r) for r in rows], None if cols is None else [x(*c) for c in cols], cfg)


def resolve_method(rows: list, cols: list, cfg):
    """'auto' resolved over the whole matrix, as cka_matrix would in-process, so every tile runs one estimator."""
    if cfg.method != "auto":
        return cfg
    names = list(dict.fromkeys([*rows, *cols]))
    stores = {url: Store.open(url, "r") for url, _ in names}
    arrays = [stores[url].features(key) for url, key in names]
    pairs = sorted({tuple(sorted((names.index(r), names.index(c)))) for r in rows for c in cols})
    fits = cfg.kernel == "linear" and exact_gib(arrays, pairs, cfg.chunk_rows) <= cfg.max_gram_gib
    return replace(cfg, method="exact" if fits else "minibatch")


def cka_distributed(rows: list[tuple[str, FeatureKey]], cols: list[tuple[str, FeatureKey]] | None = None, cfg=None,
                    workers: int | None = None, scheduler: str | None = None, tile: int | None = None,
                    show_progress: bool = True, client=None):
    """cka.cka_matrix over arrays named by (store URL, key), split into tiles of the matrix computed on a cluster.

    cols=None (or cols == rows): the symmetric matrix, only tiles on and above the diagonal. A tile reads its
    arrays once; tile (rows per side) defaults to giving every worker thread at least one tile.
    """
    symmetric = cols is None or cols == rows
    rows = [(worker_url(url), key) for url, key in rows]
    cols = rows if symmetric else [(worker_url(url), key) for url, key in cols]
    cfg = resolve_method(rows, cols, cfg or CKAConfig())
    with cluster_client(workers, scheduler, client) as client:
        threads = sum(client.nthreads().values())
        k = 1
        while (k * (k + 1) // 2 if symmetric else k * k) < threads and k < max(len(rows), len(cols)):
            k += 1
        size = tile or math.ceil(max(len(rows), len(cols)) / k)
        r_parts = [range(a, min(a + size, len(rows))) for a in range(0, len(rows), size)]
        c_parts = [range(a, min(a + size, len(cols))) for a in range(0, len(cols), size)]
        tiles = [(i, j) for i in range(len(r_parts)) for j in range(len(c_parts)) if not (symmetric and j < i)]
        calls = [([rows[a] for a in r_parts[i]], None if symmetric and i == j else [cols[b] for b in c_parts[j]], cfg)
                 for i, j in tiles]
        names = [f"tile rows {r_parts[i][0]}-{r_parts[i][-1]} x cols {c_parts[j][0]}-{c_parts[j][-1]}"
                 for i, j in tiles]
        on = ", ".join(dict.fromkeys(f"{key.dataset}/{key.split} {key.model}" for _, key in rows + cols))
        done = run_all(client, cka_tile, calls, names, f"CKA of {on}", "tile", [1] * len(calls), show_progress)
    out = np.empty((len(rows), len(cols)))
    for (i, j), result in zip(tiles, done):
        out[np.ix_(r_parts[i], c_parts[j])] = result.matrix
        if symmetric:
            out[np.ix_(c_parts[j], r_parts[i])] = result.matrix.T
    return CKAResult(out, done[0].method, done[0].n_used)
