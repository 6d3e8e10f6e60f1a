"""Exact vs streaming-minibatch linear CKA on N = 60,000 rows (Fashion-MNIST train size) read from a store.

For each D, two random float16 feature arrays X, Y ([N, C, p, p], Y correlated with X) are written to a
local diffstore store (the layout extract writes: row chunks, shards, zstd + crc32c), then:

    exact      cka_matrix([X, Y]) streamed in 4096-row chunks: float64 X^T X, Y^T Y, X^T Y accumulated in
               place by BLAS (memory O(D^2))
    minibatch  unbiased-HSIC minibatch CKA, n = 256 (memory O(n^2 + window rows x D))
    read       one pass reading both arrays from the store, no arithmetic (the I/O + decode floor)
    limit      the matrix products alone on float64 chunks already in memory: for exact the three D x D
               products over all N rows, for minibatch the two n x n Grams of every batch: the best of
               `--limit-reps` timed chunks (batches), scaled linearly to N (product time is linear in rows).

Peak memory is the growth of the process's resident set (sampled every 2 ms from /proc/self/statm, Linux)
over its level before each run: everything counted (numpy, zarr buffers, BLAS), nothing traced, so the
timings are not slowed (tracemalloc slowed zarr's many small allocations several-fold).
Usage: python bench/bench_cka.py [--n 60000] [--dims 64,1024,4096] [--batch-size 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import threading
import time

import numpy as np
from threadpoolctl import threadpool_limits
from timing import best_of

from diffstore.cka import CKAConfig, accumulate, cka_matrix, rows_of
from diffstore.store import Store

ROW_SHAPES = {64: (16, 2, 2), 1024: (64, 4, 4), 4096: (256, 4, 4)}  # [C, p, p] like pooled U-Net blocks


def make_arrays(store: Store, n: int, d: int, shard_rows: int = 256):
    """Two float16 arrays X and Y = 0.6 X + noise, written shard by shard (never all of X in memory)."""
    shape = ROW_SHAPES.get(d, (d,))
    rng = np.random.default_rng(d)
    xs = [store.create(f"bench/d{d}/{name}", name, {}, shape, n, shard_rows, "float16") for name in ("x", "y")]
    for i in range(xs[0].n_shards):
        sl = xs[0].shard_slice(i)
        x = rng.standard_normal((sl.stop - sl.start, *shape), dtype=np.float32)
        xs[0].write_shard(i, x)
        xs[1].write_shard(i, 0.6 * x + rng.standard_normal(x.shape, dtype=np.float32))
    return [a.x for a in xs]


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measured(fn):
    """(result, seconds, peak MiB above the starting resident set) of fn()."""
    start, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.wait(0.002):
            peak[0] = max(peak[0], rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    return out, seconds, max(peak[0] - start, 0) / 2**20


def read_all(arrays, chunk: int) -> None:
    for a in range(0, arrays[0].shape[0], chunk):
        for x in arrays:
            np.asarray(x[a:a + chunk])


def exact_limit(arrays, cfg: CKAConfig, k: int) -> float:
    """Seconds of X^T X, Y^T Y, X^T Y (syrk, syrk, gemm) over N rows: best of k in-memory float64 chunks, scaled."""
    rows = min(cfg.chunk_rows, arrays[0].shape[0])
    z = [rows_of(x, 0, rows) for x in arrays]
    g = [np.zeros((z[i].shape[1], z[j].shape[1]), order="F") for i, j in ((0, 0), (1, 1), (0, 1))]

    def step():
        accumulate(g[0], z[0], z[0]), accumulate(g[1], z[1], z[1]), accumulate(g[2], z[0], z[1])

    return best_of(step, k) * arrays[0].shape[0] / rows


def minibatch_limit(arrays, cfg: CKAConfig, k: int) -> float:
    """Seconds of the two n x n Grams per batch over N // n batches: best of k in-memory batches, scaled."""
    z = [rows_of(x, 0, cfg.batch_size) for x in arrays]
    return best_of(lambda: (z[0] @ z[0].T, z[1] @ z[1].T), k) * (arrays[0].shape[0] // cfg.batch_size)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60_000)
    ap.add_argument("--dims", default="64,1024,4096")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--limit-reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="BLAS threads (default: the library's own choice)")
    args = ap.parse_args()
    with threadpool_limits(args.threads):
        run(args)


def run(args):
    exact_cfg = CKAConfig(method="exact", chunk_rows=4096)
    mini_cfg = CKAConfig(method="minibatch", batch_size=args.batch_size)
    print(f"N = {args.n}, float16 rows in a local diffstore store; float64 arithmetic; "
          f"BLAS threads: {args.threads or 'default'}")
    print(f"{'D':>5} {'method':>9} {'wall s':>8} {'limit s':>8} {'wall/limit':>10} {'read s':>7} "
          f"{'wall/(read+limit)':>17} {'peak MiB':>9} {'CKA':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(f"{tmp}/bench.zarr", mode="a")
        for d in (int(v) for v in args.dims.split(",")):
            t0 = time.perf_counter()
            arrays = make_arrays(store, args.n, d)
            write_s = time.perf_counter() - t0
            _, read_s, _ = measured(lambda: read_all(arrays, exact_cfg.chunk_rows))
            for cfg, limit in ((exact_cfg, exact_limit), (mini_cfg, minibatch_limit)):
                res, wall, peak = measured(lambda: cka_matrix(arrays, cfg=cfg))
                lim = limit(arrays, cfg, args.limit_reps if cfg.method == "exact" else 10 * args.limit_reps)
                print(f"{d:>5} {cfg.method:>9} {wall:8.2f} {lim:8.2f} {wall / lim:10.2f} {read_s:7.2f} "
                      f"{wall / (read_s + lim):17.2f} {peak:9.1f} {res.matrix[0, 1]:7.4f}", flush=True)
            print(f"{'':>5} (writing the two arrays took {write_s:.1f} s; "
                  f"{2 * args.n * d * 2 / 2**20:.0f} MiB of float16 rows)", flush=True)
    print(f"max RSS of the whole run: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
