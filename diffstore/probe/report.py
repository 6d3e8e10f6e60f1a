"""What `diffstore probe` shows: result and ranking tables, t x block grids, heatmaps and accuracy-vs-t curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.table import Table

def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def results_table(results: list[dict], title: str = "probe results") -> Table:
    top5 = any(r.get("top5") is not None for r in results)
    table = Table(title=title)
    for col in ("dataset", "model", "t", "block", "pool", "head", "params", "top-1", *(["top-5"] if top5 else []),
                "val top-1", "train time"):
        table.add_column(col, justify="right" if col in ("params", "top-1", "top-5", "val top-1", "train time") else "left")
    for r in results:
        when = "cached" if r.get("cached") else f"{r['train_time_s']:.1f}s"
        table.add_row(r["dataset"], r["model"], str(r["t"]), str(r["block"]), str(r["pool"]), r["head_label"],
                      f"{r['params']:,}", pct(r["top1"]), *([pct(r.get("top5"))] if top5 else []), pct(r["val_top1"]), when)
    return table


def ranking_table(ranking: list[dict], rho: dict) -> Table:
    notes = "; ".join(f"{d}: Spearman rho {v['spearman']:.2f} vs linear probes over {v['n_keys']} keys"
                      for d, v in rho.items())
    table = Table(title="proxy ranking (ridge, validation top-1)",
                  caption=notes or "no stored linear probes to compare with")
    for col in ("rank", "dataset", "model", "t", "block", "pool", "proxy val top-1", "linear top-1"):
        table.add_column(col)
    for r in ranking:
        table.add_row(str(r["rank"]), r["dataset"], r["model"], str(r["t"]), str(r["block"]), str(r["pool"]),
                      pct(r["proxy_val_top1"]), pct(r["linear_top1"]))
    return table


def grids(results: list[dict]) -> dict[tuple, dict]:
    """(dataset, model, input, pool, head) -> {(t, block): top-1} over single-key store results."""
    out: dict = {}
    for r in results:
        if r["kind"] == "store":
            cells = out.setdefault((r["dataset"], r["model"], r["input"], r["pool"], r["head_label"]), {})
            cells[(r["t"], r["block"])] = r["top1"]
    return out


def grid_matrix(cells: dict) -> tuple[list, list, np.ndarray]:
    ts, bs = sorted({t for t, _ in cells}), sorted({b for _, b in cells})
    m = np.full((len(ts), len(bs)), np.nan)
    for (t, b), v in cells.items():
        m[ts.index(t), bs.index(b)] = 100 * v
    return ts, bs, m


def grid_tables(results: list[dict]) -> list[Table]:
    tables = []
    for (dataset, model, input_, pool, head), cells in grids(results).items():
        ts, bs, m = grid_matrix(cells)
        table = Table(title=f"{dataset} {model} ({input_}) p={pool} {head}: top-1 (%), t x block")
        table.add_column("t")
        for b in bs:
            table.add_column(f"b{b}", justify="right")
        for t, row in zip(ts, m):
            table.add_row(str(t), *("-" if np.isnan(v) else f"{v:.1f}" for v in row))
        tables.append(table)
    return tables


def write_plots(results: list[dict], out_dir: str) -> list[str]:
    """Per (dataset, model, input, pool, head): a t x block heatmap and top-1 vs t curves per block (Fig. 2)."""
    from ..plots import curves, heatmap

    paths = []
    for (dataset, model, input_, pool, head), cells in grids(results).items():
        ts, bs, m = grid_matrix(cells)
        stem = Path(out_dir) / "_".join(s.replace("/", "-") for s in (dataset, model, input_, f"p{pool}", head))
        title = f"{dataset} {model} ({input_}) p={pool}, {head} head"
        paths.append(heatmap(m, ts, [f"b{b}" for b in bs], f"{title}: top-1 (%), t x block", f"{stem}_heatmap.png",
                             "top-1 (%)"))
        paths.append(curves(ts, {f"block {b}": m[:, j] for j, b in enumerate(bs)}, "t", "top-1 (%)", title,
                            f"{stem}_vs_t.png"))
    return [str(p) for p in paths]
