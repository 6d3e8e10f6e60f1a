"""The extraction pipeline's ceiling on the CPU: `extract` with a model whose forward costs almost nothing (a
plugin with identity blocks), so what is timed is loading, decoding, preprocessing, noise, pooling, copies and
writes. img/s for CIFAR-10 binary batches (32px, synthetic records), CIFAR-10 JPEGs (32px, a subset of
shared/datasets/cifar10-jpg.tar.gz) and a folder of synthetic 256px JPEGs, with 0 (in-process), 1 and 2 loader workers,
side by side in one run; optionally the same cases on another checkout (--baseline /work/main: the code before the
pipeline, which has no loader workers) for a before/after ratio.

    python bench/bench_pipeline.py [--baseline /work/main] [--repeats 2] [--n32 8192] [--njpg 4096] [--n256 512]

Then a no-op re-run of a finished 120-array extraction: model load, planning (the store's per-array metadata) and
the done check (one concurrent listing of done flags here; one read per array and shard before).

Each case runs in its own process (so the baseline imports its own diffstore) on a fresh store; the time is
extract_features alone (model load, data listing and planning excluded), the best of --repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CIFAR_JPG = ROOT.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
# Two identity blocks behind one (unused) parameter: the device is never the bottleneck.
PLUGIN = '''
import torch
from torch import nn


class Identity(nn.Module):
    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))
        self.b1, self.b2 = nn.Identity(), nn.Identity()

    def forward(self, x, t):
        return self.b2(self.b1(x))


def factory(size, random_init=None):
    net = Identity()
    return {"module": net, "blocks": [("b1", "b1"), ("b2", "b2")],
            "alphas_cumprod": [0.99 - i * 1e-4 for i in range(1000)],
            "image_size": size, "image_channels": 3, "weight_files": []}


def factory32(random_init=None):
    return factory(32, random_init)


def factory256(random_init=None):
    return factory(256, random_init)
'''


def make_data(tmp: Path, n32: int, njpg: int, n256: int) -> dict:
    """The three datasets, written once: {id: (label, (dataset, root, n, plugin factory))}."""
    from PIL import Image

    rng = np.random.default_rng(0)
    bin_dir = tmp / "cifar-bin" / "cifar-10-batches-bin"
    bin_dir.mkdir(parents=True)
    records = rng.integers(0, 256, (n32, 1 + 3 * 32 * 32), dtype=np.uint8)
    records[:, 0] %= 10
    records.tofile(bin_dir / "test_batch.bin")
    with tarfile.open(CIFAR_JPG) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("./test/") and m.name.endswith(".jpg")]
        per_class: dict = {}
        for m in members:  # the first njpg / 10 of every class (the tar is grouped by class)
            per_class.setdefault(m.name.split("/")[2], []).append(m)
        tar.extractall(tmp / "cifar-jpg", members=[m for ms in per_class.values() for m in ms[:njpg // 10]],
                       filter="data")
    for i in range(n256):  # smooth random images (noise alone would decode unlike photographs), q=90
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((256, 256), Image.BICUBIC)
        arr = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (256, 256, 3)), 0, 255).astype(np.uint8)
        d = tmp / "jpg256" / "test" / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(d / f"{i:05d}.jpg", quality=90)
    (tmp / "plugin.py").write_text(PLUGIN)
    return {"binary": ("cifar10 binary 32px", ("cifar10", str(tmp / "cifar-bin"), n32, "factory32")),
            "jpeg": ("cifar10 JPEG 32px", ("cifar10", str(tmp / "cifar-jpg"), njpg, "factory32")),
            "256": ("JPEG folder 256px", ("imagefolder", str(tmp / "jpg256"), n256, "factory256"))}


def run_case(args) -> None:
    """In a child process: time extract_features for one (dataset, workers) on a fresh store; print JSON."""
    import inspect

    import torch

    from diffstore.datasets import load_split
    from diffstore.extract import extract_features, plan_extraction
    from diffstore.models.plugin import load_plugin
    from diffstore.store import Store

    torch.set_num_threads(1)
    model = load_plugin(f"{args.tmp}/plugin.py:{args.factory}", random_init=0)
    split = load_split(args.dataset, "test", args.root)
    split = split.take(split.ids[:args.n])
    kw = {"workers": args.workers} if "workers" in inspect.signature(extract_features).parameters else {}
    times, cpus = [], []
    for r in range(args.repeats):
        store = Store.open(f"{args.tmp}/s-{os.getpid()}-{r}.zarr")
        plan = plan_extraction(store, model, split, t="10", blocks="all", pools="1,2")
        t0, c0 = time.perf_counter(), cpu_seconds()
        extract_features(plan, batch_size=args.batch_size, show_progress=False, **kw)
        times.append(time.perf_counter() - t0)
        cpus.append(cpu_seconds() - c0)
    print(json.dumps({"img_s": args.n / min(times), "cpu_us": min(cpus) / args.n * 1e6}))


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (the loader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_noop(args) -> None:
    """In a child process: a finished extraction of the shipped model (120 arrays), planned and run again; prints
    JSON with the seconds of model load, planning (per-array metadata) and the done check + run."""
    from diffstore.datasets import load_split
    from diffstore.extract import extract_features, plan_extraction
    from diffstore.models import load_model
    from diffstore.store import Store

    t0 = time.perf_counter()
    model, split = load_model("default"), load_split("digits", "test")
    t1 = time.perf_counter()
    plan = plan_extraction(Store.open(args.root), model, split, t="10,50,150,300", blocks="all", pools="1,2")
    t2 = time.perf_counter()
    summary = extract_features(plan, show_progress=False)
    t3 = time.perf_counter()
    print(json.dumps({"load": t1 - t0, "plan": t2 - t1, "run": t3 - t2, "tasks": summary["tasks_run"],
                      "arrays": len(plan.arrays)}))


def noop(tmp: Path, tree: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--noop", "--root", str(tmp / f"noop-{tree.name}.zarr")], env=env,
                         capture_output=True, text=True, cwd=tmp)
    if out.returncode:
        raise SystemExit(f"no-op re-run ({tree}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(tmp: Path, tree: Path, case: tuple, workers: int, repeats: int, batch_size: int) -> dict:
    dataset, root, n, factory = case
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--case", "--tmp", str(tmp), "--dataset", dataset, "--root", root,
                          "--n", str(n), "--factory", factory, "--workers", str(workers), "--repeats", str(repeats),
                          "--batch-size", str(batch_size)], env=env, capture_output=True, text=True, cwd=tmp)
    if out.returncode:
        raise SystemExit(f"case {case} workers={workers} ({tree}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", help="another checkout (e.g. /work/main) to run the same cases on")
    p.add_argument("--workers", default="0,1,2", help="loader worker counts to run (0: loading in the main process)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--n32", type=int, default=8192)
    p.add_argument("--njpg", type=int, default=4096)
    p.add_argument("--n256", type=int, default=512)
    p.add_argument("--cases", default="binary,jpeg,256,noop", help="which of binary, jpeg, 256, noop to run")
    p.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--noop", action="store_true", help=argparse.SUPPRESS)
    for name in ("tmp", "dataset", "root", "factory"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        args.workers = int(args.workers)
        return run_case(args)
    if args.noop:
        return run_noop(args)
    workers = [int(w) for w in args.workers.split(",")]
    print(f"{len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.1f}; t=10, blocks 1,2 (identity), "
          f"pools 1,2, batch {args.batch_size}, best of {args.repeats}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cases = make_data(tmp, args.n32, args.njpg, args.n256)
        cols = [f"{w} worker{'s' if w != 1 else ''}" for w in workers] + (["before"] if args.baseline else [])
        print(f"{'img/s (CPU us/img)':<22}{'n':>6}" + "".join(f"{c:>18}" for c in cols)
              + (f"{'best/before':>13}" if args.baseline else ""))
        chosen = args.cases.split(",")
        for name, case in (cases[c] for c in cases if c in chosen):
            runs = [child(tmp, ROOT, case, w, args.repeats, args.batch_size) for w in workers]
            if args.baseline:
                runs.append(child(tmp, Path(args.baseline), case, 0, args.repeats, args.batch_size))
            line = f"{name:<22}{case[2]:>6}" + "".join(f"{r['img_s']:>10.0f} ({r['cpu_us']:>4.0f})" for r in runs)
            if args.baseline:
                line += f"{max(r['img_s'] for r in runs[:-1]) / runs[-1]['img_s']:>12.1f}x"
            print(line, flush=True)
        trees = ([ROOT] + ([Path(args.baseline)] if args.baseline else [])) if "noop" in chosen else []
        print("\nno-op re-run of a finished extraction (shipped model, digits test, 4 t x 15 blocks x "
              "2 pools = 120 arrays, s):")
        print(f"{'code':<22}{'model load':>12}{'plan':>8}{'done check':>12}")
        for tree in trees:
            noop(tmp, tree)  # the first run extracts
            r = noop(tmp, tree)
            assert r["tasks"] == 0
            print(f"{'this checkout' if tree == ROOT else str(tree):<22}"
                  f"{r['load']:>12.2f}{r['plan']:>8.2f}{r['run']:>12.2f}")
        print(f"load average after: {os.getloadavg()[0]:.1f} (wall rates shrink on a busy machine; CPU us/img is what "
              "one image costs summed over every process)", file=sys.stderr)


if __name__ == "__main__":
    main()
