"""What `diffstore finetune` shows: every stored result of one key, head and test rows (the frozen probe, the
fine-tuned and the scratch networks) in one table, with paired differences over the same test samples
(probe/intervals.py)."""

from __future__ import annotations

from rich.table import Table

from ..probe.intervals import difference, result_hits
from ..probe.report import block_label, fit_note, pct, signed, with_ci
from ..store import Store
from ..terminal import console as terminal_console
from ..terminal import fold

KIND = "finetune"  # results/finetune/{name}
LABEL = {"pretrained": "fine-tuned", "scratch": "scratch"}


def comparable(r: dict, result: dict) -> bool:
    """Same arrays, head and test rows: paired differences are meaningful."""
    return "test_hits" in r and all(r.get(f) == result[f] for f in ("fingerprints", "head", "n_test"))


def frozen_probe(store: Store, result: dict) -> dict | None:
    """The stored frozen probe of the same key and head on the same test rows; preferred: the same --limit (the same
    train rows), the converged recipe, the same seed."""
    found = [r for r in store.results("probe") if r.get("kind") == "store" and comparable(r, result)]
    return max(found, key=lambda r: (r["recipe"].get("limit") == result["recipe"]["limit"],
                                     r["recipe"].get("name") == "converged", r.get("seed") == result["seed"]),
               default=None)


def paired(a: dict, b: dict, what: str) -> dict:
    return {"what": what, "a": a["name"], "b": b["name"], **difference(result_hits(a), result_hits(b))}


def compare(store: Store, result: dict) -> dict:
    """Every stored result of this key, head and test rows (frozen, fine-tuned, scratch) and the paired differences
    of this result with the frozen probe and with its counterpart of the other start (same recipe)."""
    frozen = frozen_probe(store, result)
    runs = [r for r in store.results(KIND) if comparable(r, result) and r["name"] != result["name"]] + [result]
    diffs = [paired(r, frozen, f"{LABEL[r['from']]} - frozen probe") for r in runs] if frozen else []
    other = [r for r in runs if r["from"] != result["from"] and r["recipe"] == result["recipe"]]
    if other:
        ft, sc = (result, other[-1]) if result["from"] == "pretrained" else (other[-1], result)
        diffs.append(paired(ft, sc, "fine-tuned - scratch"))
    return {"frozen": frozen, "runs": runs, "differences": diffs}


def comparison_table(c: dict) -> Table:
    versus = {d["a"]: d for d in c["differences"] if d["b"] == (c["frozen"] or {}).get("name")}
    table = Table(title="frozen probe vs fine-tuned vs scratch",
                  caption="top-1 with its 95% bootstrap interval; differences paired over the same test samples")
    cols = ("training", "dataset", "model", "t", "block", "pool", "head", "params", "top-1 [95% CI]", "val top-1",
            "fit", "steps", "time", "vs frozen (paired 95% CI)")
    for col in cols:
        table.add_column(col, justify="right" if col in ("params", "val top-1", "steps", "time") else "left")
    for r in ([c["frozen"]] if c["frozen"] else []) + c["runs"]:
        training = LABEL[r["from"]] if r.get("kind") == KIND else "frozen probe"
        when = "cached" if r.get("cached") else f"{r['train_time_s']:.1f}s"
        table.add_row(training, r["dataset"], r["model"], str(r["t"]), block_label(r), str(r["pool"]), r["head_label"],
                      f"{r['params']:,}", with_ci(r), pct(r["val_top1"]), fit_note(r), str(r.get("steps", "-")), when,
                      signed(versus[r["name"]]) if r["name"] in versus else "-")
    return table


def show(out: dict, o) -> None:
    """The table and the paired differences on stdout; without a stored frozen probe, the command that makes it."""
    console = terminal_console()
    console.print(fold(comparison_table(out), console.width))
    for d in out["differences"]:
        console.print(f"{d['what']}: {signed(d)} points (paired 95% CI)", highlight=False, markup=False)
    if out["frozen"] is None:
        r = out["result"]
        console.print(f"no stored frozen probe of this key and head on these test rows: run `diffstore probe "
                      f"--store {o.store} --dataset {r['dataset']} --model {r['model']} --input {r['input']} "
                      f"--t {r['t']} --blocks {r['block']} --pools {r['pool']} --head {r['head']['kind']}"
                      + (f" --limit {o.limit}`" if o.limit else "`"), highlight=False, markup=False)
