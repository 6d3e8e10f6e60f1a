"""PNG plots with matplotlib's object API (Figure + Agg canvas: no pyplot state, no display needed).

    heatmap(matrix, row_labels, col_labels, title, path)   a value grid, e.g. top-1 over t x block
    curves(x, series, xlabel, ylabel, title, path)          one line per series, e.g. top-1 vs t per block
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

MAX_ANNOTATED = 16  # grids up to this many rows/columns print each cell's value


def heatmap(matrix, row_labels: list, col_labels: list, title: str, path, cbar_label: str = "",
            fmt: str = "{:.1f}", vmin: float | None = None, vmax: float | None = None, xlabel: str = "",
            ylabel: str = "") -> Path:
    """Missing cells are NaN and left blank; the colour range is vmin..vmax, by default the finite values'
    range. Long column labels are slanted so they stay readable."""
    m = np.asarray(matrix, dtype=float)
    slant = max((len(str(c)) for c in col_labels), default=0) > 4
    fig = Figure(figsize=(2.0 + 0.55 * max(len(col_labels), 6), 1.2 + 0.45 * max(len(row_labels), 3) + 0.6 * slant))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", aspect="auto", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels], rotation=40 if slant else 0,
                  ha="right" if slant else "center", rotation_mode="anchor")
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=cbar_label)
    if max(m.shape) <= MAX_ANNOTATED and np.isfinite(m).any():
        mid = np.nanmean([np.nanmin(m) if vmin is None else vmin, np.nanmax(m) if vmax is None else vmax])
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7, color="black" if v > mid else "white")
    return save(fig, path)


def curves(x: list, series: dict, xlabel: str, ylabel: str, title: str, path) -> Path:
    """series: label -> y values aligned with x (NaN where a point is missing)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for label, ys in series.items():
        ax.plot(x, np.asarray(ys, dtype=float), marker="o", ms=3, label=str(label))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7, ncol=2 if len(series) > 8 else 1)
    return save(fig, path)


def save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
