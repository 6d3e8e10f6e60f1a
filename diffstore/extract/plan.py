"""Plan an extraction: validate every option and key against the store, refuse before writing, create arrays."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..datasets import Split
from ..errors import DiffstoreError
from ..key import INPUT_MODES, FeatureKey, Recipe
from ..models.base import DiffusionModel
from ..preprocess import Preprocess
from ..store import Store

COMPUTE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
STORAGE_DTYPES = ("float16", "float32")
SHARD_BYTES = 256 << 20  # default shard size bound: all (block, pool) buffers of one task stay in RAM
# Every forward runs on exactly MICRO_BATCH rows from a fixed partition of row indices (the last one padded):
# CPU/GPU kernels pick algorithms and split work by tensor size, so values would otherwise depend on
# --batch-size at the ulp level. Fixed shapes make features bit-identical whatever the batch size.
MICRO_BATCH = 16


def pick_device(device: str | None = "auto") -> torch.device:
    """'auto' (or None): CUDA when present, else the CPU; anything else as torch names it."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Plan:
    """Everything one extraction needs; validated before anything is written."""

    model: DiffusionModel
    split: Split
    preprocess: Preprocess
    recipe: Recipe
    ts: list[int]
    blocks: list[int]
    pools: list[str]
    input_mode: str
    shard_rows: int
    arrays: dict = field(default_factory=dict)  # (t, block, pool) -> ShardedArray

    def key(self, t: int, b: int, p: str) -> FeatureKey:
        return FeatureKey(self.split.name, self.split.split, self.model.name, self.input_mode, t, b, p)

    def attrs(self, t: int, b: int, p: str) -> dict:
        return {"key": self.key(t, b, p).to_dict(), "recipe": self.recipe.to_dict(), "block": self.model.blocks[b].to_dict(),
                "preprocess": self.preprocess.to_dict(), "model": {"name": self.model.name, "source": self.model.source},
                "dataset": {"source": self.split.source, "class_names": self.split.class_names}}

    def row_shape(self, b: int, p: str) -> tuple:
        info = self.model.blocks[b]
        return (info.channels, info.height, info.width) if p == "full" else (info.channels, int(p), int(p))


def parse_ts(spec: str, num_timesteps: int) -> list[int]:
    try:
        ts = sorted({int(s) for s in str(spec).split(",") if s.strip()})
    except ValueError:
        raise DiffstoreError(f"--t takes integers separated by commas (e.g. 10,50,90), got {spec!r}") from None
    bad = [t for t in ts if not 0 <= t < num_timesteps]
    if bad or not ts:
        raise DiffstoreError(f"t must be in [0, {num_timesteps - 1}] for this model (T = {num_timesteps}); got {bad or spec!r}")
    return ts


def parse_pools(spec: str) -> list[str]:
    pools = []
    for s in (s.strip() for s in str(spec).split(",") if s.strip()):
        if s != "full" and not (s.isdigit() and int(s) > 0):
            raise DiffstoreError(f"--pools takes positive integers or 'full' (e.g. 1,2,4,full), got {s!r}")
        pools.append(s)
    return sorted(set(pools), key=lambda p: (p == "full", int(p) if p != "full" else 0))


def plan_extraction(store: Store, model: DiffusionModel, split: Split, t: str, blocks: str, pools: str,
                    input_mode: str = "noised", noise_seed: int = 0, noise_draws: int = 1, compute_dtype: str = "float32",
                    storage_dtype: str = "float16", shard_rows: int | None = None) -> Plan:
    """Validate every input and every key against the store, then create the pre-sized arrays."""
    if input_mode not in INPUT_MODES:
        raise DiffstoreError(f"--input must be one of {', '.join(INPUT_MODES)}, got {input_mode!r}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise DiffstoreError(f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    if storage_dtype not in STORAGE_DTYPES:
        raise DiffstoreError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)}, got {storage_dtype!r}")
    if noise_draws < 1:
        raise DiffstoreError(f"--noise-draws must be >= 1, got {noise_draws}")
    if model.encode is None and model.image_channels not in (1, 3):
        raise DiffstoreError(f"model {model.name} takes {model.image_channels}-channel input; images can only be adapted "
                             "to 1 (grey) or 3 (RGB) channels. Use a plugin (py:) whose factory adapts the input")
    ts, bs, ps = parse_ts(t, model.num_timesteps), model.blocks.resolve(blocks), parse_pools(pools)
    for b in bs:
        info = model.blocks[b]
        too_big = [p for p in ps if p != "full" and (int(p) > info.height or int(p) > info.width)]
        if too_big:
            raise DiffstoreError(f"pool {too_big[0]} is larger than block {b} ({info.name}: {info.height}x{info.width}); "
                                 f"use pools <= {min(info.height, info.width)} or 'full'")
    pre = Preprocess(size=model.image_size, channels=model.image_channels)
    recipe = Recipe(model.fingerprint, split.fingerprint(pre), noise_seed, noise_draws, compute_dtype, storage_dtype)
    plan = Plan(model, split, pre, recipe, ts, bs, ps, input_mode, shard_rows or 0)
    # Refuse before writing anything: sample ids, then every key's fingerprint.
    store.check_split(split)
    for tt in ts:
        for b in bs:
            for p in ps:
                store.check(plan.key(tt, b, p).path, recipe.fingerprint(plan.key(tt, b, p)), plan.attrs(tt, b, p))
    existing = [store.open_array(plan.key(tt, b, p).path).shard_rows for tt in ts for b in bs for p in ps
                if store._group(plan.key(tt, b, p).path) is not None]
    if existing and len(set(existing)) > 1:
        raise DiffstoreError("the requested arrays were written with different shard sizes; extract them in separate calls")
    if existing:
        plan.shard_rows = existing[0]
    elif plan.shard_rows % MICRO_BATCH:
        raise DiffstoreError(f"--shard-rows must be a multiple of {MICRO_BATCH} (the fixed micro-batch), got {plan.shard_rows}")
    elif not plan.shard_rows:
        row_bytes = sum(np.prod(plan.row_shape(b, p)) for b in bs for p in ps) * 4
        plan.shard_rows = int(max(1, min(16, SHARD_BYTES // max(row_bytes * MICRO_BATCH, 1)))) * MICRO_BATCH
    store.put_split(split)
    for tt in ts:
        for b in bs:
            for p in ps:
                key = plan.key(tt, b, p)
                plan.arrays[(tt, b, p)] = store.create(key.path, recipe.fingerprint(key), plan.attrs(tt, b, p),
                                                       plan.row_shape(b, p), len(split), plan.shard_rows, storage_dtype)
    return plan


def pending(plan: Plan) -> list[tuple[int, int]]:
    """Tasks (t, shard) with at least one requested array whose shard is not done."""
    n_shards = math.ceil(len(plan.split) / plan.shard_rows)
    masks = {k: a.done_mask() for k, a in plan.arrays.items()}
    return [(t, i) for t in plan.ts for i in range(n_shards)
            if any(not masks[(t, b, p)][i] for b in plan.blocks for p in plan.pools)]
