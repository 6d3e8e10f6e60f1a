"""Extraction at the speed of the GPU (issue 13): for the ddpm-cifar10-32 architecture and ADM-256 uncond (random
init, synthetic JPEGs written to a temp folder), side by side in one run:

    forward img/s   the pure truncated forward at its best batch (fp16 autocast, to the deepest requested block)
    TFLOP/s         FLOPs of that forward (torch.utils.flop_counter, per image) x its img/s
    extract img/s   `extract` end to end after start-up (loader workers, forward, pooling, writes), images per second
    efficiency      extract img/s x (number of t) / forward img/s: the share of the device the pipeline keeps busy
    no-op s         a re-run of the same extraction on the finished store (planning + one listing; model loaded)

    python bench/bench_gpu.py            # on a CUDA machine, < 5 minutes; needs only diffstore's dependencies
    python bench/bench_gpu.py --smoke    # on the CPU with tiny networks: checks the script, measures nothing useful
    options: --compile (torch.compile in the recipe and the forward), --profile (top CUDA kernels of ADM's forward)

Goals (issue 13): efficiency >= 80% for both models, ADM >= 300 TFLOP/s on an H200-class card, no-op <= 3 s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from diffstore.datasets import load_split
from diffstore.extract import extract_features, plan_extraction, prepare_model, run_truncated
from diffstore.key import Recipe
from diffstore.models import load_model
from diffstore.store import Store

# google/ddpm-cifar10-32's config.json (35.7M parameters); weights are seeded random (--random-init).
DDPM_CIFAR10_32 = {
    "_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional", "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
# --smoke: the same code paths on networks small enough for a CPU.
DDPM_SMOKE = {**DDPM_CIFAR10_32, "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1}
ADM_SMOKE = {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2,2",
             "attention_resolutions": "16,8",
             "num_head_channels": 16, "learn_sigma": True, "resblock_updown": True, "use_scale_shift_norm": True}


def cases(smoke: bool, tmp: Path) -> list[dict]:
    """The two models with the extraction each is timed on (the issue's settings), and their batch sweeps."""
    folder = tmp / "ddpm-cifar10-32"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(DDPM_SMOKE if smoke else DDPM_CIFAR10_32))
    return [
        {"name": "ddpm-cifar10-32", "spec": str(folder), "adm_config": None, "t": "10,90", "blocks": "all",
         "batches": [8, 16] if smoke else [64, 128, 256, 512], "n": 64 if smoke else 16384},
        {"name": "ADM-256 uncond", "spec": "adm:", "adm_config": ADM_SMOKE if smoke else "256-uncond", "t": "90",
         "blocks": "mid,9" if smoke else "19,24", "batches": [8, 16] if smoke else [32, 64, 128],
         "n": 32 if smoke else 1536},
    ]


def write_jpegs(root: Path, n: int, size: int) -> None:
    """n smooth random RGB JPEGs (quality 90) in root/test/c{0..3}/ (an imagefolder split)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        low = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        d = root / "test" / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        low.save(d / f"{i:06d}.jpg", quality=90)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def forward_rate(model, blocks: list[int], batch: int, amp, device, seconds: float) -> float:
    """img/s of the truncated forward on `batch` random rows (warm-up first)."""
    x = torch.randn(batch, model.image_channels, model.image_size, model.image_size, device=device)
    t = torch.full((batch,), 90, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
        for _ in range(2):
            run_truncated(model, x, t, labels, blocks)
        sync(device)
        t0, n = time.perf_counter(), 0
        while n < 3 or time.perf_counter() - t0 < seconds:
            run_truncated(model, x, t, labels, blocks)
            n += 1
            if n % 4 == 0:
                sync(device)
        sync(device)
    return batch * n / (time.perf_counter() - t0)


@torch.no_grad()
def flops_per_image(model, blocks: list[int], device) -> float:
    x = torch.zeros(2, model.image_channels, model.image_size, model.image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        run_truncated(model, x, torch.full((2,), 90, device=device), torch.zeros(2, dtype=torch.long, device=device),
                      blocks)
    return counter.get_total_flops() / 2


def profile_forward(model, blocks, batch, amp, device) -> None:
    """The ten CUDA kernels that take the most time in the truncated forward (where non-matmul time goes)."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(batch, model.image_channels, model.image_size, model.image_size, device=device)
    t = torch.full((batch,), 90, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            run_truncated(model, x, t, None, blocks)
        sync(device)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10), file=sys.stderr)


def run_case(case: dict, tmp: Path, args, device: torch.device) -> dict:
    t_load = time.perf_counter()
    model = load_model(case["spec"], random_init=0, adm_config=case["adm_config"]).to(device)
    load_s = time.perf_counter() - t_load
    compute = "float16" if device.type == "cuda" else "float32"
    amp = torch.float16 if device.type == "cuda" else None
    blocks = model.blocks.resolve(case["blocks"])
    deepest = [max(blocks)]
    prepare_model(model, Recipe("", "", 0, 1, compute, "float16", attention="sdpa" if model.set_attention else "eager",
                                compile=args.compile))
    rates = {b: forward_rate(model, deepest, b, amp, device, 0.2 if args.smoke else 2.0) for b in case["batches"]}
    best = max(rates, key=rates.get)
    flops = flops_per_image(model, deepest, device)
    if args.profile and device.type == "cuda" and case["spec"].startswith("adm"):
        profile_forward(model, deepest, best, amp, device)

    data = tmp / f"jpg-{model.image_size}-{case['n']}"
    write_jpegs(data, case["n"], model.image_size)
    split = load_split("imagefolder", "test", str(data))
    url = str(tmp / f"{case['name'].replace(' ', '_')}.zarr")
    plan = plan_extraction(Store.open(url), model, split, t=case["t"], blocks=case["blocks"], pools="1,2",
                           compute_dtype=compute, compile=args.compile)
    t0 = time.perf_counter()
    extract_features(plan, batch_size=plan.recipe.micro_batch, show_progress=False)
    extract_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = plan_extraction(Store.open(url), model, split, t=case["t"], blocks=case["blocks"], pools="1,2",
                            compute_dtype=compute)
    assert extract_features(again, show_progress=False)["tasks_run"] == 0
    noop_s = time.perf_counter() - t0
    extract_rate = len(split) / extract_s
    return {"model": case["name"], "params_M": sum(p.numel() for p in model.module.parameters()) / 1e6,
            "load_s": load_s, "rates": rates, "best_batch": best, "forward": rates[best],
            "tflops": flops * rates[best] / 1e12, "gflop_per_img": flops / 1e9, "micro_batch": plan.recipe.micro_batch,
            "n_t": len(plan.ts), "extract": extract_rate, "efficiency": extract_rate * len(plan.ts) / rates[best],
            "noop_s": noop_s, "n": len(split), "blocks": case["blocks"], "t": case["t"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny networks: check the script runs")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks (a recipe field)")
    p.add_argument("--profile", action="store_true", help="print ADM's top CUDA kernels (torch.profiler)")
    args = p.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device; use --smoke to check it on the CPU")
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}", file=sys.stderr)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        rows = [run_case(c, Path(d), args, device) for c in cases(args.smoke, Path(d))]
    print(f"{'model':<18}{'params':>8}{'best batch':>11}{'forward img/s':>14}{'TFLOP/s':>9}{'GFLOP/img':>10}"
          f"{'micro-batch':>12}{'extract img/s':>14}{'x t':>4}{'efficiency':>11}{'no-op s':>8}{'load s':>7}")
    for r in rows:
        print(f"{r['model']:<18}{r['params_M']:>7.1f}M{r['best_batch']:>11}{r['forward']:>14.0f}{r['tflops']:>9.1f}"
              f"{r['gflop_per_img']:>10.1f}{r['micro_batch']:>12}{r['extract']:>14.0f}{r['n_t']:>4}{r['efficiency']:>10.0%}"
              f"{r['noop_s']:>8.2f}{r['load_s']:>7.1f}")
    for r in rows:
        print(f"{r['model']}: forward img/s by batch {', '.join(f'{b}: {v:.0f}' for b, v in r['rates'].items())}; "
              f"extract: {r['n']} images, t={r['t']}, blocks {r['blocks']}, pools 1,2", file=sys.stderr)
    print(f"total {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
