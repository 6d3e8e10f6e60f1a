"""A converged linear probe on a key larger than the memory budget: time per L-BFGS pass and peak memory.

Writes a synthetic float16 key of --key-gb (default 3 x --memory-gb: 0.75 GB at the default 0.25 GB budget) of
[N, 16, 2, 2] rows (10 classes: class means plus Gaussian noise), in the layout extract writes for --micro-batch,
and a test key a tenth its size. Then, in this process:
  solve    solve_many at budget --memory-gb (the rows do not fit: every pass streams them from the store), on one
           C (the grid is another matter; the pass is what is measured), to convergence; every objective
           evaluation, i.e. one pass over the fit rows, is timed. Peak RSS (ru_maxrss) after it.
  read     one pass of the same design's blocks read from the store, nothing computed (Feed.batches: shards read
           and decoded into float32, batched)
  pass     one streamed pass (objective on the streaming design)
  compute  one pass of the same computation (Design.prepared + objective) on those blocks held in RAM
           (the three take turns, twice; best of each)
Goals: a pass <= 1.5 x max(read, compute) (the next group is read while the current one is computed on), and
peak RSS <= budget + 1 GB.

Usage: python bench/bench_stream.py [--memory-gb 0.25] [--key-gb 0.75] [--micro-batch 16] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from diffstore.extract.plan import default_shard_rows
from diffstore.probe import solve
from diffstore.probe.feed import Rows, split_val
from diffstore.probe.recipe import ProbeRecipe
from diffstore.progress import stderr
from diffstore.store import Store

ROW = (16, 2, 2)
CLASSES = 10


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def write_key(url: str, path: str, n: int, shard_rows: int, seed: int) -> tuple:
    """Rows x = means[y] + noise (float16), written shard by shard (4 writers), and the labels y."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(0).standard_normal((CLASSES, *ROW)).astype(np.float32) * 0.3
    y = rng.integers(0, CLASSES, n)
    a = Store.open(url).create(path, "bench", {}, ROW, n, shard_rows)

    def shard(i):
        sl = a.shard_slice(i)
        noise = np.random.default_rng([seed, i]).standard_normal((sl.stop - sl.start, *ROW), dtype=np.float32)
        a.write_shard(i, (means[y[sl]] + noise).astype(np.float16))

    with ThreadPoolExecutor(4) as ex:
        list(ex.map(shard, range(a.n_shards)))
    return Store.open(url, "r").open_array(path), y


class Timed:
    """solve.objective with every call's seconds recorded."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, []

    def __call__(self, *args, **kw):
        t0 = time.perf_counter()
        out = self.fn(*args, **kw)
        self.seconds.append(time.perf_counter() - t0)
        return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory-gb", type=float, default=0.25)
    ap.add_argument("--key-gb", type=float, default=None, help="default: 3 x --memory-gb")
    ap.add_argument("--micro-batch", type=int, default=16, help="extract's micro-batch, which sets the shard rows")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (with other jobs on the cores, more than "
                                                          "one makes every op wait for descheduled threads)")
    ap.add_argument("--quick", action="store_true", help="--memory-gb 0.05 (a 0.15 GB key)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    budget_gb = 0.05 if args.quick else args.memory_gb
    key_gb = args.key_gb or 3 * budget_gb
    budget, row_bytes = int(budget_gb * 2**30), int(np.prod(ROW)) * 2
    n = int(key_gb * 2**30) // row_bytes
    shard_rows = default_shard_rows(int(np.prod(ROW)) * 4, args.micro_batch)
    out = {"budget_gb": budget_gb, "rows": n, "row_shape": list(ROW), "key_gb": n * row_bytes / 2**30,
           "shard_rows": shard_rows, "cores": os.cpu_count(), "load_average_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        url = str(Path(tmp) / "stream.zarr")
        stderr.print(f"writing a {out['key_gb']:.2f} GB key [{n}, 16, 2, 2] float16, {shard_rows} rows per shard")
        train, y_train = write_key(url, "features/bench/train/m/noised/t1/b1/p1", n, shard_rows, 1)
        test, y_test = write_key(url, "features/bench/test/m/noised/t1/b1/p1", n // 10, shard_rows, 2)
        out["rss_before_solve_gb"] = peak_rss_gb()
        recipe = ProbeRecipe(Cs=(1.0,))
        timed = Timed(solve.objective)
        solve.objective = timed
        t0 = time.perf_counter()
        stderr.print(f"solve at a {budget_gb} GB budget (streamed)")
        metrics = solve.solve_many([Rows.of(train)], [Rows.of(test)], [None], y_train, y_test, CLASSES, recipe,
                                   "cpu", budget, show_progress=False)[0]
        solve.objective = timed.fn
        out.update(solve_s=time.perf_counter() - t0, passes=len(timed.seconds), converged=metrics["converged"],
                   iterations=metrics["iterations"], top1=metrics["top1"], pass_mean_s=float(np.mean(timed.seconds)),
                   pass_median_s=float(np.median(timed.seconds)))

        fit_pos, _ = split_val(n, recipe.val_frac, recipe.seed)
        design = solve.Design([Rows.of(train)], y_train, fit_pos, None, torch.device("cpu"), budget)
        width = design.stats[0].shape[1]
        u, lam = torch.zeros(1, width + 1, CLASSES), torch.full((1,), 1 / design.n)
        scale = (design.stats[3] / CLASSES + lam[:, None]).rsqrt()
        one_pass = lambda: solve.objective(design, u, lam, scale)  # noqa: E731
        streamed = design.feed.batches

        def read():
            sum(1 for _ in streamed())

        def compute():
            design.feed.batches = lambda rng=None: iter(held)
            one_pass()
            design.feed.batches = streamed

        out["peak_rss_gb"] = peak_rss_gb()  # before the RAM copy `compute` works on
        held = list(streamed())
        best = {"read": [], "pass": [], "compute": []}
        for _ in range(2):  # taking turns, so other jobs' load hits them alike
            for name, fn in (("read", read), ("pass", one_pass), ("compute", compute)):
                t0 = time.perf_counter()
                fn()
                best[name].append(time.perf_counter() - t0)
        out.update({f"{k}_s": min(v) for k, v in best.items()})
    out["pass_over_limit"] = out["pass_s"] / max(out["read_s"], out["compute_s"])
    out["solve_pass_over_limit"] = out["pass_median_s"] / max(out["read_s"], out["compute_s"])
    out["load_average_at_end"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        render(out)


def render(out: dict) -> None:
    """The figures of a run (`--json` output renders the same: render(json.load(f)))."""
    n, shard_rows, budget_gb = out["rows"], out["shard_rows"], out["budget_gb"]
    print(f"key {out['key_gb']:.2f} GB [{n}, 16, 2, 2] float16 ({shard_rows} rows per shard), budget {budget_gb} GB; "
          f"{out['cores']} cores, load average {out['load_average_at_start']:.1f} -> {out['load_average_at_end']:.1f}")
    print(f"solve: {out['passes']} passes in {out['solve_s']:.1f} s, converged {out['converged']} after "
          f"{out['iterations']} iterations, test top-1 {100 * out['top1']:.1f}%; pass median "
          f"{out['pass_median_s']:.2f} s (mean {out['pass_mean_s']:.2f} s)")
    print(f"one pass alone: read {out['read_s']:.2f} s, compute on RAM {out['compute_s']:.2f} s, streamed "
          f"{out['pass_s']:.2f} s -> {out['pass_over_limit']:.2f} x max(read, compute) (goal <= 1.5; the solve's "
          f"median pass: {out['solve_pass_over_limit']:.2f} x)")
    print(f"peak RSS {out['peak_rss_gb']:.2f} GB (goal <= budget + 1 = {budget_gb + 1:.2f} GB; "
          f"{out['rss_before_solve_gb']:.2f} GB before the solve)")


if __name__ == "__main__":
    main()
