"""Extraction throughput: diffstore (one truncated forward per (batch, t) fills every block and pool) vs the paper
code's way (one full forward per (t, block) configuration, pooled afterwards), side by side in one run.

    python bench/bench_extract.py [--n 512] [--model default]

Also: diffstore's effective GFLOP/s against this machine's float32 matmul GFLOP/s measured in the same run, and
the early-exit saving for a mid-block-only request.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from diffstore.datasets import load_split
from diffstore.extract import MICRO_BATCH, extract_features, forward_blocks, plan_extraction, run_truncated
from diffstore.models import load_model
from diffstore.noise import add_noise, noise
from diffstore.preprocess import Preprocess
from diffstore.store import Store


def matmul_gflops(n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def forward_flops(model, blocks: list[int]) -> float:
    """FLOPs of one micro-batch forward truncated after the deepest of `blocks` (counted, not estimated)."""
    x = torch.zeros(MICRO_BATCH, model.image_channels, model.image_size, model.image_size)
    t = torch.full((MICRO_BATCH,), 10)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        run_truncated(model, x, t, None, blocks)
    return counter.get_total_flops()


@torch.no_grad()
def naive(model, x0: torch.Tensor, ids, ts, blocks, pools, batch_size: int) -> float:
    """The paper's way: for every (t, block), a full forward over the data, then pooling."""
    t0 = time.perf_counter()
    for t in ts:
        for b in blocks:
            captured = {}
            h = model.module.get_submodule(model.blocks[b].module).register_forward_hook(
                lambda m, i, o: captured.__setitem__("f", o[0] if isinstance(o, tuple) else o))
            for s in range(0, len(x0), batch_size):
                xb = x0[s:s + batch_size]
                xt = add_noise(xb, noise(0, ids[s:s + batch_size], t, 0, tuple(xb.shape[1:])),
                               float(model.alphas_cumprod[t]))
                model.run(xt, torch.full((len(xb),), t), None)
                [F.adaptive_avg_pool2d(captured["f"], int(p)) for p in pools]
            h.remove()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--model", default="default")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    model = load_model(args.model)
    split = load_split("digits", "train")
    ts, pools = [10, 50, 150, 300], ["1", "2"]
    mid, last = model.blocks.mid, len(model.blocks)
    blocks = sorted({2, mid - 2, mid, mid + 2})
    split = split.take(split.ids[:args.n])
    rows = np.arange(args.n)
    x0 = Preprocess(model.image_size, model.image_channels)(split.load(rows))
    gflops_machine = matmul_gflops()

    with tempfile.TemporaryDirectory() as d:
        plan = plan_extraction(Store.open(f"{d}/s.zarr"), model, split, t=",".join(map(str, ts)),
                               blocks=",".join(map(str, blocks)), pools=",".join(pools))
        t0 = time.perf_counter()
        extract_features(plan, batch_size=args.batch_size, show_progress=False)
        t_ours = time.perf_counter() - t0
    t_naive = naive(model, x0, split.ids, ts, blocks, pools, args.batch_size)
    flops_ours = forward_flops(model, blocks) / MICRO_BATCH * args.n * len(ts)

    x16, ids16 = x0[:MICRO_BATCH], split.ids[:MICRO_BATCH]
    reps = max(1, args.n // MICRO_BATCH)
    timing = {}
    for name, bl in (("mid only", [mid]), ("full", [last])):
        forward_blocks(model, x16, 10, ids16, None, 0, 1, "noised", bl, ["1"])
        t0 = time.perf_counter()
        for _ in range(reps):
            forward_blocks(model, x16, 10, ids16, None, 0, 1, "noised", bl, ["1"])
        timing[name] = (time.perf_counter() - t0) / reps

    grid = f"{len(ts)} t x {len(blocks)} blocks {blocks} x pools {pools}"
    print(f"model {model.name}, {args.n} digits images, grid {grid}, torch threads {torch.get_num_threads()}")
    print(f"{'method':<34}{'seconds':>9}{'img/s':>10}")
    print(f"{'diffstore extract (into a store)':<34}{t_ours:9.2f}{args.n / t_ours:10.1f}")
    print(f"{'naive: full forward per (t,block)':<34}{t_naive:9.2f}{args.n / t_naive:10.1f}")
    print(f"speed-up diffstore / naive: {t_naive / t_ours:.2f}x")
    print(f"diffstore effective {flops_ours / t_ours / 1e9:.2f} GFLOP/s vs machine float32 matmul "
          f"{gflops_machine:.1f} GFLOP/s ({flops_ours / t_ours / 1e9 / gflops_machine:.1%} of matmul peak)")
    f_mid, f_full = forward_flops(model, [mid]), forward_flops(model, [last])
    print(f"early exit, mid-block only: {f_mid / f_full:.1%} of the full forward's FLOPs; time per micro-batch "
          f"{timing['mid only'] * 1e3:.1f} ms vs {timing['full'] * 1e3:.1f} ms "
          f"({timing['full'] / timing['mid only']:.2f}x faster)")


if __name__ == "__main__":
    main()
