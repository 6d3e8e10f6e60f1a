"""Transformer blocks as feature maps: a block's tokens [B, N, C] seen as [B, C, h, w] over the patch grid.

The extractor hooks modules whose output is a map. `token_maps` gives each transformer block a child module,
`feature_map`, that its forward hook calls with the block's output: the child returns the tokens as a map (what the
extractor's hook on that child sees), while the block's own output, the tokens, flows on unchanged to the next
block. So a block table points at `<block>.feature_map`, pools and heads see [C, h, w] maps, and raising from the
child's hook (early exit) stops the forward right after that block. The network's parameters, state_dict keys and
outputs are untouched. DiT uses it (dit.py); so can a py: plugin for any ViT-style denoiser (SiT, REPA).
"""

from __future__ import annotations

import torch
from torch import nn

from ..blocks import first_tensor
from ..errors import DiffstoreError


class TokenMap(nn.Module):
    """[B, prefix + h*w, C] tokens in row-major patch order -> [B, C, h, w] (prefix tokens such as CLS dropped)."""

    def __init__(self, height: int, width: int, prefix: int = 0):
        super().__init__()
        self.height, self.width, self.prefix = height, width, prefix

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        grid = tokens[:, self.prefix:]
        if grid.dim() != 3 or grid.shape[1] != self.height * self.width:
            raise DiffstoreError(f"tokens of shape {tuple(tokens.shape)} do not fill a {self.height}x{self.width} "
                                 f"patch grid after {self.prefix} prefix tokens; check the grid given to token_maps")
        return grid.transpose(1, 2).unflatten(2, (self.height, self.width))

    def extra_repr(self) -> str:
        return f"grid={self.height}x{self.width}, prefix={self.prefix}"


def _emit_map(block: nn.Module, _inputs, output) -> None:
    block.feature_map(first_tensor(output))  # returns None: the block's output is not replaced


def token_maps(net: nn.Module, block_paths: list[str], grid: tuple[int, int], prefix: int = 0,
               names: list[str] | None = None) -> list[tuple[str, str]]:
    """Attach a TokenMap to each block of `net` (once) and return the block units (name, path of its map)
    for a block table, in the order given (forward order). Names default to layer1..layerN (1-based depth)."""
    names = names or [f"layer{i}" for i in range(1, len(block_paths) + 1)]
    units = []
    for name, path in zip(names, block_paths):
        block = net.get_submodule(path)
        if not hasattr(block, "feature_map"):
            block.feature_map = TokenMap(*grid, prefix=prefix)
            block.register_forward_hook(_emit_map)
        units.append((name, f"{path}.feature_map"))
    return units
