"""The producer: run the U-Net once per (batch, t) and fill every requested (block, pool) array.

Follow `diffstore extract` from the CLI: cli.extract -> plan_extraction (validate everything, refuse before
writing) -> extract_features (loop over tasks (t, shard)) -> run_task -> forward_blocks (one truncated
forward with hooks) -> ShardedArray.write_shard (store.py).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .blocks import first_tensor
from .datasets import Split
from .errors import DiffstoreError
from .key import INPUT_MODES, FeatureKey, Recipe
from .models.base import DiffusionModel
from .noise import add_noise, noise
from .preprocess import Preprocess
from .progress import progress
from .store import Store

COMPUTE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
STORAGE_DTYPES = ("float16", "float32")
SHARD_BYTES = 256 << 20  # default shard size bound: all (block, pool) buffers of one task stay in RAM
# Every forward runs on exactly MICRO_BATCH rows from a fixed partition of row indices (the last one padded):
# CPU/GPU kernels pick algorithms and split work by tensor size, so values would otherwise depend on
# --batch-size at the ulp level. Fixed shapes make features bit-identical whatever the batch size.
MICRO_BATCH = 16


class StopForward(Exception):
    """Raised from the deepest requested block's hook: the rest of the network is never run."""


def pick_device(device: str | None = "auto") -> torch.device:
    """'auto' (or None): CUDA when present, else the CPU; anything else as torch names it."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def run_truncated(model: DiffusionModel, x: torch.Tensor, t: torch.Tensor, labels, blocks: list[int]) -> dict[int, torch.Tensor]:
    """Outputs of `blocks` from one forward that stops right after the last of them."""
    feats: dict[int, torch.Tensor] = {}

    def make_hook(b):
        def hook(_module, _inputs, output):
            feats[b] = first_tensor(output)
            if len(feats) == len(blocks):
                raise StopForward
        return hook

    handles = [model.module.get_submodule(model.blocks[b].module).register_forward_hook(make_hook(b)) for b in blocks]
    try:
        model.run(x, t, labels)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return feats


def pool_map(f: torch.Tensor, pool: str) -> torch.Tensor:
    return f if pool == "full" else F.adaptive_avg_pool2d(f.float(), int(pool))


@torch.no_grad()
def encode_images(model: DiffusionModel, images: torch.Tensor) -> torch.Tensor:
    """Preprocessed images -> x_0 in the model's space (SD latents; the images themselves otherwise), encoded in
    the same padded micro-batches as the forward, so latents too are independent of the batch size."""
    if model.encode is None:
        return images
    device = next(model.module.parameters()).device
    out = []
    for i in range(0, len(images), MICRO_BATCH):
        x = images[i:i + MICRO_BATCH]
        pad = MICRO_BATCH - len(x)
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) if pad else x
        out.append(model.encode(x.to(device)).float().cpu()[:MICRO_BATCH - pad])
    return torch.cat(out)


@torch.no_grad()
def forward_blocks(model: DiffusionModel, x0: torch.Tensor, t: int, ids, labels, seed: int, draws: int,
                   input_mode: str, blocks: list[int], pools: list[str], compute_dtype: str = "float32") -> dict:
    """{(block, pool): float32 tensor} for one batch at one t, averaged over `draws` noise draws.

    x0 is the model-space input (images in [-1, 1], or latents): noise is added to it on the CPU and moved.
    t = 0 with noised input, and clean input at any t, need no noise: one draw is computed.
    Rows are processed in fixed micro-batches of MICRO_BATCH; for batch-size invariance the caller's batch
    must start at a row index that is a multiple of MICRO_BATCH (run_task ensures it).
    """
    if len(x0) > MICRO_BATCH:
        parts = [forward_blocks(model, x0[i:i + MICRO_BATCH], t, ids[i:i + MICRO_BATCH],
                                None if labels is None else labels[i:i + MICRO_BATCH], seed, draws, input_mode,
                                blocks, pools, compute_dtype) for i in range(0, len(x0), MICRO_BATCH)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    n, pad = len(x0), MICRO_BATCH - len(x0)
    device = next(model.module.parameters()).device
    n_draws = draws if (input_mode == "noised" and t > 0) else 1
    tt = torch.full((MICRO_BATCH,), t, dtype=torch.long, device=device)
    lab = None if labels is None else torch.as_tensor(np.pad(np.asarray(labels), (0, pad), mode="edge"), device=device)
    amp = COMPUTE_DTYPES[compute_dtype]
    out: dict = {}
    for draw in range(n_draws):
        x = x0
        if input_mode == "noised" and t > 0:
            x = add_noise(x0, noise(seed, ids, t, draw, tuple(x0.shape[1:])), float(model.alphas_cumprod[t]))
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) if pad else x
        with torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext():
            feats = run_truncated(model, x.to(device), tt, lab, blocks)
        for b in blocks:
            for p in pools:
                v = pool_map(feats[b][:n].float(), p)
                out[(b, p)] = v if draw == 0 else out[(b, p)] + v
    return {k: v / n_draws for k, v in out.items()} if n_draws > 1 else out


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
    elif plan.shard_rows < 0 or plan.shard_rows % MICRO_BATCH:
        raise DiffstoreError(f"--shard-rows must be a positive multiple of {MICRO_BATCH} (the fixed micro-batch), "
                             f"got {plan.shard_rows}")
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
