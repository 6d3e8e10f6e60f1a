"""`diffstore extract --dry-run`: what a run would do, before it does it.

For every requested array: created or resumed, the shards this run would compute (those of its row range not done
yet), and the bytes they take on disk: raw size x the codec's ratio on activations (store/codec.py RATIO, measured).
The time is one micro-batch forward of the real model at each t, timed after a warm-up, scaled to the rows to
compute; loading, decoding and writing overlap the forward in a real run (pipeline.py), so this is its floor on an
idle machine, and within about 2x of the real run on the project's machines (bench/bench_team.py checks it).
Nothing is written to the store.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..store.codec import DEFAULT, RATIO
from .forward import forward_blocks, prepare_model
from .plan import Plan


def shards_to_compute(plan: Plan, key: tuple) -> list[int]:
    """The shards of this run's rows that `key`'s array lacks (all of them for an array to create)."""
    if key in plan.new:
        return list(plan.shards())
    mask = plan.arrays[key].done_mask()
    return [i for i in plan.shards() if not mask[i]]


def rows_of(plan: Plan, shards: list[int]) -> int:
    n = len(plan.split)
    return sum(min((i + 1) * plan.shard_rows, n) - i * plan.shard_rows for i in shards)


@torch.no_grad()
def seconds_per_row(plan: Plan, t: int) -> float:
    """One micro-batch forward through the deepest requested block at t, timed after a warm-up."""
    model, mb = plan.model, plan.recipe.micro_batch
    prepare_model(model, plan.recipe)
    device = next(model.module.parameters()).device
    x0 = plan.preprocess(plan.split.load(np.arange(min(mb, len(plan.split)))))
    args = (x0, t, plan.split.ids[:len(x0)], plan.split.labels[:len(x0)], plan.recipe.noise_seed,
            plan.recipe.noise_draws, plan.input_mode, plan.blocks, plan.pools, plan.recipe.compute_dtype, mb)
    forward_blocks(model, *args)  # warm-up: allocator, kernels, lazy caches
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    forward_blocks(model, *args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / len(x0)


def ratio(plan: Plan, key: tuple) -> float:
    """The codec's stored/raw ratio: the array's own codec when it exists, else the default for new arrays."""
    codec = plan.arrays[key].codec if key in plan.arrays else DEFAULT
    return RATIO.get(codec, 1.0)


def dry_run(plan: Plan) -> dict:
    """The arrays, shards, bytes and estimated seconds of running `plan` (nothing written)."""
    rows, per_t = [], {}
    for key in [(t, b, p) for t in plan.ts for b in plan.blocks for p in plan.pools]:
        shards = shards_to_compute(plan, key)
        raw = (rows_of(plan, shards) * int(np.prod(plan.row_shape(key[1], key[2])))
               * np.dtype(plan.recipe.storage_dtype).itemsize)
        rows.append({"array": plan.key(*key).path, "status": "create" if key in plan.new else "resume",
                     "shards": len(shards), "of": len(plan.shards()), "bytes": int(math.ceil(raw * ratio(plan, key)))})
        per_t.setdefault(key[0], set()).update(shards)
    todo = {t: rows_of(plan, sorted(s)) for t, s in per_t.items() if s}
    seconds = sum(seconds_per_row(plan, t) * n for t, n in todo.items())
    return {"split": plan.split.split, "rows": len(plan.rows), "of": len(plan.split), "arrays": rows,
            "to_create": len(plan.new), "tasks": sum(len(s) for s in per_t.values()),
            "bytes": sum(r["bytes"] for r in rows), "seconds": round(seconds, 1),
            "micro_batch": plan.recipe.micro_batch}
