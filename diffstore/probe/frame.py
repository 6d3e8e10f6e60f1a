"""ProbeResults: what `ds.probe(...)` returns, the results of one probe run as data.

    out.to_pandas()          one tidy row per model x key x head x recipe x seed (numeric t/block/pool; top-1,
                             top-5 and mean-per-class with interval bounds; the chosen hyperparameters: C and
                             whether it is a grid end, k, lr/wd; refit, converged, sizes); controls have null
                             t/block
    out.summary              the best key per head with its margins over the controls (as `--json` prints it)
    out.paired(a, b)         a minus b on the same test images, with the paired-bootstrap 95% interval (top-1;
                             metric="top5" or "mean-per-class" for those)
    out.rows()               the tidy rows as dicts (what `diffstore probe --csv` prints), no pandas needed

`results` holds the stored dicts themselves; the JSON the CLI prints (`--json`) is `to_json()`. Mapping access
(`out["results"]`) reads that JSON, so code written against the dict that earlier versions returned keeps working.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import DiffstoreError, require
from .intervals import difference, result_hits
from .report import METRICS

# the tidy table's columns, in order (fields a result lacks are None)
COLUMNS = ("name", "dataset", "model", "input", "t", "block", "block_name", "pool", "resolution", "head",
           "head_label", "recipe", "seed", "top1", "ci_low", "ci_high", "val_top1", "top5", "top5_ci_low",
           "top5_ci_high", "mean_per_class", "mean_per_class_ci_low", "mean_per_class_ci_high", "val_mean_per_class",
           "C", "C_at_grid_end", "refit", "k", "lr", "weight_decay", "converged", "n_train", "n_val", "n_test", "kind",
           "cached")


def whole(value) -> int | None:
    """A stored key field as a number: t, block, p (None for 'full', for pixels' '-', for fused 'a+b')."""
    return int(value) if isinstance(value, int) or (isinstance(value, str) and value.isdigit()) else None


def tidy(r: dict) -> dict:
    """One result as a flat row of COLUMNS."""
    pixels = r.get("kind") == "pixels"
    ci, ci5, ci_class = (r.get(f) or [None, None] for f in ("ci95", "top5_ci95", "mean_per_class_ci95"))
    recipe = r.get("recipe") or {}
    return {"name": r.get("name"), "dataset": r.get("dataset"), "model": r.get("model"),
            "input": None if pixels else r.get("input"), "t": whole(r.get("t")), "block": whole(r.get("block")),
            "block_name": None if pixels else r.get("block_name"), "pool": None if pixels else whole(r.get("pool")),
            "resolution": whole(r.get("pool")) if pixels else None, "head": (r.get("head") or {}).get("kind"),
            "head_label": r.get("head_label"), "recipe": recipe.get("name"), "seed": r.get("seed"),
            "top1": r.get("top1"), "ci_low": ci[0], "ci_high": ci[1], "val_top1": r.get("val_top1"),
            "top5": r.get("top5"), "top5_ci_low": ci5[0], "top5_ci_high": ci5[1],
            "mean_per_class": r.get("mean_per_class"), "mean_per_class_ci_low": ci_class[0],
            "mean_per_class_ci_high": ci_class[1], "val_mean_per_class": r.get("val_mean_per_class"),
            "C": r.get("C"), "C_at_grid_end": r.get("C_at_grid_end"), "refit": recipe.get("refit"), "k": r.get("k"),
            "lr": r.get("lr"), "weight_decay": r.get("weight_decay"),
            "converged": r.get("converged"), "n_train": r.get("n_train"), "n_val": r.get("n_val"),
            "n_test": r.get("n_test"), "kind": r.get("kind"), "cached": bool(r.get("cached", False))}


@dataclass
class ProbeResults(Mapping):
    results: list[dict]  # every result row, stored ones marked "cached"
    shown: list[dict]  # the rows with seeds collapsed (mean +- std), as tables show them
    lines: list[dict] = field(default_factory=list)  # report.summary: best key per (dataset, head, recipe)
    fusions: list[dict] = field(default_factory=list)  # fusion.compare: fusion vs single keys and concatenation
    ranking: list[dict] = field(default_factory=list)  # --select: the proxy ranking
    rho: dict = field(default_factory=dict)  # --select: Spearman correlation of proxy and trained top-1
    plots: list[str] = field(default_factory=list)  # PNGs written
    labels: dict = field(default_factory=dict)  # dataset -> test labels (mean-per-class differences need them)

    def to_json(self) -> dict:
        ranking = [{k: v for k, v in r.items() if k != "source"} for r in self.ranking]
        return {"results": self.results, "summary": [summary_json(s) for s in self.lines],
                **({"fusion": [fusion_json(f) for f in self.fusions]} if self.fusions else {}),
                **({"ranking": ranking, "spearman": self.rho} if self.ranking else {}),
                **({"plots": self.plots} if self.plots else {})}

    @property
    def summary(self) -> list[dict]:
        return [summary_json(s) for s in self.lines]

    def rows(self) -> list[dict]:
        return [tidy(r) for r in self.results]

    def to_pandas(self, hits: bool = False):
        """The tidy table as a pandas DataFrame; hits=True adds each result's per-test-image hits (0/1 array)."""
        pd = require("pandas", "xarray")
        frame = pd.DataFrame(self.rows(), columns=list(COLUMNS))
        for col in ("t", "block", "pool", "resolution", "seed", "k", "n_train", "n_val", "n_test"):
            frame[col] = frame[col].astype("Int64")
        if hits:
            frame["hits"] = [result_hits(r) for r in self.results]
        return frame

    def result(self, which) -> dict:
        """A result by its name, its row number, or a dict of tidy fields that picks exactly one."""
        if isinstance(which, int):
            return self.results[which]
        found = [r for r, row in zip(self.results, self.rows())
                 if (row["name"] == which if isinstance(which, str)
                     else all(row.get(k) == v for k, v in which.items()))]
        if len(found) != 1:
            raise DiffstoreError(f"{which!r} picks {len(found)} results; pass a result name, a row number or fields "
                                 "that pick one (e.g. dict(model=..., t=10, block=7, pool=2, head='linear'))")
        return found[0]

    def paired(self, a, b, metric: str = "top1") -> dict:
        """Result a minus result b on the same test images: the difference of their top-1 (or top5,
        mean-per-class) with its paired-bootstrap 95% interval (intervals.difference on their stored per-image
        hits; mean-per-class resampled within each class)."""
        if metric not in METRICS:
            raise DiffstoreError(f"metric= takes {', '.join(METRICS)}, got {metric!r}")
        ra, rb = self.result(a), self.result(b)
        if ra.get("n_test") != rb.get("n_test") or ra.get("dataset") != rb.get("dataset"):
            raise DiffstoreError(f"{ra['name']} and {rb['name']} were not tested on the same images "
                                 f"({ra.get('dataset')} {ra.get('n_test')} vs {rb.get('dataset')} {rb.get('n_test')})")
        ha, hb = result_hits(ra, metric), result_hits(rb, metric)
        if ha is None or hb is None:
            raise DiffstoreError(f"{(rb if ha is not None else ra)['name']} stores no {metric} hits (a result of an "
                                 "earlier release, or top-5 with 5 classes or fewer); run it again with retrain=True")
        y = self.labels.get(ra["dataset"]) if metric == "mean-per-class" else None
        return {"a": ra["name"], "b": rb["name"], "metric": metric,
                **difference(ha, hb, None if y is None else y[:len(ha)])}

    def __getitem__(self, name: str):
        return self.to_json()[name]

    def __iter__(self):
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(self.to_json())


def fusion_json(line: dict) -> dict:
    """A fusion comparison with results named (not embedded)."""
    return {"fusion": line["fusion"]["name"],
            "rows": [{"features": r["features"], "result": r["result"]["name"], "head": r["result"]["head_label"],
                      "top1": r["result"]["top1"], "ci95": r["result"]["ci95"], "fusion_minus": r["fusion_minus"]}
                     for r in line["rows"]]}


def summary_json(line: dict) -> dict:
    """A summary line with results named (not embedded) and no packed hits."""
    best, (_, score, ci, val) = line["best"], METRICS[line["metric"]]
    return {"dataset": line["dataset"], "head": line["head"], "recipe": line["recipe"], "metric": line["metric"],
            "n_keys": line["n_keys"],
            "best": {k: best.get(k) for k in dict.fromkeys(("name", "model", "t", "block", "block_name", "pool", "top1",
                                                            "ci95", "val_top1", "seeds", score, ci, val))},
            **{name: {"result": line[name]["result"]["name"], "diff": line[name]["diff"], "ci95": line[name]["ci95"]}
               for name in ("twin", "pixels") if name in line}}
