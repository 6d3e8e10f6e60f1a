"""Plan an extraction: validate every option and key against the store, refuse before writing, create arrays."""

from __future__ import annotations

import asyncio
import math
import posixpath
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from zarr.core.sync import sync

from ..datasets import Split
from ..errors import DiffstoreError
from ..key import INPUT_MODES, LEGACY_FORWARD, FeatureKey, Recipe
from ..models.base import DiffusionModel
from ..preprocess import Preprocess
from ..store import Store

COMPUTE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
STORAGE_DTYPES = ("float16", "float32")
ATTENTION = ("eager", "sdpa")
SHARD_BYTES = 256 << 20  # default shard size bound: all (block, pool) buffers of one task stay in RAM
# Every forward runs on exactly micro_batch rows from a fixed partition of row indices (the last one padded):
# CPU/GPU kernels pick algorithms and split work by tensor size, so values would otherwise depend on
# --batch-size at the ulp level. Fixed shapes make features bit-identical whatever the batch size. The
# micro-batch is a recipe field; MICRO_BATCH is the CPU default (and what every store before it used).
MICRO_BATCH = LEGACY_FORWARD["micro_batch"]
# On CUDA: the largest power of two whose activations fit this share of the card's memory, within these bounds.
CUDA_MEMORY_SHARE = 0.25
CUDA_MICRO_BATCH = (128, 512)


def pick_device(device: str | None = "auto") -> torch.device:
    """'auto' (or None): CUDA when present, else the CPU; anything else as torch names it."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def default_micro_batch(model: DiffusionModel, compute_dtype: str) -> int:
    """16 on the CPU. On CUDA, sized from the peak memory of one full forward on 16 rows against a share of the
    card's total (not free) memory, so the same card always gets the same micro-batch (it is in the key)."""
    param = next(model.module.parameters())
    if param.device.type != "cuda":
        return MICRO_BATCH
    n = MICRO_BATCH
    x = torch.zeros((n, model.image_channels, model.image_size, model.image_size), device=param.device)
    torch.cuda.synchronize(param.device)
    base = torch.cuda.memory_allocated(param.device)
    torch.cuda.reset_peak_memory_stats(param.device)
    amp = COMPUTE_DTYPES[compute_dtype]
    with torch.autocast("cuda", dtype=amp) if amp is not None else nullcontext():
        model.run(model.encode(x) if model.encode is not None else x, torch.full((n,), 1, device=param.device),
                  torch.zeros(n, dtype=torch.long, device=param.device))
    per_row = max(torch.cuda.max_memory_allocated(param.device) - base, 1) / n
    budget = CUDA_MEMORY_SHARE * torch.cuda.get_device_properties(param.device).total_memory
    lo, hi = CUDA_MICRO_BATCH
    return int(min(max(2 ** int(math.log2(max(budget / per_row, 1))), lo), hi))


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
    created: list = field(default_factory=list)  # paths this plan created (removed again if it fails unstarted)

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


def forward_options(store: Store, paths: list[str], model: DiffusionModel, compute_dtype: str, micro_batch: int | None,
                    attention: str | None, compile: bool | None) -> dict:
    """The recipe's forward fields: as given, else as the arrays at `paths` hold them, else the defaults."""
    if micro_batch is not None and micro_batch < 1:
        raise DiffstoreError(f"--micro-batch must be >= 1, got {micro_batch}")
    if attention is not None and attention not in ATTENTION:
        raise DiffstoreError(f"--attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
    if attention == "sdpa" and model.set_attention is None:
        raise DiffstoreError(f"model {model.name} has one attention implementation only; drop --attention")
    recipes = [{**LEGACY_FORWARD, **g.attrs["recipe"]} for g in map(store._group, paths) if g is not None and "recipe" in g.attrs]
    out = {}
    for name, value in {"micro_batch": micro_batch, "attention": attention, "compile": compile}.items():
        held = sorted({r[name] for r in recipes}, key=str)
        if value is None and len(held) > 1:
            raise DiffstoreError(f"the requested arrays were computed with {name} {held}; pass --{name.replace('_', '-')} "
                                 "or extract them in separate calls")
        out[name] = value if value is not None else (held[0] if held else None)
    if out["micro_batch"] is None:
        out["micro_batch"] = default_micro_batch(model, compute_dtype)
    if out["attention"] is None:
        out["attention"] = "eager" if model.set_attention is None else "sdpa"
    out["compile"] = bool(out["compile"])
    return out


def plan_extraction(store: Store, model: DiffusionModel, split: Split, t: str, blocks: str, pools: str,
                    input_mode: str = "noised", noise_seed: int = 0, noise_draws: int = 1, compute_dtype: str = "float32",
                    storage_dtype: str = "float16", shard_rows: int | None = None, micro_batch: int | None = None,
                    attention: str | None = None, compile: bool | None = None) -> Plan:
    """Validate every input and every key against the store, then create the pre-sized arrays.

    micro_batch, attention, compile (recipe fields: they change the last bits): None means what the requested
    arrays already hold (a resume never changes bits), else the default for the model and its device."""
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
    paths = [FeatureKey(split.name, split.split, model.name, input_mode, tt, b, p).path for tt in ts for b in bs for p in ps]
    with store.prefetched(paths):  # planning reads each array's group several times: read them all once, at once
        forward = forward_options(store, paths, model, compute_dtype, micro_batch, attention, compile)
        recipe = Recipe(model.fingerprint, split.fingerprint(pre), noise_seed, noise_draws, compute_dtype, storage_dtype, **forward)
        mb = recipe.micro_batch
        if shard_rows is not None and (shard_rows <= 0 or shard_rows % mb):  # shards start on the micro-batch partition
            raise DiffstoreError(f"--shard-rows must be a positive multiple of the micro-batch ({mb}), got {shard_rows}")
        plan = Plan(model, split, pre, recipe, ts, bs, ps, input_mode, shard_rows or 0)
        # Refuse before writing anything: sample ids, then every key's fingerprint.
        store.check_split(split)
        for tt in ts:
            for b in bs:
                for p in ps:
                    store.check(plan.key(tt, b, p).path, recipe.fingerprint(plan.key(tt, b, p)), plan.attrs(tt, b, p))
        stored = {path: store.stored_shard_rows(path) for path in (plan.key(tt, b, p).path for tt in ts for b in bs for p in ps)}
        existing = sorted({n for n in stored.values() if n is not None})
        if len(existing) > 1:
            raise DiffstoreError("the requested arrays were written with different shard sizes; extract them in separate calls")
        if existing and shard_rows is not None and shard_rows != existing[0]:
            raise DiffstoreError(f"--shard-rows {shard_rows}: the stored arrays of these keys have {existing[0]} rows per "
                                 f"shard. Drop --shard-rows (or pass {existing[0]}) to resume them; nothing was written")
        if existing:
            plan.shard_rows = existing[0]  # same fingerprint, same micro-batch: it divides the shards it was made with
        elif not plan.shard_rows:
            plan.shard_rows = default_shard_rows(sum(np.prod(plan.row_shape(b, p)) for b in bs for p in ps) * 4, mb)
        plan.created = [path for path, n in stored.items() if n is None and store._group(path) is None]
        record = store.put_split(split)
        for tt in ts:
            for b in bs:
                for p in ps:
                    key = plan.key(tt, b, p)
                    plan.arrays[(tt, b, p)] = store.create(key.path, recipe.fingerprint(key), plan.attrs(tt, b, p),
                                                           plan.row_shape(b, p), len(split), plan.shard_rows, storage_dtype,
                                                           split=record)
        return plan


def default_shard_rows(row_bytes: int, micro_batch: int) -> int:
    """Rows per shard when none is stored or asked for: up to 16 micro-batches, all of a task's float32 rows
    (row_bytes: one row of every requested array) within SHARD_BYTES."""
    return int(max(1, min(16, SHARD_BYTES // max(row_bytes * micro_batch, 1)))) * micro_batch


def done_masks(arrays: dict) -> dict:
    """{key: bool [n_shards]} for `arrays` (key -> ShardedArray) from one concurrent listing of their done
    flags' directories, not one read per (array, shard): a done flag's chunk is stored only once it is set
    (its fill value 0 is never written), so a re-run of a finished extraction costs one round of listings."""
    if not arrays:
        return {}
    some = next(iter(arrays.values()))
    chunk_key = some.group["done"].metadata.encode_chunk_key  # every done array is made by Store.create alike
    folder = posixpath.dirname(chunk_key((0,)))  # "c"

    async def listing(a):
        return {k async for k in a.group.store.list_dir(f"{a.path}/done/{folder}")}

    async def every():
        return await asyncio.gather(*(listing(a) for a in arrays.values()))

    present = dict(zip(arrays, sync(every())))
    return {k: np.array([posixpath.basename(chunk_key((i,))) in present[k] for i in range(a.n_shards)])
            for k, a in arrays.items()}


def pending(plan: Plan) -> list[tuple[int, int]]:
    """Tasks (t, shard) with at least one requested array whose shard is not done."""
    n_shards = math.ceil(len(plan.split) / plan.shard_rows)
    masks = done_masks(plan.arrays)
    return [(t, i) for t in plan.ts for i in range(n_shards)
            if any(not masks[(t, b, p)][i] for b in plan.blocks for p in plan.pools)]
