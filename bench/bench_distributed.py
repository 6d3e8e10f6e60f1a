"""Extraction on dask.distributed: scaling with worker processes, and the per-task overhead as shards shrink.

(a) scaling   one extraction (the first --rows digits train images, one t, every block, pools 1,2) in-process and
              on LocalClusters of 1 and 2 single-threaded worker processes (torch pinned to 1 thread everywhere).
              Workers are started and warmed first (model loaded): that fixed cost is reported on its own, and the
              timed runs hold what a long extraction pays per job: tasks, the plan rebuild, reads and writes.
              Scaling efficiency = throughput(2 workers) / (2 x throughput(1 worker)).
              CPU ms per image (the work, which distribution should not inflate) and cores used (CPU / wall: what
              the host gave the run) tell a starved run on a shared host from a costly one.
(b) overhead  one worker, shard_rows 16 .. 256 (one task per shard): wall time vs the time tasks spent in
              run_task (forward, pooling, shard writes). overhead = wall - run_task time - plan rebuild, as a
              fraction of the wall time; a line fit overhead = per_job + per_task x tasks splits it into the
              job's fixed cost (client connect, gather) and the scheduler's round trip per task. A task's share
              stays under 5% when per_task < 0.05 (per_task + rows x run_task per row), i.e. for
              shard_rows > 19 per_task / (run_task per row): printed for this model and this host.

Model: the shipped default; a seeded random-init U-Net (32x32 input, 3 levels) when it is not there (said).
Usage: python bench/bench_distributed.py [--rows 256] [--t 100] [--shard-rows 16,32,64,128,256] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from diffstore.datasets import load_split
from diffstore.errors import DiffstoreError
from diffstore.extract import extract_features, plan_extraction
from diffstore.extract.distributed import extract_distributed, extract_job
from diffstore.extract.options import ExtractOptions
from diffstore.models import load_model
from diffstore.progress import stderr
from diffstore.scale import cluster_client
from diffstore.store import Store

BLOCKS, POOLS = "all", "1,2"


def bench_model(root: Path) -> tuple[object, dict, str]:
    """(model, model_spec for the workers, note)."""
    try:
        return load_model("default"), {"spec": "default"}, "default model"
    except DiffstoreError as e:
        stderr.print(f"default model unavailable ({e}); using a seeded random-init U-Net")
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
                norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")).save_pretrained(root / "unet32")
    spec = {"model": str(root / "unet32"), "model_name": "unet32-untrained"}
    return (load_model(spec["model"], name=spec["model_name"]), spec,
            "random-init U-Net 32x32 (32, 64, 64) (no default model shipped)")


def warm(job) -> None:
    """On every worker: load the model (and build a throwaway plan) before anything is timed."""
    from diffstore.extract.distributed import worker_plan

    worker_plan(job)


class Bench:
    def __init__(self, root: Path, args):
        self.root, self.args, self.n = root, args, 0
        self.model, self.model_spec, self.note = bench_model(root)
        full = load_split("digits", "train")
        self.split = full.take(full.ids[:args.rows])  # the workers load the full split and take the same ids

    def plan(self, shard_rows: int):
        self.n += 1
        url = str(self.root / f"run{self.n}.zarr")
        return url, plan_extraction(Store.open(url), self.model, self.split, t=str(self.args.t), blocks=BLOCKS,
                                    pools=POOLS, shard_rows=shard_rows)

    def options(self, url: str) -> ExtractOptions:
        """What the workers are told: the model spec, the split and the CPU (they load both themselves)."""
        return ExtractOptions.build(store=url, **self.model_spec, split="train", batch_size=self.args.batch_size,
                                    device="cpu", show_progress=False)

    def in_process(self, shard_rows: int) -> dict:
        _, plan = self.plan(shard_rows)
        start, cpu = time.perf_counter(), time.process_time()
        extract_features(plan, batch_size=self.args.batch_size, show_progress=False)
        return {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu,
                "tasks": len(plan.ts) * -(-len(self.split) // shard_rows)}

    def on_cluster(self, client, shard_rows: int) -> dict:
        url, plan = self.plan(shard_rows)
        s = extract_distributed(plan, self.options(url), client=client)
        compute = sum(r["compute_s"] for r in s["task_times"])
        setup = sum(r["setup_s"] for r in s["task_times"])
        overhead = s["wall_s"] * len({r["pid"] for r in s["task_times"]}) - compute - setup
        return {"wall_s": s["wall_s"], "cpu_s": sum(r["cpu_s"] for r in s["task_times"]), "tasks": len(s["task_times"]),
                "compute_s": compute, "setup_s": setup, "overhead_s": overhead}

    @contextmanager
    def cluster(self, workers: int):
        """(client, seconds): the LocalCluster `--workers` starts, warmed, and what its start and warm-up took."""
        start = time.perf_counter()
        with cluster_client(workers) as client:
            url, plan = self.plan(64)
            client.run(warm, extract_job(plan, self.options(url)))
            yield client, time.perf_counter() - start


def scaling(bench: Bench, args) -> list[dict]:
    stderr.print(f"(a) scaling: {args.rows} rows, t={args.t}, blocks {BLOCKS}, pools {POOLS}, "
                 f"shard_rows {args.scale_shard}")
    rows = [{"run": "in-process (1 thread)", "workers": 0, "start_s": 0.0, **bench.in_process(args.scale_shard)}]
    for workers in (1, 2):
        with bench.cluster(workers) as (client, start_s):
            rows.append({"run": f"LocalCluster, {workers} worker(s)", "workers": workers, "start_s": start_s,
                         **bench.on_cluster(client, args.scale_shard)})
    for r in rows:
        r["images_per_s"] = args.rows / r["wall_s"]
        r["cores_used"] = r["cpu_s"] / r["wall_s"]  # what the (shared) host actually gave the run
        r["cpu_ms_per_image"] = 1000 * r["cpu_s"] / args.rows  # work per image: does distribution add any?
    one = next(r["images_per_s"] for r in rows if r["workers"] == 1)
    for r in rows:
        r["efficiency"] = r["images_per_s"] / (max(r["workers"], 1) * one) if r["workers"] else None
    return rows


def overhead(bench: Bench, args) -> dict:
    sizes = [int(s) for s in args.shard_rows.split(",")]
    stderr.print(f"(b) per-task overhead, 1 worker, shard_rows {sizes}")
    with bench.cluster(1) as (client, _):
        rows = [{"shard_rows": size, **bench.on_cluster(client, size)} for size in sizes]
    for r in rows:
        r["overhead_per_task_ms"] = 1000 * r["overhead_s"] / r["tasks"]
        r["compute_per_task_ms"] = 1000 * r["compute_s"] / r["tasks"]
        r["overhead_frac"] = r["overhead_s"] / r["wall_s"]
    per_task, per_job = np.polyfit([r["tasks"] for r in rows], [r["overhead_s"] for r in rows], 1)
    per_row = sum(r["compute_s"] for r in rows) / (len(rows) * args.rows)  # run_task seconds per image
    return {"runs": rows, "per_task_ms": 1000 * per_task, "per_job_ms": 1000 * per_job,
            "run_task_ms_per_row": 1000 * per_row,
            "under_5pct_measured": next((r["shard_rows"] for r in rows if r["overhead_frac"] < 0.05), None),
            "under_5pct_shard_rows": 19 * max(per_task, 0) / per_row}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=256, help="digits train images extracted per run")
    ap.add_argument("--t", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--scale-shard", type=int, default=64, help="shard_rows of the scaling runs")
    ap.add_argument("--shard-rows", default="16,32,64,128,256", help="shard sizes of the overhead runs")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the in-process baseline, like each worker
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp), args)
        scale, over = scaling(bench, args), overhead(bench, args)
    if args.json:
        print(json.dumps({"model": bench.note, "scaling": scale, "overhead": over}, indent=1))
        return
    console = Console(width=160)
    table = Table(title=f"(a) {args.rows} digits rows, t={args.t}, blocks {BLOCKS}, pools {POOLS}, "
                        f"shard_rows {args.scale_shard}: {bench.note}")
    for col in ("run", "start + warm-up s", "tasks", "wall s", "CPU ms/image", "cores used", "images/s",
                "scaling efficiency"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for r in scale:
        table.add_row(r["run"], f"{r['start_s']:.1f}", str(r["tasks"]), f"{r['wall_s']:.2f}",
                      f"{r['cpu_ms_per_image']:.1f}", f"{r['cores_used']:.2f}", f"{r['images_per_s']:.0f}",
                      "-" if r["efficiency"] is None else f"{r['efficiency']:.2f}")
    console.print(table)
    table = Table(title="(b) per-task overhead on 1 worker process", caption=(
        f"fit: {over['per_job_ms']:.0f} ms per job + {over['per_task_ms']:.1f} ms per task; run_task "
        f"{over['run_task_ms_per_row']:.1f} ms per image. Overhead < 5%: measured from shard_rows "
        f"{over['under_5pct_measured'] or '(none measured)'}; "
        f"per task: shard_rows > {over['under_5pct_shard_rows']:.1f}"))
    for col in ("shard rows", "tasks", "wall s", "run_task ms/task", "overhead ms/task", "overhead %"):
        table.add_column(col, justify="right")
    for r in over["runs"]:
        table.add_row(str(r["shard_rows"]), str(r["tasks"]), f"{r['wall_s']:.2f}", f"{r['compute_per_task_ms']:.0f}",
                      f"{r['overhead_per_task_ms']:.1f}", f"{100 * r['overhead_frac']:.1f}")
    console.print(table)


if __name__ == "__main__":
    main()
