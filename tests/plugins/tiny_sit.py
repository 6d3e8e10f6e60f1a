"""Example plugin: a SiT/REPA-style transformer denoiser (tokens -> maps), in a lab's own code and checkpoint layout.

    diffstore extract --model py:tests/plugins/tiny_sit.py:factory --t 100,500 --blocks layer2,layer4 ...

Two things adapt such a checkpoint to the contract:
- Tokens -> maps: `token_maps` gives each transformer block a child whose output is the block's tokens [B, N, C] as
  a map [B, C, h, w] over the patch grid; the blocks to list are those children (prefix=1 would drop a CLS token).
- Time: SiT/REPA train on the linear interpolant x_s = (1 - s) x_0 + s eps, s in [0, 1] (REPA's convention, s = 0
  clean; SiT's own code uses 1 - s). diffstore adds noise the DDPM way, x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps.
  With s = t / T and abar = (1 - s)^2 / ((1 - s)^2 + s^2), x_s = r x_t with r = sqrt((1 - s)^2 + s^2): `run`
  rescales the input and passes s, so the network sees exactly its training distribution.
A real SiT/REPA model works on SD-VAE latents: set encode=diffstore.models.sd.latent_encoder(vae) and image_size to
the pixel size. This tiny one denoises 16x16 RGB pixels directly, 4x4 patches. Weights: tiny_sit.safetensors here.
"""

import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from diffstore.models.tokens import token_maps

WEIGHTS = Path(__file__).with_suffix(".safetensors")
T = 1000  # time steps diffstore sees: t = 0..T-1 -> s = t / T
SIZE, PATCH, WIDTH, DEPTH = 16, 4, 32, 4


class Block(nn.Module):
    """Pre-norm transformer block with the time embedding added to its input (adaLN left out for brevity)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x, c):
        h = self.norm1(x + c[:, None])
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinySiT(nn.Module):
    def __init__(self):
        super().__init__()
        self.x_embedder = nn.Conv2d(3, WIDTH, PATCH, PATCH)
        self.pos_embed = nn.Parameter(torch.randn(1, (SIZE // PATCH) ** 2, WIDTH) * 0.02)
        self.t_embedder = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.SiLU(), nn.Linear(WIDTH, WIDTH))
        self.blocks = nn.ModuleList(Block(WIDTH) for _ in range(DEPTH))
        self.final = nn.Linear(WIDTH, PATCH * PATCH * 3)

    def forward(self, x, s):
        freqs = torch.exp(-math.log(10000) * torch.arange(WIDTH // 2, device=x.device) / (WIDTH // 2))
        angles = 1000 * s.float()[:, None] * freqs[None]
        c = self.t_embedder(torch.cat([angles.cos(), angles.sin()], 1))
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # [B, N, C], row-major patches
        for block in self.blocks:
            x = block(x, c)
        return self.final(x)  # velocity per patch (unpatchify left out: diffstore reads the blocks)


def sit_time(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer t -> (s, r): the interpolant's time and the factor taking DDPM's x_t to x_s."""
    s = t.double() / T
    return s, ((1 - s) ** 2 + s ** 2).sqrt()


def factory(random_init=None):
    with torch.random.fork_rng():
        torch.manual_seed(0 if random_init is None else random_init)
        net = TinySiT()
    if random_init is None:
        net.load_state_dict(load_file(WEIGHTS))
    s = torch.arange(T, dtype=torch.float64) / T

    def run(x, t, labels):
        s_t, r = sit_time(t)
        return net(x * r.to(x.dtype)[:, None, None, None], s_t.to(x.dtype))

    return {
        "module": net,
        "blocks": token_maps(net, [f"blocks.{i}" for i in range(DEPTH)], grid=(SIZE // PATCH, SIZE // PATCH)),
        "alphas_cumprod": (1 - s) ** 2 / ((1 - s) ** 2 + s ** 2),
        "image_size": SIZE,
        "image_channels": 3,
        "weight_files": [] if random_init is not None else [WEIGHTS],
        "config": {"size": SIZE, "patch": PATCH, "width": WIDTH, "depth": DEPTH,
                   "time": "s = t / T, linear interpolant"},
        "run": run,
    }
