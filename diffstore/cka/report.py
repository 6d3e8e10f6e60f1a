"""How a CKA matrix is shown: axis labels (block names, t, pool), the terminal table, the PNG heatmap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from ..errors import require
from ..key import FeatureKey
from ..store import ShardedArray
from ..terminal import console as terminal_console

AXIS_NAMES = {"block": "block", "t": "time step t", "pool": "pool p"}


def label(key: FeatureKey, arr: ShardedArray | None, varying: list[str]) -> str:
    """Axis label naming only the fields that vary; blocks by index and, given the array, by name (as in the
    paper's figures)."""
    parts = []
    for f in varying:
        if f == "block":
            name = arr.attrs.get("block", {}).get("name", "") if arr is not None else ""
            parts.append(f"b{key.block} {name}".strip())
        else:
            parts.append({"t": f"t={key.t}", "pool": f"p={key.pool}"}.get(f, str(getattr(key, f))))
    return " ".join(parts) or key.short()


def estimator(payload: dict) -> str:
    """'unbiased, N=360' / 'minibatch, n=256, seed=0, N=1437': what produced the numbers."""
    if payload["method"] == "minibatch":
        return f"minibatch, n={payload['batch_size']}, seed={payload['seed']}, N={payload['n']}"
    return f"{payload['method']}, N={payload['n']}"


def axis_title(payload: dict, side: str) -> str:
    """The heatmap's axis name: the key field that varies along it ('block', 'time step t'), else 'key'; with the
    model when each axis holds another one ('block of digits-ddpm' vs 'block of resnet50')."""
    entries = payload[side]
    fields = [f for f in ("block", "t", "pool") if len({e["key"][f] for e in entries}) > 1]
    name = " / ".join(AXIS_NAMES[f] for f in fields) or "key"
    models = {e["key"]["model"] for e in entries}
    others = {e["key"]["model"] for e in payload["cols" if side == "rows" else "rows"]}
    return f"{name} of {models.pop()}" if len(models) == 1 and models != others else name


def draw(payload: dict, stem: Path, formats=("png",), dpi: int | None = None) -> list[Path]:
    """The heatmap like the paper's Figure 6, as stem.png (.pdf, .svg): block names (or t, pool) on both axes, a
    fixed 0-1 colour range (so two matrices compare by colour), the estimator in the title."""
    require("matplotlib", "plots")
    from ..plots import heatmap, save_as

    m = np.array([[np.nan if v is None else v for v in row] for row in payload["matrix"]], dtype=float)
    fig = heatmap(m, [r["label"] for r in payload["rows"]], [c["label"] for c in payload["cols"]],
                  f"{payload['kernel']} CKA ({estimator(payload)})\n{payload['title']}", cbar_label="CKA", fmt="{:.2f}",
                  vmin=0.0, vmax=1.0, xlabel=axis_title(payload, "cols"), ylabel=axis_title(payload, "rows"))
    return save_as(fig, stem, formats, dpi)


def render(payload: dict) -> None:
    """The matrix as a compact rich table on stdout (no column rules, short column heads: a 10 x 10 block
    matrix fits 80 columns). A wider one widens the console rather than dropping columns."""
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("", no_wrap=True, max_width=16, overflow="ellipsis")
    for c in payload["cols"]:
        table.add_column(c["tick"], justify="right", no_wrap=True, min_width=4)
    for r, values in zip(payload["rows"], payload["matrix"]):
        table.add_row(r["label"], *("-" if v is None else f"{v:.2f}" for v in values))
    console = terminal_console()  # a terminal's width, unlimited in a file
    if console.is_terminal:
        console = Console(width=max(console.width, 20 + 7 * len(payload["cols"])))
    console.print(f"[bold]{payload['kernel']} CKA ({estimator(payload)})[/]: {payload['title']}", highlight=False)
    console.print(table)
