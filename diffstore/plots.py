"""PNG plots with matplotlib's object API (Figure + Agg canvas: no pyplot state, no display needed).

    heatmap(matrix, row_labels, col_labels, title, path)   a value grid, e.g. top-1 over t x block
    curves(x, series, xlabel, ylabel, title, path)          one line per series, e.g. top-1 vs t per block
    bands(panels, ylabel, title, path)                      panels side by side, lines with interval bands, e.g.
                                                            accuracy vs block / t / pool per dataset
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

MAX_ANNOTATED = 16  # grids up to this many rows/columns print each cell's value


def heatmap(matrix, row_labels: list, col_labels: list, title: str, path, cbar_label: str = "",
            fmt: str = "{:.1f}", best: tuple | None = None, near: list | None = None, vmin: float | None = None,
            vmax: float | None = None, xlabel: str = "", ylabel: str = "") -> Path:
    """Missing cells are NaN and left blank; the colour range is vmin..vmax, by default the finite values' range.
    `best` (row, col) gets a star and a red frame, the `near` cells a white circle (e.g. within the best cell's
    interval). Long column labels are slanted so they stay readable."""
    m = np.asarray(matrix, dtype=float)
    slant = max((len(str(c)) for c in col_labels), default=0) > 3
    fig = Figure(figsize=(2.4 + 0.62 * max(len(col_labels), 6), 1.6 + 0.45 * max(len(row_labels), 3) + 0.5 * slant))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", aspect="auto", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels], rotation=40 if slant else 0,
                  ha="right" if slant else "center", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=cbar_label)
    for i, j in near or []:
        if (i, j) != best:
            ax.plot(j, i + 0.3, "o", ms=4, mfc="white", mec="black", mew=0.5)
    if best is not None:
        ax.add_patch(Rectangle((best[1] - 0.5, best[0] - 0.5), 1, 1, fill=False, ec="red", lw=2))
        ax.plot(best[1], best[0] + 0.3, "*", ms=9, mfc="red", mec="white", mew=0.5)
    if max(m.shape) <= MAX_ANNOTATED and np.isfinite(m).any():
        mid = np.nanmean([np.nanmin(m) if vmin is None else vmin, np.nanmax(m) if vmax is None else vmax])
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7, color="black" if v > mid else "white")
    return save(fig, path)


def curves(x: list, series: dict, xlabel: str, ylabel: str, title: str, path, errors: dict | None = None) -> Path:
    """series: label -> y values aligned with x (NaN where a point is missing); errors: label -> (below, above)
    error-bar lengths. Many series get distinct colours and markers and a legend outside the axes."""
    fig = Figure(figsize=(7.5 if len(series) > 4 else 6, 4))
    ax = fig.add_subplot()
    markers, n = "osD^v<>ph*", len(series)
    # tab10 while it lasts; then tab20 with its dark shades first, so neighbours never share a hue
    colors = [colormaps["tab10"](k) for k in range(10)] if n <= 10 else \
        [colormaps["tab20"](k) for k in (*range(0, 20, 2), *range(1, 20, 2))]
    xs = np.asarray(x, dtype=float)
    dodge = 0.01 * (np.ptp(xs) or 1) if errors else 0.0  # error bars side by side instead of on top of each other
    for k, (label, ys) in enumerate(series.items()):
        style = dict(marker=markers[k % len(markers)], ms=4, label=str(label), color=colors[k % 20], capsize=2, lw=1.2)
        err = None if errors is None or label not in errors else np.nan_to_num(np.asarray(errors[label], float)).clip(0)
        ax.errorbar(xs + (k - (n - 1) / 2) * dodge, np.asarray(ys, dtype=float), yerr=err, **style)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7, ncol=1 + len(series) // 12, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return save(fig, path)


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


def save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # a title wider than its axes is kept whole, not clipped
    return path
