"""One truncated forward per (micro-batch, t): hooks on the requested blocks, pooling, noise draws averaged."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from ..blocks import first_tensor
from ..models.base import DiffusionModel
from ..noise import add_noise, noise
from .plan import COMPUTE_DTYPES, MICRO_BATCH


class StopForward(Exception):
    """Raised from the deepest requested block's hook: the rest of the network is never run."""


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

