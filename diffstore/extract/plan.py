"""Plan an extraction: validate every option and key against the store, refuse before writing, create arrays."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from ..datasets import Split
from ..errors import DiffstoreError
from ..key import LEGACY_FORWARD, FeatureKey, Recipe
from ..models.base import DiffusionModel
from ..options import spell
from ..preprocess import Preprocess
from ..store import Store
from ..store.arrays import done_masks
from .grow import grow_split, stored_prefix
from .options import MICRO_BATCH, ExtractOptions, check_pools, check_ts, row_range

AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}  # name -> autocast dtype
SHARD_BYTES = 256 << 20  # default shard size bound: all (block, pool) buffers of one task stay in RAM
# Every forward runs on exactly micro_batch rows from a fixed partition of row indices (the last one padded):
# CPU/GPU kernels pick algorithms and split work by tensor size, so values would otherwise depend on
# --batch-size at the ulp level. Fixed shapes make features bit-identical whatever the batch size. The
# micro-batch is a recipe field; MICRO_BATCH (options.py) is the CPU default.
# On CUDA: the largest power of two whose activations fit this share of the card's memory, within these bounds.
CUDA_MEMORY_SHARE = 0.25
CUDA_MICRO_BATCH = (128, 512)


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
    amp = AUTOCAST[compute_dtype]
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
    rows: range = range(0)  # the rows this run extracts (--limit / --rows); the arrays hold the whole split
    arrays: dict = field(default_factory=dict)  # (t, block, pool) -> ShardedArray
    new: list = field(default_factory=list)  # dry run: the (t, block, pool) whose arrays would be created
    created: list = field(default_factory=list)  # paths this plan created (removed again if it fails unstarted)

    def key(self, t: int, b: int, p: str) -> FeatureKey:
        return FeatureKey(self.split.name, self.split.split, self.model.name, self.input_mode, t, b, p)

    def attrs(self, t: int, b: int, p: str) -> dict:
        return {"key": self.key(t, b, p).to_dict(), "recipe": self.recipe.to_dict(),
                "block": self.model.blocks[b].to_dict(), "preprocess": self.preprocess.to_dict(),
                "model": {"name": self.model.name, "source": self.model.source},
                "dataset": {"source": self.split.source, "class_names": self.split.class_names}}

    def shards(self) -> range:
        """The shards holding this run's rows (each computed whole)."""
        if not self.rows:
            return range(0)
        return range(self.rows.start // self.shard_rows, -(-self.rows.stop // self.shard_rows))

    def row_shape(self, b: int, p: str) -> tuple:
        info = self.model.blocks[b]
        return (info.channels, info.height, info.width) if p == "full" else (info.channels, int(p), int(p))


def forward_options(store: Store, paths: list[str], model: DiffusionModel, o: ExtractOptions) -> dict:
    """The recipe's forward fields: as given, else as the arrays at `paths` hold them, else the defaults."""
    if o.attention == "sdpa" and model.set_attention is None:
        raise DiffstoreError(f"model {model.name} has one attention implementation only; drop "
                             f"{spell('attention', ExtractOptions)}")
    recipes = [{**LEGACY_FORWARD, **g.attrs["recipe"]} for g in map(store._group, paths)
               if g is not None and "recipe" in g.attrs]
    out = {}
    for name in ("micro_batch", "attention", "compile"):
        value = getattr(o, name)
        held = sorted({r[name] for r in recipes}, key=str)
        if value is None and len(held) > 1:
            raise DiffstoreError(f"the requested arrays were computed with {name} {held}; pass "
                                 f"{spell(name, ExtractOptions)} or extract them in separate calls")
        out[name] = value if value is not None else (held[0] if held else None)
    if out["micro_batch"] is None:
        out["micro_batch"] = default_micro_batch(model, o.compute_dtype)
    if out["attention"] is None:
        out["attention"] = "eager" if model.set_attention is None else "sdpa"
    out["compile"] = bool(out["compile"])
    return out


def plan_extraction(store: Store, model: DiffusionModel, split: Split, options: ExtractOptions | None = None,
                    **overrides) -> Plan:
    """Validate every input and every key against the store, then create the pre-sized arrays.

    options: the extraction's options (ExtractOptions; keywords override them, e.g. t=[10], shard_rows=16). Of
    the forward settings (micro_batch, attention, compile: recipe fields, they change the last bits), None means
    what the requested arrays already hold (a resume never changes bits), else the default for the model."""
    o = (options or ExtractOptions()).replace(**overrides) if overrides else (options or ExtractOptions())
    n_views = len(split.source.get("views", [])) or 1  # a view split: --limit / --rows count samples
    rows = row_range(o, split.source.get("base_split", split.split), len(split) // n_views)
    rows = range(rows.start * n_views, rows.stop * n_views)
    if model.encode is None and model.image_channels not in (1, 3):
        raise DiffstoreError(f"model {model.name} takes {model.image_channels}-channel input; images can only be "
                             "adapted to 1 (grey) or 3 (RGB) channels. Use a plugin (py:) whose factory adapts "
                             "the input")
    ts, bs, ps = check_ts(o.t, model.num_timesteps), model.blocks.resolve(",".join(o.blocks)), check_pools(o.pools)
    for b in bs:
        info = model.blocks[b]
        too_big = [p for p in ps if p != "full" and (int(p) > info.height or int(p) > info.width)]
        if too_big:
            raise DiffstoreError(f"pool {too_big[0]} is larger than block {b} ({info.name}: "
                                 f"{info.height}x{info.width}); use pools <= {min(info.height, info.width)} or 'full'")
    pre = Preprocess(size=model.image_size, channels=model.image_channels)
    paths = [FeatureKey(split.name, split.split, model.name, o.input, tt, b, p).path
             for tt in ts for b in bs for p in ps]
    # A split an older version stored as a prefix of this one is grown first (grow.py); a dry run only says so.
    legacy = stored_prefix(store, split) if o.dry_run else None
    if not o.dry_run:
        grow_split(store, split)
    with store.prefetched(paths):  # planning reads each array's group several times: read them all once, at once
        forward = forward_options(store, paths, model, o)
        recipe = Recipe(model.fingerprint, split.fingerprint(pre), o.noise_seed, o.noise_draws, o.compute_dtype,
                        o.dtype, **forward)
        mb = recipe.micro_batch
        if o.shard_rows is not None and o.shard_rows % mb:  # shards start on the micro-batch partition
            raise DiffstoreError(f"{spell('shard_rows', ExtractOptions)} must be a positive multiple of the "
                                 f"micro-batch ({mb}), got {o.shard_rows}")
        plan = Plan(model, split, pre, recipe, ts, bs, ps, o.input, o.shard_rows or 0, rows)
        # Refuse before writing anything: sample ids, then every key's fingerprint (arrays of a prefix split a dry
        # run leaves ungrown still carry the prefix's fingerprint: they are reported, not checked).
        if legacy is None:
            store.check_split(split)
            for tt in ts:
                for b in bs:
                    for p in ps:
                        key = plan.key(tt, b, p)
                        store.check(key.path, recipe.fingerprint(key), plan.attrs(tt, b, p))
        stored = {path: store.stored_shard_rows(path) for path in paths}
        existing = sorted({n for n in stored.values() if n is not None})
        if len(existing) > 1:
            raise DiffstoreError("the requested arrays were written with different shard sizes; extract them in "
                                 "separate calls")
        if existing and o.shard_rows is not None and o.shard_rows != existing[0]:
            raise DiffstoreError(f"{spell('shard_rows', ExtractOptions)} {o.shard_rows}: the stored arrays of these "
                                 f"keys have {existing[0]} rows per shard. Drop it (or pass {existing[0]}) to resume "
                                 "them; nothing was written")
        if existing:
            plan.shard_rows = existing[0]  # same fingerprint, same micro-batch: it divides the shards it was made with
        elif not plan.shard_rows:
            plan.shard_rows = default_shard_rows(sum(np.prod(plan.row_shape(b, p)) for b in bs for p in ps) * 4, mb)
        if o.dry_run:  # nothing written: the arrays there are opened, the others listed
            for tt, b, p in ((tt, b, p) for tt in ts for b in bs for p in ps):
                if stored[plan.key(tt, b, p).path] is None:
                    plan.new.append((tt, b, p))
                else:
                    plan.arrays[(tt, b, p)] = store.open_array(plan.key(tt, b, p).path)
            return plan
        plan.created = [path for path, n in stored.items() if n is None and store._group(path) is None]
        split_path = f"datasets/{split.name}/{split.split}"
        plan.created += [split_path] if store._group(split_path) is None else []
        record = store.put_split(split)
        for tt in ts:
            for b in bs:
                for p in ps:
                    key = plan.key(tt, b, p)
                    plan.arrays[(tt, b, p)] = store.create(key.path, recipe.fingerprint(key), plan.attrs(tt, b, p),
                                                           plan.row_shape(b, p), len(split), plan.shard_rows, o.dtype,
                                                           split=record)
        return plan


def default_shard_rows(row_bytes: int, micro_batch: int) -> int:
    """Rows per shard when none is stored or asked for: up to 16 micro-batches, all of a task's float32 rows
    (row_bytes: one row of every requested array) within SHARD_BYTES."""
    return int(max(1, min(16, SHARD_BYTES // max(row_bytes * micro_batch, 1)))) * micro_batch


def pending(plan: Plan) -> list[tuple[int, int]]:
    """Tasks (t, shard) of this run's rows with at least one requested array whose shard is not done."""
    masks = done_masks(plan.arrays)
    return [(t, i) for t in plan.ts for i in plan.shards()
            if any(not masks[(t, b, p)][i] for b in plan.blocks for p in plan.pools)]
