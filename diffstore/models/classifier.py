"""Classifier networks compared with diffusion features (the seed paper's Fig. 6: CKA of the U-Net's blocks against
a ResNet-50's bottlenecks and a ViT's layers), brought in as py: plugins. examples/plugins/resnet50.py and vit.py
are built on these helpers; torchvision and timm are never imported, their weight files load as plain state dicts.

    setting             a factory's argument, else its environment variable (how `--model py:FILE:factory` is
                        given settings: it calls factory() or factory(random_init=S)), else the default
    build               the network under a seed (random_init), or loaded strictly from a local weight file
    classifier_plugin   the plugin dict of a network that is not a diffusion model: T = 1 (only t = 0, x_t = x_0),
                        `run` ignores t and normalises the [-1, 1] images as the network was trained
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import DiffstoreError
from .weights import load_strict, read_state_dict

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's, timm's DEFAULT
INCEPTION_MEAN, INCEPTION_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # timm's INCEPTION: the original ViT weights


def setting(value, env: str, default=None, cast: Callable = str):
    """`value` when given, else $env (cast), else `default`; a malformed variable names itself."""
    if value is not None:
        return value
    text = os.environ.get(env, "").strip()
    if not text:
        return default
    try:
        return cast(text)
    except ValueError:
        raise DiffstoreError(f"${env}={text!r} is not a valid {cast.__name__}") from None


def build(make: Callable[[dict | None], nn.Module], random_init: int | None, weights: str | None,
          what: str, env: str) -> tuple[nn.Module, list[Path]]:
    """(network, weight files). random_init: make(None) under that seed, the caller's RNG untouched. Otherwise
    make(state) (the state tells optional parts, e.g. whether a head is present) loaded strictly from `weights`."""
    if random_init is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random_init)
            return make(None), []
    if not weights:
        raise DiffstoreError(f"{what} needs a local weight file: set ${env}=FILE (.safetensors, or a torch-saved "
                             "state_dict .pth), or pass --random-init SEED for seeded random weights")
    state = read_state_dict(weights, f"{what} weight file")
    with torch.device("meta"):  # the file's tensors become the parameters: nothing initialised to be overwritten
        net = make(state)
    net = load_strict(net, state, f"{what} weight file {weights}",
                      hint="The file must hold the state_dict of the network this plugin names.")
    return net, [Path(weights).expanduser()]


def classifier_plugin(net: nn.Module, blocks: list, image_size: int, mean: tuple, std: tuple,
                      weight_files: list[Path], config: dict) -> dict:
    """The py: plugin dict for a classifier: RGB at image_size, alphas_cumprod [1.0], run = net(normalised x)."""
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def run(x, t, labels):  # images arrive in [-1, 1]; the network was trained on (x01 - mean) / std
        return net(((x + 1) / 2 - mean_t.to(x)) / std_t.to(x))

    return {"module": net, "blocks": blocks, "alphas_cumprod": [1.0], "image_size": image_size, "image_channels": 3,
            "weight_files": weight_files, "run": run,
            "config": {**config, "image_size": image_size, "mean": list(mean), "std": list(std)}}
