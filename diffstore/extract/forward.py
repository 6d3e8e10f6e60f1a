"""One truncated forward per (micro-batch, t): hooks on the requested blocks, pooling on the device, noise draws
averaged. Every forward runs on exactly `micro_batch` rows (the last micro-batch padded), see options.MICRO_BATCH."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import first_tensor
from ..key import Recipe
from ..models.base import DiffusionModel
from ..noise import add_noise, noise
from .options import MICRO_BATCH
from .plan import AUTOCAST


class StopForward(Exception):
    """Raised from the deepest requested block's hook: the rest of the network is never run."""


def run_truncated(model: DiffusionModel, x: torch.Tensor, t: torch.Tensor, labels,
                  blocks: list[int]) -> dict[int, torch.Tensor]:
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


def prepare_model(model: DiffusionModel, recipe: Recipe) -> None:
    """Put the recipe's forward settings on the network: attention kernels, and torch.compile when asked."""
    model.module.eval()
    if model.set_attention is not None:
        model.set_attention(recipe.attention)
    if recipe.compile and not getattr(model.module, "_diffstore_compiled", False):
        compile_blocks(model)
        model.module._diffstore_compiled = True


def compile_blocks(model: DiffusionModel, backend: str = "inductor") -> None:
    """torch.compile the largest submodules of every block that hold no hooked block: the hooks (and the
    StopForward they raise) stay in eager Python, the layers between them run as compiled graphs."""
    hooked = {b.module for b in model.blocks}

    def visit(path: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            p = f"{path}.{name}"
            if (p in hooked or any(h.startswith(p + ".") for h in hooked)
                    or isinstance(child, (nn.ModuleList, nn.ModuleDict))):
                visit(p, child)
            else:
                child.compile(dynamic=False, backend=backend)

    for b in model.blocks:
        visit(b.module, model.module.get_submodule(b.module))


@torch.no_grad()
def encode_images(model: DiffusionModel, images: torch.Tensor, micro_batch: int = MICRO_BATCH) -> torch.Tensor:
    """Preprocessed images -> x_0 in the model's space (SD latents; the images themselves otherwise), on the
    images' device, encoded in the same padded micro-batches as the forward, so latents too are independent of
    the batch size."""
    if model.encode is None:
        return images
    device = next(model.module.parameters()).device
    out = []
    for i in range(0, len(images), micro_batch):
        x = images[i:i + micro_batch]
        pad = micro_batch - len(x)
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) if pad else x
        out.append(model.encode(x.to(device)).float()[:micro_batch - pad].to(images.device))
    return torch.cat(out)


def forward_blocks(model: DiffusionModel, x0: torch.Tensor, t: int, ids, labels, seed: int, draws: int,
                   input_mode: str, blocks: list[int], pools: list[str], compute_dtype: str = "float32",
                   micro_batch: int = MICRO_BATCH, inputs: list[torch.Tensor] | None = None,
                   grad: bool = False) -> dict:
    """{(block, pool): float32 tensor on the model's device} for one batch at one t, averaged over `draws` draws.

    x0 is the model-space input (images in [-1, 1], or latents), on the CPU or the model's device: noise is added
    to it where it lies. inputs: the noised input x_t of each draw for these rows, prepared ahead (by a loader
    worker, as add_noise(x0, noise.noise(...)) does here); None: drawn and added here. t = 0 with noised input, and
    clean input at any t, need no noise: one draw is computed. Rows run in fixed micro-batches of `micro_batch`;
    for batch-size invariance the caller's batch must start at a row index that is a multiple of it. grad=True keeps
    the autograd graph (fine-tuning trains through this forward); extraction runs without it.
    """
    with torch.set_grad_enabled(grad):
        device = next(model.module.parameters()).device
        noised = input_mode == "noised" and t > 0
        n_draws = draws if noised else 1
        abar = float(model.alphas_cumprod[t])
        amp = AUTOCAST[compute_dtype]
        tt = torch.full((micro_batch,), t, dtype=torch.long, device=device)
        parts = []
        for start in range(0, len(x0), micro_batch):
            rows = slice(start, start + micro_batch)
            n = len(x0[rows])
            pad = micro_batch - n
            lab = None if labels is None else torch.as_tensor(np.pad(np.asarray(labels[rows]), (0, pad), mode="edge"),
                                                              device=device)
            out: dict = {}
            for draw in range(n_draws):
                x = x0[rows]
                if noised and inputs is not None:
                    x = inputs[draw][rows]
                elif noised:
                    x = add_noise(x, noise(seed, ids[rows], t, draw, tuple(x0.shape[1:])).to(x.device), abar)
                x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) if pad else x
                with torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext():
                    feats = run_truncated(model, x.to(device, non_blocking=True), tt, lab, blocks)
                for b in blocks:
                    for p in pools:
                        v = pool_map(feats[b][:n].float(), p)
                        out[(b, p)] = v if draw == 0 else out[(b, p)] + v
            parts.append({k: v / n_draws for k, v in out.items()} if n_draws > 1 else out)
        return {k: torch.cat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in parts[0]}
