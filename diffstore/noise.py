"""Noise as a pure function of (seed, sample id, t, draw).

Each sample gets its own generator, seeded from a hash of those four numbers, and noise is drawn on the
CPU: the same sample gets the same eps whatever the batch it lands in, the worker count or the device.
"""

from __future__ import annotations

import hashlib

import torch


def sample_seed(seed: int, sample_id: int, t: int, draw: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{sample_id}/{t}/{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def noise(seed: int, ids, t: int, draw: int, shape: tuple) -> torch.Tensor:
    """float32 [len(ids), *shape] standard normal noise on the CPU."""
    out = torch.empty((len(ids), *shape), dtype=torch.float32)
    g = torch.Generator()
    for row, sample_id in enumerate(ids):
        g.manual_seed(sample_seed(seed, int(sample_id), t, draw))
        torch.randn(shape, generator=g, out=out[row])  # each row contiguous: the values of a fresh randn(shape)
    return out


def add_noise(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    return alpha_bar ** 0.5 * x0 + (1 - alpha_bar) ** 0.5 * eps


def noised(x0: torch.Tensor, seed: int, ids, t: int, draw: int, alpha_bar: float) -> torch.Tensor:
    """add_noise(x0, noise(seed, ids, t, draw, ...), alpha_bar), bit for bit (the same three float32 roundings),
    in x0's memory layout (kernels may pick algorithms by it), with batch-wide ops rather than three per row."""
    eps = noise(seed, ids, t, draw, tuple(x0.shape[1:])).mul_((1 - alpha_bar) ** 0.5)
    return (x0 * alpha_bar ** 0.5).add_(eps)
