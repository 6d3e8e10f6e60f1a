"""The figures of `diffstore probe --plot`: per model, a t x block heatmap of test top-1 and, given two t or more,
top-1 vs t curves per block with 95% intervals (the paper's Figure 2); per random-init twin, a heatmap of trained
minus twin on the same test samples, marking the cells whose paired 95% interval excludes 0.

Figures that belong together (a model, its random-init twins and the pixel baseline: same dataset, input, pool,
head and recipe) share one colour scale and one y-range, so they compare by colour; the pixels' top-1 is a line
on the colour bar and on the curves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..plots import Level, Mark, curves, heatmap, save_as
from .intervals import difference, result_hits
from .report import best_cell, grid_matrix, grids, pixel_size, recipe_label, with_ci

TWIN = ".random-init-"
DIFFERENCE_FLOOR = 10.0  # points: the difference scale spans at least +-10, so a few points never look saturated


def pixel_level(r: dict) -> Level:
    return Level(f"pixels {pixel_size(r)}: {with_ci(r)}", 100 * r["top1"])


def positions(cells: dict) -> dict:
    """(t, block) -> (row, col) in grid_matrix's order."""
    ts, bs = sorted({t for t, _ in cells}), sorted({b for _, b in cells})
    return {(t, b): (ts.index(t), bs.index(b)) for t, b in cells}


def accuracy_figures(cells: dict, title: str, scale: tuple, levels: list[Level]) -> dict[str, Figure]:
    """The heatmap (best cell by validation framed, cells inside its test interval circled) and, with two t or
    more, the curves."""
    ts, bs, m = grid_matrix(cells)
    best, near = best_cell(cells, ts, bs)
    marks = [Mark("best validation top-1", [best], "*", face="red", size=10, frame="red"),
             Mark("test top-1 inside the best cell's 95% interval", [c for c in near if c != best], "o", size=5)]
    out = {"heatmap": heatmap(m, ts, bs, title, "test top-1 (%)", marks=marks, levels=levels, vmin=scale[0],
                              vmax=scale[1], xlabel="block", ylabel="diffusion time step t")}
    if len(ts) > 1:  # a curve over one t would only be dodged error bars on a meaningless axis
        lo, hi = np.full_like(m, np.nan), np.full_like(m, np.nan)
        for cell, (i, j) in positions(cells).items():
            lo[i, j], hi[i, j] = (100 * v for v in cells[cell].get("ci95") or (cells[cell]["top1"],) * 2)
        out["vs_t"] = curves(ts, {f"b{b}": m[:, j] for j, b in enumerate(bs)}, "diffusion time step t",
                             "test top-1 (%), 95% CI", title, levels=levels, ylim=scale,
                             errors={f"b{b}": (m[:, j] - lo[:, j], hi[:, j] - m[:, j]) for j, b in enumerate(bs)})
    return out


def difference_figure(trained: dict, twin: dict, title: str) -> Figure | None:
    """Trained minus twin per (t, block) cell both hold with test hits, on a colour scale symmetric about 0."""
    shared = {c: trained[c] for c in trained if c in twin and "test_hits" in trained[c] and "test_hits" in twin[c]}
    if not shared:
        return None
    diffs = {c: difference(result_hits(shared[c]), result_hits(twin[c])) for c in shared}
    ts, bs, m = grid_matrix({c: {**r, "top1": diffs[c]["diff"]} for c, r in shared.items()})
    where = positions(shared)
    apart = [where[c] for c, d in diffs.items() if d["ci95"][0] > 0 or d["ci95"][1] < 0]
    span = max(float(np.nanmax(np.abs(m))), DIFFERENCE_FLOOR)
    return heatmap(m, ts, bs, title, "trained minus twin, test top-1 (points)", fmt="{:+.1f}",
                   marks=[Mark("paired 95% interval excludes 0", apart, "D", size=5)],
                   vmin=-span, vmax=span, cmap="RdBu", xlabel="block", ylabel="diffusion time step t")


def scale_of(members: list[dict], levels: list[Level]) -> tuple[float, float]:
    """One range for the group's heatmap colours and curve axes: every cell's top-1 and interval, and the levels."""
    values = [100 * v for cells in members for r in cells.values() for v in (r["top1"], *(r.get("ci95") or ()))]
    values += [lv.value for lv in levels]
    lo, hi = min(values), max(values)
    return lo - 0.02 * (hi - lo or 1), hi + 0.02 * (hi - lo or 1)


def figures(results: list[dict]) -> dict[str, Figure]:
    """File stem -> figure, for every (dataset, model, input, pool, head, recipe) grid of single-key results."""
    pixels = {(r["dataset"], r["head_label"], recipe_label(r)): r for r in results if r["kind"] == "pixels"}
    groups: dict = {}
    for (dataset, model, input_, pool, head, recipe), cells in grids(results).items():
        groups.setdefault((dataset, model.partition(TWIN)[0], input_, pool, head, recipe), {})[model] = cells
    out = {}
    for (dataset, base, input_, pool, head, recipe), members in groups.items():
        levels = [pixel_level(pixels[dataset, head, recipe])] if (dataset, head, recipe) in pixels else []
        scale = scale_of(list(members.values()), levels)

        def stem_of(model: str) -> str:
            return "_".join(s.replace("/", "-") for s in (dataset, model, input_, f"p{pool}", head, recipe))

        for model, cells in members.items():
            stem = stem_of(model)
            title = f"{dataset}, {model} ({input_}), pool {pool}: {head} head, {recipe} recipe"
            out.update({f"{stem}_{kind}": fig for kind, fig in accuracy_figures(cells, title, scale, levels).items()})
            if model != base and base in members:
                fig = difference_figure(members[base], cells, f"{dataset}, {base} minus {model} ({input_}), pool "
                                                              f"{pool}: {head} head, {recipe} recipe")
                if fig is not None:
                    out[f"{stem_of(base)}_minus_{model[len(base) + 1:]}"] = fig  # ..._minus_random-init-s0
    return out


def write_plots(results: list[dict], out_dir: str, formats=("png",), dpi: int | None = None) -> list[str]:
    """Every figure of `figures` in each format: out_dir/STEM.png (.pdf, .svg)."""
    return [str(p) for stem, fig in figures(results).items() for p in save_as(fig, Path(out_dir) / stem, formats, dpi)]
