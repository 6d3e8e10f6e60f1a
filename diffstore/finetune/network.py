"""The network `diffstore finetune` trains: the denoiser truncated after block b, pooled to p, and a probe head.

    net(x) = head(Standardize(pool_p(block_b(x_t))))

The truncated forward is extraction's own (forward.forward_blocks, with grad=True): a hook on block b stops the
network right after it, so blocks after b never run. Which parameters that forward uses is measured, not assumed
(trainable(): the autograd graph of one forward), and only those get gradients; the rest of the network (the
decoder half of a U-Net, its output layers) stays frozen and unused. The network stays in eval mode even while it
trains (no dropout): the function being trained is the one the store holds.

Inputs are the key's own: images loaded in the store's split order and preprocessed as extraction did, noised
with the project's noise (noise.noised: a function of (noise seed, sample id, t, draw)), each draw's x_t stacked on
the channel axis. Evaluation runs the recipe's fixed micro-batches, so on rows starting at a multiple of it the
untrained pretrained network gives the stored features bit for bit (before the storage cast); training batches run
whole (no padding rows).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..datasets import Split
from ..errors import DiffstoreError
from ..extract.forward import forward_blocks, prepare_model
from ..key import FeatureKey, Recipe
from ..models.base import DiffusionModel
from ..noise import noised
from ..preprocess import Preprocess
from ..probe.feed import Rows

CHUNK_ROWS = 1024  # inputs are prepared this many rows at a time when they stream (a multiple of every micro-batch)


def draws(key: FeatureKey, recipe: Recipe) -> int:
    """Noise draws a row holds: clean input and t = 0 need none beyond x_0 itself."""
    return recipe.noise_draws if key.input == "noised" and key.t > 0 else 1


class Truncated(nn.Module):
    """Rows of stacked x_t draws [B, draws * C, S, S] -> block b's map pooled to p, averaged over the draws: the
    values extraction stores for the key (float32, before the storage cast)."""

    def __init__(self, model: DiffusionModel, key: FeatureKey, recipe: Recipe):
        super().__init__()
        self.network = model.module  # registered: its parameters are the net's
        self.model, self.key, self.recipe, self.draws = model, key, recipe, draws(key, recipe)
        prepare_model(model, recipe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, r = self.key, self.recipe
        views = list(x.unflatten(1, (self.draws, -1)).unbind(1))
        out = forward_blocks(self.model, views[0], k.t, None, None, r.noise_seed, self.draws, k.input, [k.block],
                             [k.pool], r.compute_dtype, len(x) if self.training else r.micro_batch,
                             inputs=views if k.input == "noised" and k.t > 0 else None, grad=torch.is_grad_enabled())
        return out[(k.block, k.pool)]

    def train(self, mode: bool = True) -> "Truncated":
        super().train(mode)
        self.network.eval()
        return self


def check_model(model: DiffusionModel) -> None:
    """Refuse what fine-tuning cannot train honestly: latent models, and networks conditioned on the dataset's
    labels (a fine-tuned network would learn to read the label it is asked to predict)."""
    if model.encode is not None:
        raise DiffstoreError(f"model {model.name} runs on latents (sd:, dit:): fine-tuning trains pixel-space "
                             "networks (diffusers U-Nets, adm:, py: plugins)")
    if model.config.get("labels", {}).get("policy") == "dataset":
        raise DiffstoreError(f"model {model.name} is conditioned on the dataset's labels: a fine-tuned network would "
                             "learn to read them. Fine-tune a key extracted with --class-label N")


def trainable(net: Truncated, x: torch.Tensor) -> int:
    """Give gradients to exactly the network's parameters the truncated forward uses (found from the autograd graph
    of one forward on x); freeze the rest. Returns how many values are trainable."""
    params = dict(net.network.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    with torch.enable_grad():
        grads = torch.autograd.grad(net(x).sum(), list(params.values()), allow_unused=True)
    for p, g in zip(params.values(), grads):
        p.requires_grad_(g is not None)
    return sum(p.numel() for p in params.values() if p.requires_grad)


def input_rows(model: DiffusionModel, data: Split, pre: Preprocess, key: FeatureKey, recipe: Recipe, n: int) -> Rows:
    """The first n samples of `data` as network input rows, prepared on read: x_0, or each draw's x_t stacked."""
    k = draws(key, recipe)
    abar = float(model.alphas_cumprod[key.t])

    def read(sl: slice) -> np.ndarray:
        rows = np.arange(n)[sl]
        images = pre(data.load(rows))
        if key.input != "noised" or key.t == 0:
            return images.numpy()
        ids = data.ids[rows]
        return torch.cat([noised(images, recipe.noise_seed, ids, key.t, d, abar) for d in range(k)], 1).numpy()

    return Rows(n, (k * model.image_channels, model.image_size, model.image_size), CHUNK_ROWS, read)


def output_rows(net: Truncated, inputs: Rows, device: torch.device) -> Rows:
    """The truncated network's outputs on `inputs`, computed on read (eval mode, no gradients)."""
    info = net.model.blocks[net.key.block]
    side = (info.height, info.width) if net.key.pool == "full" else (int(net.key.pool),) * 2

    @torch.no_grad()
    def read(sl: slice) -> np.ndarray:
        net.eval()
        return net(torch.from_numpy(inputs.read(sl)).to(device)).cpu().numpy()

    return Rows(inputs.n_rows, (info.channels, *side), inputs.chunk_rows, read)
