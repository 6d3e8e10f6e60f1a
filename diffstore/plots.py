"""Figures with matplotlib's object API (Figure + Agg canvas: no pyplot state, no display needed). Drawing and
saving are apart, so one figure goes to PNG, PDF and SVG alike and tests read the Figure itself:

    heatmap(matrix, row_labels, col_labels, title)   a value grid (top-1 over t x block), cells marked by Marks
    curves(x, series, xlabel, ylabel, title)          one line per series (top-1 vs t per block)
    bands(panels, ylabel, title, path)                accuracy vs block / t / pool per dataset, interval bands
    save(fig, path, dpi) / save_as(fig, stem, formats, dpi)
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

MAX_ANNOTATED = 16  # grids up to this many rows/columns print each cell's value
DPI = 200  # a PNG that stays sharp at a paper's column width


@dataclass(frozen=True)
class Mark:
    """Cells (row, col) marked alike, and the legend entry that explains the mark (shown only when a cell has it)."""

    label: str
    cells: list = field(default_factory=list)
    marker: str = "o"
    face: str = "white"
    size: float = 5
    frame: str | None = None  # colour of a frame around each marked cell


@dataclass(frozen=True)
class Level:
    """A reference value (a baseline's accuracy) drawn as a line across the colour bar, with its legend entry."""

    label: str
    value: float
    color: str = "red"


def heatmap(matrix, row_labels: list, col_labels: list, title: str, cbar_label: str = "", fmt: str = "{:.1f}",
            marks: list[Mark] = (), levels: list[Level] = (), vmin: float | None = None, vmax: float | None = None,
            xlabel: str = "", ylabel: str = "", cmap: str = "viridis") -> Figure:
    """Missing cells are NaN and left blank; the colour range is vmin..vmax (by default the finite values' range;
    heatmaps that are compared pass the same range). Marks sit below each cell's value; the legend under the
    axes lists only marks and levels that are drawn. Long column labels are slanted so they stay readable."""
    m = np.asarray(matrix, dtype=float)
    slant = max((len(str(c)) for c in col_labels), default=0) > 3
    # about 9 x 4 inches for 15 blocks x 4 t: a paper's text width at 80% scale, cells wide enough for '93.1'
    width = 2.4 + 0.45 * max(len(col_labels), 6)
    fig = Figure(figsize=(width, 1.9 + 0.4 * max(len(row_labels), 3) + 0.6 * slant), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels], rotation=40 if slant else 0,
                  ha="right" if slant else "center", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels], fontsize=8)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(textwrap.fill(title, int(width * 12)), fontsize=9)  # a small grid's title wraps, never overlaps
    cbar = fig.colorbar(im, ax=ax, label=cbar_label)
    handles = []
    for mark in marks:
        if not mark.cells:
            continue
        rows, cols = zip(*mark.cells)
        for i, j in mark.cells if mark.frame else ():
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec=mark.frame, lw=2))
        handles += ax.plot(cols, np.asarray(rows) + 0.3, mark.marker, ms=mark.size, mfc=mark.face, mec="black",
                           mew=0.6, ls="none", label=mark.label)
    for level in levels:
        cbar.ax.axhline(level.value, color=level.color, lw=2.5)
        handles.append(Line2D([], [], color=level.color, lw=2.5, label=level.label))
    if max(m.shape) <= MAX_ANNOTATED:
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):  # black on light cells, white on dark ones, whatever the colour map
                r, g, b, _ = im.cmap(im.norm(v))
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7,
                        color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 2), fontsize=7, frameon=False)
    return fig


def curves(x: list, series: dict, xlabel: str, ylabel: str, title: str, errors: dict | None = None,
           levels: list[Level] = (), ylim: tuple | None = None) -> Figure:
    """series: label -> y values aligned with x (NaN where a point is missing); errors: label -> (below, above)
    error-bar lengths; levels: dashed horizontal reference lines (a baseline). Many series get distinct colours
    and markers and a legend under the axes, so the axes keep the figure's width."""
    fig = Figure(figsize=(6.5, 4.2 + 0.18 * ((len(series) + len(levels)) // 4)), layout="constrained")
    ax = fig.add_subplot()
    markers, n = "osD^v<>ph*", len(series)
    # tab10 while it lasts; then tab20 with its dark shades first, so neighbours never share a hue
    colors = [colormaps["tab10"](k) for k in range(10)] if n <= 10 else \
        [colormaps["tab20"](k) for k in (*range(0, 20, 2), *range(1, 20, 2))]
    xs = np.asarray(x, dtype=float)
    # error bars side by side instead of on top of each other, all within a fifth of the closest two x apart
    gap = np.diff(np.unique(xs)).min() if len(np.unique(xs)) > 1 else 1.0
    dodge = min(0.01 * (np.ptp(xs) or 1), gap / 5 / max(n - 1, 1)) if errors else 0.0
    for k, (label, ys) in enumerate(series.items()):
        style = dict(marker=markers[k % len(markers)], ms=4, label=str(label), color=colors[k % 20], capsize=2, lw=1.2)
        err = None if errors is None or label not in errors else np.nan_to_num(np.asarray(errors[label], float)).clip(0)
        ax.errorbar(xs + (k - (n - 1) / 2) * dodge, np.asarray(ys, dtype=float), yerr=err, **style)
    for level in levels:
        ax.axhline(level.value, color=level.color, ls="--", lw=1.2, label=level.label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    if len(series) + len(levels) > 1:
        fig.legend(loc="outside lower center", ncols=min(len(series) + len(levels), 4), fontsize=7, frameon=False)
    return fig


def bands(panels: list[tuple[str, list, dict]], ylabel: str, title: str, path, styles: dict | None = None,
          marks: dict | None = None) -> Path:
    """Panels side by side sharing the y axis, each (xlabel, tick labels, series), the ticks evenly spaced;
    series: label -> (y, lo, hi) aligned with the ticks (NaN where missing; lo and hi None: a line without a band).
    styles: label -> line keywords (color, ls), so a series looks the same in every panel; marks: label -> one
    tick index per panel to star (e.g. the best setting), or None there."""
    fig = Figure(figsize=(4.2 * len(panels) + 1.8, 4))
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    colors = [colormaps["tab10"](k) for k in range(10)]
    for j, (ax, (xlabel, ticks, series)) in enumerate(zip(axes, panels)):
        xs = np.arange(len(ticks))
        for k, (label, (y, lo, hi)) in enumerate(series.items()):
            style = {"color": colors[k % 10], "marker": "o", "ms": 3, "lw": 1.4, **(styles or {}).get(label, {})}
            ax.plot(xs, np.asarray(y, float), label=str(label), **style)
            if lo is not None and hi is not None:
                ax.fill_between(xs, np.asarray(lo, float), np.asarray(hi, float), color=style["color"], alpha=0.18,
                                lw=0)
            star = (marks or {}).get(label, [None] * len(panels))[j]
            if star is not None:
                ax.plot(star, float(np.asarray(y, float)[star]), "*", ms=12, color=style["color"], mec="black", mew=0.6)
        ax.set_xticks(xs, [str(t) for t in ticks], fontsize=8)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.suptitle(title, fontsize=9)
    return save(fig, path)


def save(fig: Figure, path, dpi: int | None = None) -> Path:
    """One file; its suffix names the format (dpi matters for PNG and for the raster of a heatmap in PDF/SVG)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    # bbox "tight": a title wider than its axes is kept whole, not clipped
    fig.savefig(path, dpi=DPI if dpi is None else dpi, bbox_inches="tight")
    return path


def save_as(fig: Figure, stem, formats=("png",), dpi: int | None = None) -> list[Path]:
    """`stem`.png, .pdf, .svg: one file per format, in the order given."""
    return [save(fig, Path(f"{stem}.{f}"), dpi) for f in dict.fromkeys(formats)]
