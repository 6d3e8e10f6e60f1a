"""Run a plan: every pending (t, shard) task, through the forward, into the store."""

from __future__ import annotations

import math

import numpy as np

from ..progress import progress
from .forward import encode_images, forward_blocks
from .plan import MICRO_BATCH, Plan, pending


def run_task(plan: Plan, t: int, shard: int, batch_size: int, on_batch=None) -> None:
    """Compute shard `shard` at time step t for every array still missing it, then write those shards."""
    todo: dict = {(b, p): a for (tt, b, p), a in plan.arrays.items() if tt == t and not a.is_done(shard)}
    if not todo:
        return
    blocks = sorted({b for b, _ in todo})
    pools = sorted({p for _, p in todo}, key=str)
    rows = np.arange(len(plan.split))[next(iter(todo.values())).shard_slice(shard)]
    batch_size = -(-batch_size // MICRO_BATCH) * MICRO_BATCH  # keep every batch aligned to the micro-batch partition
    buffers = {k: np.empty((len(rows), *a.shape[1:]), dtype=np.float32) for k, a in todo.items()}
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        x0 = encode_images(plan.model, plan.preprocess(plan.split.load(batch)))
        out = forward_blocks(plan.model, x0, t, plan.split.ids[batch], plan.split.labels[batch], plan.recipe.noise_seed,
                             plan.recipe.noise_draws, plan.input_mode, blocks, pools, plan.recipe.compute_dtype)
        for k, buf in buffers.items():
            buf[start:start + len(batch)] = out[k].cpu().numpy()
        if on_batch:
            on_batch(len(batch))
    for k, a in todo.items():
        a.write_shard(shard, buffers[k])


def extract_features(plan: Plan, batch_size: int = 64, show_progress: bool = True) -> dict:
    """Run every pending task; returns a summary. Re-running a finished plan does nothing."""
    tasks = pending(plan)
    summary = {"arrays": len(plan.arrays), "tasks_total": len(plan.ts) * math.ceil(len(plan.split) / plan.shard_rows),
               "tasks_run": len(tasks), "shard_rows": plan.shard_rows}
    if not tasks:
        return summary
    plan.model.module.eval()
    with progress("img", disable=not show_progress) as bar:
        bars = {t: bar.add_task(f"t={t}", total=sum(len(range(len(plan.split))[slice(i * plan.shard_rows, (i + 1) * plan.shard_rows)])
                                                   for tt, i in tasks if tt == t))
                for t in plan.ts if any(tt == t for tt, _ in tasks)}
        for t, shard in tasks:
            run_task(plan, t, shard, batch_size, on_batch=lambda n, t=t: bar.advance(bars[t], n))
    return summary
