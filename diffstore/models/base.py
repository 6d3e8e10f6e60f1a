"""The contract every model backend fills in (diffusers, ADM, Stable Diffusion, py: plugins).

The extractor only sees a DiffusionModel: a network, its block table, its noise schedule, how to call it,
and what identifies it (weights sha256 + architecture config).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..blocks import BlockTable
from ..errors import DiffstoreError
from ..key import model_fingerprint


@dataclass
class DiffusionModel:
    name: str  # the model's segment in store paths
    module: torch.nn.Module  # the network the block table's module paths point into
    blocks: BlockTable
    alphas_cumprod: torch.Tensor  # float64 [T]: abar_t for t = 0..T-1
    image_size: int  # images are resized + center-cropped to this
    image_channels: int  # 1 (grey) or 3 (RGB): images are converted to this
    config: dict  # architecture (+ conditioning) config, plain JSON: part of the model's identity
    weights_sha256: str  # sha256 of the weight files' bytes ("random-init:<seed>" for seeded random weights)
    # run(x, t, labels): one forward of the network on model input x (images or latents in [-1, 1] scale),
    # integer time steps t [B], dataset labels [B] (used only by class-conditional models).
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], object] = None
    # encode(images) -> x_0 in the space noise is added in (SD latents); None means images are x_0.
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None
    source: dict = field(default_factory=dict)  # where it came from (provenance only, not identity)
    # set_attention("eager" | "sdpa"): switch the network's attention kernels (a recipe field: it changes the
    # last bits); None when the network has one implementation only (diffusers already uses SDPA).
    set_attention: Callable[[str], None] | None = None

    def __post_init__(self):
        if self.run is None:
            self.run = lambda x, t, labels: self.module(x, t)

    @property
    def fingerprint(self) -> str:
        return model_fingerprint(self.weights_sha256, self.config)

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def to(self, device: torch.device) -> "DiffusionModel":
        self.module.to(device)
        return self


def load_failure(what: str, e: BaseException) -> DiffstoreError:
    """Why weights did not load, with the real reason: a pickled checkpoint holding more than tensors is refused by
    torch.load(weights_only=True) for safety, and says so (libraries bury that under 'Unable to load weights')."""
    chain, x = [], e
    while x is not None and x not in chain:
        chain.append(x)
        x = x.__cause__ or x.__context__
    text = " ".join(f"{type(x).__name__}: {x}" for x in chain)
    if "weights_only" in text or any(type(x).__name__ == "UnpicklingError" for x in chain):
        return DiffstoreError(f"{what}: its pickled weights hold objects other than tensors, and diffstore never "
                              "unpickles those (torch.load(weights_only=True) refused it, for safety). Use a "
                              ".safetensors file, or re-save the state_dict from a trusted source")
    return DiffstoreError(f"{what}: {type(e).__name__}: {str(e)[:500]}")


def class_labels(class_label: int | str, labels: torch.Tensor | None, n: int, num_classes: int,
                 device: torch.device) -> torch.Tensor:
    """Labels [n] for a class-conditional network (ADM, DiT): `class_label` for every image, or with "dataset" the
    dataset's labels, which must be the model's class indices (ImageNet's for the released checkpoints)."""
    if class_label != "dataset":
        return torch.full((n,), int(class_label), dtype=torch.long, device=device)
    if labels is None:
        raise DiffstoreError("this model is class-conditional and the dataset has no labels: pass --class-label N "
                             f"(a class index 0..{num_classes - 1})")
    y = labels.to(device=device, dtype=torch.long)
    if y.numel() and not (0 <= int(y.min()) and int(y.max()) < num_classes):
        raise DiffstoreError(f"dataset labels {int(y.min())}..{int(y.max())} are not the model's class indices "
                             f"0..{num_classes - 1} (ImageNet classes for the released checkpoints): "
                             "pass --class-label N instead")
    return y


def linear_alphas_cumprod(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear beta schedule (Ho et al.; guided-diffusion 'linear' scales it to 1000 steps)."""
    scale = 1000 / num_timesteps
    betas = torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def cosine_alphas_cumprod(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved-DDPM's cosine schedule, with betas clipped at max_beta as guided-diffusion does."""
    import math

    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), max_beta) for i in range(num_timesteps)]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0)
