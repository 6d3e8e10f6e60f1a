"""What `diffstore probe` shows: the summary (best key per head, its margins with paired intervals), result and
ranking tables, t x block grids (the figures are figures.py's).

Selection never sees test: "best" is the best validation score of the summary's metric (--metric: top1, top5,
mean-per-class; one summary per metric); the test score shown is that key's, with its 95% bootstrap interval.
Margins are paired differences on the same test samples (intervals.difference). Results stored by older releases
lack top-5/mean-per-class fields: they are left out of those metrics' summaries, never an error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.table import Table

from .intervals import difference, result_hits, seeds_summary
from .options import METRICS as NAMES

# --metric name (options.METRICS) -> (label, the result's test field, its interval's field, its validation field)
METRICS = dict(zip(NAMES, (("top-1", "top1", "ci95", "val_top1"), ("top-5", "top5", "top5_ci95", "val_top5"),
                           ("mean-per-class", "mean_per_class", "mean_per_class_ci95", "val_mean_per_class"))))


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def with_ci(r: dict, metric: str = "top1") -> str:
    """'93.3 [90.8, 95.6]', or 'mean +- std (K seeds)' when several seeds were run."""
    _, field, ci_field, _ = METRICS[metric]
    s = r.get("seeds", {}) if metric == "top1" else r.get("seeds_by_metric", {}).get(field, {})
    if s.get("n_seeds", 1) > 1:
        return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f} ({s['n_seeds']} seeds)"
    ci = r.get(ci_field)
    return pct(r.get(field)) + (f" [{pct(ci[0])}, {pct(ci[1])}]" if ci else "")


def signed(d: dict) -> str:
    lo, hi = d["ci95"]
    return f"{100 * d['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def block_label(r: dict) -> str:
    name = r.get("block_name")
    return str(r["block"]) if name in (None, "-", str(r["block"])) else f"{r['block']} {name}"


def recipe_label(r: dict) -> str:
    return r.get("recipe", {}).get("name", "paper")


def fit_note(r: dict) -> str:
    """What the recipe chose and whether it converged: 'C=0.1', 'C=100 (grid end)', 'k=20', 'lr=0.003 wd=0',
    'not converged'."""
    if "k" in r:
        return f"k={r['k']}"
    if recipe_label(r) == "paper":
        return f"{r.get('epochs_used', '')} ep"
    chosen = (f"C={r['C']:g}" + (" (grid end)" if r.get("C_at_grid_end") else "") if "C" in r
              else f"lr={r['lr']:g} wd={r['weight_decay']:g}")
    return chosen + ("" if r.get("converged", True) else " NOT CONVERGED")


def collapse_seeds(results: list[dict]) -> list[dict]:
    """Results of several seeds of the same (arrays, head, recipe) -> one row each (the first seed's, for paired
    comparisons) carrying mean +- std of test top-1 over the seeds."""
    groups: dict = {}
    for r in results:
        ident = (tuple(r["fingerprints"]), repr(r["head"]), repr({k: v for k, v in r["recipe"].items() if k != "seed"}))
        groups.setdefault(ident, []).append(r)
    others = [METRICS[m][1] for m in METRICS if m != "top1"]
    return [{**g[0], "seeds": seeds_summary([r["top1"] for r in g]),
             "seeds_by_metric": {f: seeds_summary([r[f] for r in g]) for f in others
                                 if all(r.get(f) is not None for r in g)}} if len(g) > 1 else g[0]
            for g in groups.values()]


def results_table(results: list[dict], title: str = "probe results", metrics: list[str] = ("top1",)) -> Table:
    """Every result: each --metric with its interval (top-5 plainly too, as always, where results have it), the
    validation score of the first metric, what the recipe chose."""
    plain5 = "top5" not in metrics and any(r.get("top5") is not None for r in results)
    label, val = METRICS[metrics[0]][0], METRICS[metrics[0]][3]
    table = Table(title=title, caption="each metric with its 95% bootstrap interval over test samples")
    cols = ("dataset", "model", "t", "block", "pool", "head", "recipe", "params",
            *(f"{METRICS[m][0]} [95% CI]" for m in metrics), *(["top-5"] if plain5 else []), f"val {label}", "fit",
            "time")
    for col in cols:
        table.add_column(col, justify="right" if col in ("params", "top-5", f"val {label}", "time") else "left")
    for r in results:
        when = "cached" if r.get("cached") else f"{r['train_time_s']:.1f}s"
        table.add_row(r["dataset"], model_label(r), str(r["t"]), block_label(r), str(r["pool"]), r["head_label"],
                      recipe_label(r), f"{r['params']:,}", *(with_ci(r, m) for m in metrics),
                      *([pct(r.get("top5"))] if plain5 else []), pct(r.get(val)), fit_note(r), when)
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


# --- the summary ------------------------------------------------------------------------------------------------


def is_twin(r: dict) -> bool:
    return ".random-init-" in r["model"]


def summary(results: list[dict], metric: str = "top1", labels: dict | None = None) -> list[dict]:
    """Per (dataset, head, recipe): the trained model's key with the best validation score of `metric`, its test
    score with interval, and its paired margins over the random-init twin at the same (t, block, pool) and over
    pixels. labels: dataset -> test labels, which mean-per-class margins need."""
    _, field, _, val = METRICS[metric]
    out = []
    results = [r for r in results if result_hits(r, metric) is not None and r.get(field) is not None]
    heads = dict.fromkeys((r["dataset"], r["head_label"], recipe_label(r)) for r in results)
    for dataset, head, recipe in heads:
        mine = [r for r in results if (r["dataset"], r["head_label"], recipe_label(r)) == (dataset, head, recipe)]
        candidates = [r for r in mine if r["kind"] != "pixels" and not is_twin(r) and r.get(val) is not None]
        if not candidates:
            continue
        best = max(candidates, key=lambda r: r[val])
        line = {"dataset": dataset, "head": head, "recipe": recipe, "metric": metric, "best": best,
                "n_keys": len(candidates)}
        twin = [r for r in mine if is_twin(r) and r["model"].startswith(best["model"] + ".random-init-")
                and (r["t"], r["block"], r["pool"], r["input"]) == (best["t"], best["block"], best["pool"],
                                                                    best["input"])]
        pixels = [r for r in mine if r["kind"] == "pixels"]
        y = None if metric != "mean-per-class" else (labels or {}).get(dataset)
        line["twin_seeds"] = sorted({r["model"].rpartition(".random-init-s")[2] for r in mine if is_twin(r)
                                     and r["model"].startswith(best["model"] + ".random-init-")})
        for name, other in (("twin", twin), ("pixels", pixels)):
            if other and (metric != "mean-per-class" or y is not None):  # per-class margins need the test labels
                line[name] = {"result": other[0], **difference(result_hits(best, metric), result_hits(other[0], metric),
                                                               None if y is None else y[:best["n_test"]])}
        out.append(line)
    return out


def summary_lines(lines: list[dict], plots: list[str]) -> list[str]:
    text = []
    for s in lines:
        b, m = s["best"], s.get("metric", "top1")
        label = METRICS[m][0]
        text.append(f"{s['dataset']}, {s['head']} head ({s['recipe']} recipe): best of "
                    f"{s['n_keys']} keys by validation "
                    + ("" if m == "top1" else f"{label} ") + f"is {b['model']} t={b['t']} block {block_label(b)} "
                    f"pool {b['pool']}: test {label} {with_ci(b, m)}")
        for name in ("twin", "pixels"):
            what = "its random-init twin" if name == "twin" else "pixels"
            if name in s:
                other = s[name]["result"]
                what += f" at {pixel_size(other)}, the model's input size" if name == "pixels" else ""
                text.append(f"    vs {what} ({with_ci(other, m)}): {signed(s[name])} points (paired 95% CI)")
            else:
                text.append(f"    vs {what}: not in this run ({missing_hint(s, name)})")
    if plots:
        kinds = sorted({Path(p).suffix[1:].upper() for p in plots})
        text.append(f"plots: {Path(plots[0]).parent}/ ({len(plots)} files: {', '.join(kinds)})")
    return text


def missing_hint(line: dict, name: str) -> str:
    """How to add a missing control: the twin seed the store holds at other keys (or make demo's 0), or pixels."""
    if name == "pixels":
        return "add --baseline pixels"
    b = line["best"]
    if line.get("twin_seeds"):  # the twin was probed, just not at the best key: extract exactly that key
        return (f"its random-init-s{line['twin_seeds'][0]} twin lacks this key: extract it with `--random-init "
                f"{line['twin_seeds'][0]} --t {b['t']} --blocks {b['block']} --pools {b['pool']}`")
    return "extract the twin with `--random-init 0`, as make demo does, and probe both models"


def pixel_size(r: dict) -> str:
    """The pixel baseline's resolution, '16x16': the model's input size (pixels are preprocessed as it was)."""
    return f"{r['pool']}x{r['pool']}"


def model_label(r: dict) -> str:
    return f"pixels {pixel_size(r)}" if r["kind"] == "pixels" else r["model"]


# --- grids ------------------------------------------------------------------------------------------------------


def grids(results: list[dict]) -> dict[tuple, dict]:
    """(dataset, model, input, pool, head, recipe) -> {(t, block): result} over single-key store results."""
    out: dict = {}
    for r in results:
        if r["kind"] == "store":
            cells = out.setdefault((r["dataset"], r["model"], r["input"], r["pool"], r["head_label"],
                                    recipe_label(r)), {})
            cells[(r["t"], r["block"])] = r
    return out


def grid_matrix(cells: dict) -> tuple[list, list, np.ndarray]:
    """t values, block labels ('7 mid') and the top-1 (%) matrix t x block (NaN where missing)."""
    ts, bs = sorted({t for t, _ in cells}), sorted({b for _, b in cells})
    names = {b: block_label(r) for (_, b), r in cells.items()}
    m = np.full((len(ts), len(bs)), np.nan)
    for (t, b), r in cells.items():
        m[ts.index(t), bs.index(b)] = 100 * r["top1"]
    return ts, [names[b] for b in bs], m


def best_cell(cells: dict, ts: list, bs: list) -> tuple[tuple, list]:
    """(row, col) of the best validation top-1 and the cells whose test top-1 lies in its 95% interval."""
    (t, b), best = max(cells.items(), key=lambda kv: kv[1]["val_top1"] if kv[1]["val_top1"] is not None else -1)
    order = sorted({bb for _, bb in cells})
    lo, hi = best.get("ci95") or (best["top1"], best["top1"])
    near = [(ts.index(tt), order.index(bb)) for (tt, bb), r in cells.items() if lo <= r["top1"] <= hi]
    return (ts.index(t), order.index(b)), near


def grid_tables(results: list[dict]) -> list[Table]:
    tables = []
    for (dataset, model, input_, pool, head, recipe), cells in grids(results).items():
        ts, bs, m = grid_matrix(cells)
        table = Table(title=f"{dataset} {model} ({input_}) p={pool} {head} ({recipe}): test top-1 (%), t x block",
                      caption="* best validation top-1; + test top-1 inside the best cell's 95% interval")
        (bi, bj), near = best_cell(cells, ts, bs)
        table.add_column("t")
        for b in bs:
            table.add_column(f"b{b}", justify="right")
        for i, (t, row) in enumerate(zip(ts, m)):
            table.add_row(str(t), *("-" if np.isnan(v) else f"{v:.1f}" + ("*" if (i, j) == (bi, bj) else
                                    "+" if (i, j) in near else "") for j, v in enumerate(row)))
        tables.append(table)
    return tables
