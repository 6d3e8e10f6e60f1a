"""State dicts from local weight files: read without running code, loaded strictly with every mismatch named.

    read_state_dict   .safetensors through safetensors, anything else through torch.load(weights_only=True)
    mismatches        missing keys, unexpected keys and shape mismatches between a network and a state dict
    load_strict       load only when every key and shape fits; otherwise a DiffstoreError naming them

A network that loads a near-miss file partially computes silently wrong features, so nothing loads non-strictly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DiffstoreError
from .base import load_failure


def read_state_dict(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch-saved state_dict (.pt, .pth, .bin: weights_only, so no code runs)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DiffstoreError(f"{what} {path} does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(p)
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise load_failure(f"could not read {what} {path} (a state_dict: .pt, .pth, .bin or .safetensors)", e) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DiffstoreError(f"{path} is not a plain state_dict (name -> tensor): save model.state_dict() itself")
    return dict(state)


def mismatches(expected: dict[str, torch.Size], state: dict, optional: tuple[str, ...] = ()) -> list[str]:
    """'missing keys: a, b; unexpected keys: c; shape mismatches: d (3,) vs (4,)' parts, empty when the state
    fits; keys ending in one of `optional` may be absent (e.g. num_batches_tracked, which torch fills in)."""
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith(optional))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v)]

    def few(items):
        return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

    return [f"{name}: {few(items)}" for name, items in
            (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if items]


def load_strict(net: torch.nn.Module, state: dict, what: str, hint: str = "") -> torch.nn.Module:
    """net with the state's tensors as its own (floats as float32), after checking every key and shape; net may
    be built on the meta device (no memory, no init to throw away). A BatchNorm's num_batches_tracked may be
    missing (files saved before torch 0.4.1, torchvision's first ResNet weights): it starts at 0, as torch does."""
    expected = net.state_dict()
    problems = mismatches({k: v.shape for k, v in expected.items()}, state, optional=("num_batches_tracked",))
    if problems:
        raise DiffstoreError(f"{what} does not fit the network: {'; '.join(problems)}." + (f" {hint}" if hint else ""))
    state = {k: torch.zeros((), dtype=torch.long) for k in expected if k not in state} | \
        {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    net.load_state_dict(state, strict=True, assign=True)
    return net
