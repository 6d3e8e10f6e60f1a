"""The block table: the single source of block names, indices and shapes for a model.

b counts from 1 over every unit whose output is a feature map, in forward order (for ADM this is the
paper's numbering: input_blocks 1..N, middle_block, output_blocks). A table is built by tracing: hooks on
the candidate unit paths record which fire, in which order, with which output shape, during one dummy
forward (on the meta device when the adapter allows it, so no weights are needed).
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from .errors import DiffstoreError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class BlockInfo:
    index: int  # b, 1-based, forward order
    name: str  # readable: "down1.res0", "mid", "up2.upsample"; ADM: the module path
    module: str  # module path inside the network, for hooks
    channels: int
    height: int
    width: int

    def to_dict(self) -> dict:
        return asdict(self)


def first_tensor(output):
    """Modules return a tensor, a tuple (diffusers down blocks: (h, skips)) or an output object."""
    import torch

    while not isinstance(output, torch.Tensor):
        if isinstance(output, (tuple, list)):
            output = output[0]
        elif hasattr(output, "sample"):
            output = output.sample
        else:
            raise TypeError(f"block output is not a feature map: {type(output).__name__}")
    return output


class BlockTable:
    """Ordered blocks of one model, with lookup by index, name or alias ('mid')."""

    def __init__(self, blocks: list[BlockInfo], mid: int | None = None):
        self.blocks = list(blocks)
        self.mid = mid  # index of the middle block, for the 'mid' alias

    def __iter__(self):
        return iter(self.blocks)

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, index: int) -> BlockInfo:
        if not 1 <= index <= len(self.blocks):
            raise DiffstoreError(f"block {index} is out of range: this model has blocks 1..{len(self.blocks)}")
        return self.blocks[index - 1]

    def resolve(self, spec: str) -> list[int]:
        """'3,5,mid,8' | 'all' | block names -> sorted unique indices; unknown ones list the valid names."""
        if spec.strip() == "all":
            return [b.index for b in self.blocks]
        names = {b.name: b.index for b in self.blocks}
        if self.mid is not None:
            names["mid"] = self.mid
        out = set()
        for item in (s.strip() for s in spec.split(",") if s.strip()):
            if item.isdigit() and 1 <= int(item) <= len(self.blocks):
                out.add(int(item))
            elif item in names:
                out.add(names[item])
            else:
                close = difflib.get_close_matches(item, list(names), n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise DiffstoreError(
                    f"unknown block {item!r}: valid blocks are 1..{len(self.blocks)} or names "
                    f"({', '.join(list(names)[:12])}{', ...' if len(names) > 12 else ''}).{hint} "
                    "Run `diffstore blocks --model M` for the table."
                )
        if not out:
            raise DiffstoreError("no blocks requested: pass e.g. --blocks mid or --blocks all")
        return sorted(out)

    def to_list(self) -> list[dict]:
        return [b.to_dict() for b in self.blocks]


def trace_blocks(module: "torch.nn.Module", units: list[tuple[str, str]], run,
                 mid_path: str | None = None) -> BlockTable:
    """Run `run()` (a dummy forward) with hooks on `units` [(name, module path)] and record the table.

    Units that never fire are dropped; the order is the order in which they fire, so a wrong candidate
    order cannot produce a wrong numbering.
    """
    import torch

    fired: list[tuple[str, str, tuple]] = []
    handles = []
    for name, path in units:
        def hook(_m, _inp, out, name=name, path=path):
            fired.append((name, path, tuple(first_tensor(out).shape)))
        handles.append(module.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    blocks, mid = [], None
    for i, (name, path, shape) in enumerate(fired, start=1):
        if len(shape) != 4:
            raise DiffstoreError(f"block {name} ({path}) outputs shape {shape}, not a feature map [B, C, H, W]; "
                                 "list only modules whose output is a 4-D map")
        blocks.append(BlockInfo(i, name, path, shape[1], shape[2], shape[3]))
        if path == mid_path:
            mid = i
    return BlockTable(blocks, mid)
