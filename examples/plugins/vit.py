"""ViT-B/16 and ViT-S/16 in timm's layout, as comparison networks: every transformer layer is a block, its tokens read
as a map over the patch grid (the class token dropped).

    DIFFSTORE_VIT_WEIGHTS=model.safetensors diffstore extract --model py:examples/plugins/vit.py:base \
        --model-name vit-b16-224px --dataset digits --split test --t 0 --blocks all --pools 1
    DIFFSTORE_VIT_SIZE=64 diffstore extract --model py:examples/plugins/vit.py:small --random-init 0 ...

Factories: `base` = timm's vit_base_patch16_224 (768 wide, 12 layers, 12 heads), `small` = vit_small_patch16_224
(384, 12, 6). Weights: that timm model's state_dict (e.g. the model.safetensors of timm/vit_base_patch16_224.
augreg2_in21k_ft_in1k on the Hugging Face hub), from factory(weights=FILE) or $DIFFSTORE_VIT_WEIGHTS, loaded
strictly: names and shapes equal timm's (cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2}, norm, head); a file without head.* (DINO, MAE: timm's num_classes=0) loads
without a head. timm itself is not needed. --random-init S: seeded weights with timm's scheme (truncated-normal
0.02 linear layers and position embedding, zero biases).
Images: RGB at image_size (factory argument or $DIFFSTORE_VIT_SIZE, a multiple of 16, default 224); the position
embedding is resampled bicubically to another grid, as timm does for a dynamic image size. Normalisation
(argument `norm` or $DIFFSTORE_VIT_NORM): "inception" (mean = std = 0.5, timm's setting for the vit_*_patch16_224
ImageNet weights; the default) or "imagenet" (DINO, MAE, DeiT weights). Not a diffusion model: extract at --t 0.
Blocks: layer1..layer12, each [width, S/16, S/16].
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffstore.models.classifier import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    build,
    classifier_plugin,
    setting,
)
from diffstore.models.tokens import token_maps

PATCH, DEPTH, TRAIN_SIZE = 16, 12, 224
NORMS = {"inception": (INCEPTION_MEAN, INCEPTION_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm: x + attn(norm1(x)), then + mlp(norm2(x)); LayerNorm eps 1e-6 as timm's."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width, eps=1e-6), Attention(width, heads)
        self.norm2, self.mlp = nn.LayerNorm(width, eps=1e-6), Mlp(width)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, PATCH, PATCH)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, h*w, C], row-major patches


class VisionTransformer(nn.Module):
    def __init__(self, width: int, heads: int, grid: int, num_classes: int):
        super().__init__()
        self.patch_embed = PatchEmbed(width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, width))  # class token + the trained grid
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(DEPTH)))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, num_classes) if num_classes else nn.Identity()

    def position(self, grid: int) -> torch.Tensor:
        """The position embedding for a grid x grid input: the stored one, or its patch part resampled."""
        stored = math.isqrt(self.pos_embed.shape[1] - 1)
        if grid == stored:
            return self.pos_embed
        patches = self.pos_embed[:, 1:].reshape(1, stored, stored, -1).permute(0, 3, 1, 2).float()
        patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True)
        return torch.cat([self.pos_embed[:, :1], patches.flatten(2).transpose(1, 2).to(self.pos_embed)], 1)

    def forward(self, x):
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], 1) + self.position(x.shape[-1] // PATCH)
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def maker(width: int, heads: int):
    def make(state: dict | None) -> VisionTransformer:
        """Grid and classes from the file (a 384-px checkpoint, a headless DINO one); seeded init as timm's."""
        grid = math.isqrt(state["pos_embed"].shape[1] - 1) if state and "pos_embed" in state else TRAIN_SIZE // PATCH
        classes = (state["head.weight"].shape[0] if "head.weight" in state else 0) if state else 1000
        net = VisionTransformer(width, heads, grid, classes)
        if state is None:
            for m in net.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
            nn.init.trunc_normal_(net.pos_embed, std=0.02)
            nn.init.normal_(net.cls_token, std=1e-6)
        return net
    return make


def vit(width: int, heads: int, name: str, random_init, weights, image_size, norm) -> dict:
    image_size = setting(image_size, "DIFFSTORE_VIT_SIZE", TRAIN_SIZE, int)
    norm = setting(norm, "DIFFSTORE_VIT_NORM", "inception")
    if image_size % PATCH or image_size < PATCH:
        raise ValueError(f"image_size {image_size} is not a positive multiple of the patch size {PATCH}")
    if norm not in NORMS:
        raise ValueError(f"normalisation {norm!r} is unknown: use {' or '.join(NORMS)}")
    net, files = build(maker(width, heads), random_init, setting(weights, "DIFFSTORE_VIT_WEIGHTS"), name,
                       "DIFFSTORE_VIT_WEIGHTS")
    grid = image_size // PATCH
    blocks = token_maps(net, [f"blocks.{i}" for i in range(DEPTH)], grid=(grid, grid), prefix=1)
    return classifier_plugin(net, blocks, image_size, *NORMS[norm], files,
                             {"architecture": f"timm {name}", "normalisation": norm,
                              "num_classes": getattr(net.head, "out_features", 0)})


def base(random_init=None, weights=None, image_size=None, norm=None):
    return vit(768, 12, "vit_base_patch16_224", random_init, weights, image_size, norm)


def small(random_init=None, weights=None, image_size=None, norm=None):
    return vit(384, 6, "vit_small_patch16_224", random_init, weights, image_size, norm)
