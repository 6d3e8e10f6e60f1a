"""RepFusion distillation step time: teacher targets from the store vs the teacher computed on the fly.

One training step on the same batch (B images, identity view, t drawn per image by the policy from the grid):

    stored      z(t) gathered from the targets held in RAM (what `diffstore repfusion train` does)
    truncated   the U-Net run on the fly, stopped right after the target layer (extract.run_truncated)
    full        the whole U-Net run on the fly, the layer hooked (what RepFusion's published code does)

each followed by the same policy update (REINFORCE, decoder reward) and student update (hint loss). Also printed:
the storage per image for the chosen grid (raw float16, and compressed on disk, measured on a store built here
from the first --n images), and the one-off cost of building targets (truncated forwards per second).

Usage: python bench/bench_repfusion.py [--model default] [--t-grid 0:1000:50] [--batch-size 64]
           [--student resnet18] [--width 0.25] [--steps 10] [--n 256] [--threads N] [--device auto] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table
from torch.distributions import Categorical

from diffstore.blocks import first_tensor
from diffstore.datasets import load_split
from diffstore.device import pick_device
from diffstore.extract import run_truncated
from diffstore.models import load_model
from diffstore.repfusion.distill import load_images
from diffstore.repfusion.losses import Distiller
from diffstore.repfusion.policy import Decoder, TimePolicy, reinforce_loss, reward
from diffstore.repfusion.students import build_student
from diffstore.repfusion.targets import TargetsConfig, build_targets, resolve_layer
from diffstore.store import Store


def full_forward(model, x, t, module_path):
    """The whole network runs; the layer's output is caught by a hook."""
    caught = {}
    module = model.module.get_submodule(module_path)
    handle = module.register_forward_hook(lambda m, i, o: caught.setdefault("z", first_tensor(o)))
    try:
        model.run(x, t, None)
    finally:
        handle.remove()
    return caught["z"]


def count_flops(fn) -> int:
    """FLOPs of fn() as torch's FlopCounterMode counts them (matmuls and convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--layer", default="mid-conv")
    ap.add_argument("--t-grid", default="0:1000:50")
    ap.add_argument("--views", default="flip")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--student", default="resnet18")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--n", type=int, default=256, help="images whose targets are built for the storage figures")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = pick_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = load_model(args.model).to(device)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TargetsConfig(store=f"{tmp}/bench.zarr", dataset=args.dataset, data_root=args.data_root, limit=args.n,
                            layer=args.layer, t_grid=args.t_grid, views=args.views, device=args.device)
        split = load_split(args.dataset, "train", args.data_root, limit=args.n)
        t0 = time.perf_counter()
        built = build_targets(Store.open(cfg.store), model, split, cfg, show_progress=False)
        build_s = time.perf_counter() - t0
        store = Store.open(cfg.store, "r")
        arr = store.open_array(f"{built['path']}/pooled")
        disk_per_image = arr.nbytes_stored() / arr.n_rows
        z_all = torch.from_numpy(arr.read())
        images, labels = load_images(arr.attrs)

    v_count, k, c = z_all.shape[1:]
    ts = torch.tensor(built["t_grid"], device=device)
    layer_model, layer = resolve_layer(model, args.layer, images[0, :1].float().to(device))
    b = min(args.batch_size, args.n)
    x = images[0, :b].float().to(device)
    y = torch.from_numpy(labels[:b]).to(device)
    rows = torch.arange(b)

    def stored(t_index):
        return z_all[rows, 0, t_index.cpu()].float().to(device)

    def truncated(t_index):
        with torch.no_grad():
            return run_truncated(layer_model, x, ts[t_index], None, [layer.block])[layer.block].float().mean((2, 3))

    def full(t_index):
        with torch.no_grad():
            return full_forward(model, x, ts[t_index], layer.info.module).float().mean((2, 3))

    student = build_student(args.student, 10, x.shape[1], args.width).to(device)
    distiller = Distiller("hint", student.feature_channels, c).to(device)
    policy = TimePolicy(x.shape[1], k).to(device)
    g = Decoder(c, 10).to(device).eval().requires_grad_(False)
    opt = torch.optim.SGD([*student.parameters(), *distiller.parameters()], lr=0.01, momentum=0.9)
    popt = torch.optim.Adam(policy.parameters(), lr=1e-3)

    def step(teacher):
        logits = policy(x)
        t_index = Categorical(logits=logits).sample()
        z = teacher(t_index)
        loss_p = reinforce_loss(logits, t_index, reward(g, z, y), 0.1)
        popt.zero_grad()
        loss_p.backward()
        popt.step()
        loss = distiller(student.features(x), z)
        opt.zero_grad()
        loss.backward()
        opt.step()

    variants = {"stored": stored, "truncated": truncated, "full": full}
    samples = {name: [] for name in variants}
    for i in range(args.steps + 2):  # round-robin, so load on a shared machine hits every variant alike
        for name, teacher in variants.items():
            sync()
            t0 = time.perf_counter()
            step(teacher)
            sync()
            if i >= 2:  # the first two rounds warm up
                samples[name].append(time.perf_counter() - t0)
    timings = {name: statistics.median(v) * 1e3 for name, v in samples.items()}
    t_mid = torch.full((b,), int(ts[len(ts) // 2]), device=device)
    flops = {"student+policy step": count_flops(lambda: step(stored)),
             "teacher truncated": count_flops(lambda: truncated(torch.full((b,), len(ts) // 2, device=device))),
             "teacher full": count_flops(lambda: full_forward(model, x, t_mid, layer.info.module))}

    result = {"device": str(device), "threads": torch.get_num_threads(), "model": model.name,
              "layer": layer.info.module,
              "layer_shape": [c, layer.info.height, layer.info.width], "t_grid_K": k, "views": v_count, "batch": b,
              "student": f"{args.student} x{args.width}", "step_ms": timings,
              "speedup_vs_full": timings["full"] / timings["stored"],
              "speedup_vs_truncated": timings["truncated"] / timings["stored"],
              "teacher_share_of_full_step": 1 - timings["stored"] / timings["full"], "flops_per_step": flops,
              "teacher_flop_share": {k: flops[f"teacher {k}"] / (flops[f"teacher {k}"] + flops["student+policy step"])
                                     for k in ("truncated", "full")},
              "bytes_per_image_raw": v_count * k * c * 2, "bytes_per_image_disk": disk_per_image,
              "map_bytes_per_image_raw": v_count * k * c * layer.info.height * layer.info.width * 2,
              "build_forwards_per_s": args.n * v_count * k / build_s}
    if args.json:
        print(json.dumps(result, indent=2))
        return result
    print(f"RepFusion step: student {result['student']}, batch {b}, teacher {model.name} at {layer.info.module} "
          f"{tuple(result['layer_shape'])}, {device} with {result['threads']} threads")
    table = Table()
    for col in ("teacher", "ms / step", "vs stored"):
        table.add_column(col, justify="right" if col != "teacher" else "left")
    for name, ms in timings.items():
        table.add_row(name, f"{ms:.1f}", f"{ms / timings['stored']:.2f}x")
    Console().print(table)
    share = result["teacher_flop_share"]
    print(f"teacher share of a full-forward step: {result['teacher_share_of_full_step']:.0%} of the time, "
          f"{share['full']:.0%} of the FLOPs (truncated: {share['truncated']:.0%}); "
          "GFLOP per step: " + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in flops.items()))
    print(f"storage per image, K={k} x V={v_count} x C={c}: {result['bytes_per_image_raw']} B raw float16, "
          f"{disk_per_image:.0f} B on disk; spatial maps would add {result['map_bytes_per_image_raw']} B raw")
    print(f"building targets: {result['build_forwards_per_s']:.0f} truncated forwards/s "
          f"({args.n} images x {v_count} views x {k} t)")
    return result


if __name__ == "__main__":
    main()
