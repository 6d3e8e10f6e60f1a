"""ProbeResults: what `ds.probe(...)` returns, the results of one probe run as data.

`results` holds one dict per (source, head, seed) as stored in the store; `summary` the best key per head with
its margins over the controls; the JSON the CLI prints (`--json`) is `to_json()`. Mapping access
(`out["results"]`) reads that JSON, so code written against the dict that earlier versions returned keeps working.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass
class ProbeResults(Mapping):
    results: list[dict]  # every result row, stored ones marked "cached"
    shown: list[dict]  # the rows with seeds collapsed (mean +- std), as tables show them
    lines: list[dict] = field(default_factory=list)  # report.summary: best key per (dataset, head, recipe)
    fusions: list[dict] = field(default_factory=list)  # fusion.compare: fusion vs single keys and concatenation
    ranking: list[dict] = field(default_factory=list)  # --select: the proxy ranking
    rho: dict = field(default_factory=dict)  # --select: Spearman correlation of proxy and trained top-1
    plots: list[str] = field(default_factory=list)  # PNGs written

    def to_json(self) -> dict:
        ranking = [{k: v for k, v in r.items() if k != "source"} for r in self.ranking]
        return {"results": self.results, "summary": [summary_json(s) for s in self.lines],
                **({"fusion": [fusion_json(f) for f in self.fusions]} if self.fusions else {}),
                **({"ranking": ranking, "spearman": self.rho} if self.ranking else {}),
                **({"plots": self.plots} if self.plots else {})}

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
    best = line["best"]
    return {"dataset": line["dataset"], "head": line["head"], "recipe": line["recipe"], "n_keys": line["n_keys"],
            "best": {k: best.get(k) for k in ("name", "model", "t", "block", "block_name", "pool", "top1", "ci95",
                                               "val_top1", "seeds")},
            **{name: {"result": line[name]["result"]["name"], "diff": line[name]["diff"], "ci95": line[name]["ci95"]}
               for name in ("twin", "pixels") if name in line}}
