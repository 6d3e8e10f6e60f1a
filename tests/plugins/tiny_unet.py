"""Example plugin: a tiny diffusers UNet2DModel in a lab's own checkpoint layout.

    diffstore extract --model py:tests/plugins/tiny_unet.py:factory ...

The weights live next to this file as tiny_unet.safetensors (loaded with safetensors, never unpickled).
"""

from pathlib import Path

import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file

from diffstore.models.base import linear_alphas_cumprod
from diffstore.models.diffusers_unet import unet_units

WEIGHTS = Path(__file__).with_suffix(".safetensors")


def build() -> UNet2DModel:
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4)


def factory(random_init=None):
    if random_init is None:
        unet = build()
        unet.load_state_dict(load_file(WEIGHTS))
    else:
        with torch.random.fork_rng():
            torch.manual_seed(random_init)
            unet = build()
    return {
        "module": unet,
        "blocks": unet_units(unet),  # (name, path) pairs in forward order, "mid" included
        "alphas_cumprod": linear_alphas_cumprod(1000),
        "image_size": 8,
        "image_channels": 1,
        "weight_files": [] if random_init is not None else [WEIGHTS],
        "run": lambda x, t, labels: unet(x, t).sample,
    }
