"""`make transfer`: the seed paper's transfer protocol (its Fig. 4 and 5) over several ImageFolder datasets.

    python pipelines/transfer.py --datasets cub=DATA/cub,flowers=DATA/flowers [--model default] [--random-init 0]
        [--compare py:examples/plugins/resnet50.py:factory --compare-random-init 0] [--out data/transfer]

Each DIR holds train/<class>/*.jpg and test/<class>/*.jpg; the first dataset is the reference. Steps (library calls;
features and probe results are cached in the store, so a re-run computes only what is new):
 1. per dataset: extract the model's features at every (t, block, pool) into one store under the dataset's own
    name (`extract --dataset imagefolder --dataset-name NAME`); with --random-init S its random-init twin too
 2. the converged linear probe on every key; each dataset's best key by validation top-1 (never test)
 3. the other heads on that key: mlp on it, cnn and attention on the full map of its (t, block)
 4. top-1 and mean-per-class accuracy (the mean of per-class recalls: the convention for fine-grained data), each
    with its 95% bootstrap interval (mean-per-class: stratified within classes, intervals.mean_per_class)
 5. the comparison, paired on the same test images: on each dataset its own best key vs the reference's best key
    (does block 19 beat block 24 on CUB?), vs the random-init twin at the same key, and with --compare SPEC vs a
    comparison network's best key (a py: plugin such as examples/plugins/resnet50.py, linear-probed the same way)
 6. OUT/transfer.png (mean-per-class accuracy vs block, vs t and vs pool per dataset at its best key, with
    interval bands: the paper's Fig. 5) and OUT/report.json; the tables on stdout as Markdown
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import diffstore as ds
from diffstore.errors import DiffstoreError
from diffstore.extract import ExtractOptions
from diffstore.key import FeatureKey
from diffstore.plots import bands
from diffstore.probe.heads import MIN_SIDE
from diffstore.probe.intervals import bootstrap_interval, difference, mean_per_class, result_hits
from diffstore.probe.report import block_label
from diffstore.progress import stderr
from diffstore.store import Store

HEADS = ("mlp", "cnn", "attention")  # run on each dataset's best key, beside the sweep's linear probe
SPATIAL = ("cnn", "attention")  # heads that read the full map (heads.MIN_SIDE: the smallest map side each needs)
AXIS_LABELS = {"block": "block b", "t": "time step t", "pool": "pool p (p x p average)"}


def parse_datasets(text: str) -> dict[str, str]:
    """'cub=DIR,flowers=DIR' -> {name: folder}, every name a valid store name and every folder an ImageFolder."""
    out = {}
    for item in (s.strip() for s in text.split(",") if s.strip()):
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise DiffstoreError(f"--datasets {item!r}: use NAME=DIR, comma-separated (cub=data/cub,flowers=data/fl)")
        if name in out:
            raise DiffstoreError(f"--datasets names {name} twice: give each dataset its own name")
        try:
            ExtractOptions.build(dataset="imagefolder", dataset_name=name).stored_dataset()
        except DiffstoreError as e:
            raise DiffstoreError(f"--datasets {name}: {e}") from None
        missing = [s for s in ("train", "test") if not (Path(folder).expanduser() / s).is_dir()]
        if missing:
            raise DiffstoreError(f"--datasets {name}={folder}: no {' or '.join(missing)} folder there; each DIR holds "
                                 "train/<class>/*.jpg and test/<class>/*.jpg")
        out[name] = str(Path(folder).expanduser())
    if not out:
        raise DiffstoreError("--datasets is empty: pass NAME=DIR,NAME2=DIR2 (the first is the reference)")
    return out


def key_of(r: dict) -> tuple:
    return r["t"], r["block"], r["pool"]


def best(results: list[dict], dataset: str, model: str) -> dict:
    """The linear result of (dataset, model) with the best validation top-1 (the first such key on a tie)."""
    mine = [r for r in results if (r["dataset"], r["model"], r["head_label"]) == (dataset, model, "linear")]
    return max(mine, key=lambda r: r["val_top1"])


def head_keys(key: tuple, heads: list[str]) -> list[tuple]:
    """(head, key) of each head's result on a best key: linear and mlp on it, cnn and attention on its full map."""
    return [("linear", key), *((h, key if h == "mlp" else (*key[:2], "full")) for h in heads)]


def scored(r: dict, labels: np.ndarray) -> dict:
    """One result as a report row: its key, top-1 and mean-per-class accuracy, each with its 95% interval."""
    hits = result_hits(r)
    mpc = {"value": mean_per_class(hits, labels), "ci95": bootstrap_interval(hits, labels=labels)}
    return {"name": r["name"], "dataset": r["dataset"], "model": r["model"], "head": r["head_label"], "t": r["t"],
            "block": r["block"], "block_name": r.get("block_name"), "pool": r["pool"], "val_top1": r["val_top1"],
            "top1": r["top1"], "top1_ci95": r["ci95"], "mean_per_class": mpc["value"],
            "mean_per_class_ci95": mpc["ci95"], "converged": r.get("converged")}


def paired(what: str, a: dict, b: dict, labels: np.ndarray) -> dict:
    """a minus b on the same test images: top-1 (paired bootstrap) and mean-per-class (paired, stratified)."""
    ha, hb = result_hits(a), result_hits(b)
    return {"dataset": a["dataset"], "what": what, "a": scored(a, labels), "b": scored(b, labels),
            "top1": difference(ha, hb), "mean_per_class": per_class_difference(ha, hb, labels)}


def per_class_difference(ha: np.ndarray, hb: np.ndarray, labels: np.ndarray) -> dict:
    d = difference(ha, hb, labels)  # paired and stratified
    return {"value": d["diff"], "ci95": d["ci95"]}


class Protocol:
    """The steps above for one model (and its controls) over the datasets, sharing one store."""

    def __init__(self, args, datasets: dict[str, str]):
        self.args, self.datasets = args, datasets
        self.quiet = dict(show_progress=not args.quiet)
        self.results: list[dict] = []

    def extract(self, name: str, role: str, **kw) -> str | None:
        """One dataset's features for the model (role "model"), its twin or the comparison network; returns the
        model's name in the store (None: that role is not in this run)."""
        a = self.args
        spec = {"model": dict(model=a.model, t=a.t, blocks=a.blocks),
                "twin": dict(model=a.model, t=a.t, blocks=a.blocks, random_init=a.random_init),
                "compare": dict(model=a.compare, model_name=a.compare_name, random_init=a.compare_random_init,
                                t="0", blocks="all")}[role]
        if role == "twin" and a.random_init is None or role == "compare" and a.compare is None:
            return None
        rows = ds.extract(a.store, dataset="imagefolder", data_root=self.datasets[name], dataset_name=name,
                          **{"pools": a.pools, **spec, **kw}, **self.quiet)
        return rows[0]["model"]

    def probe(self, **kw) -> list[dict]:
        a = self.args
        out = ds.probe(a.store, recipe="converged", steps=a.steps, lrs=a.lrs, weight_decays=a.weight_decays,
                       seed=a.seed, **kw, **self.quiet).results
        self.results += out
        return out

    def heads(self, name: str, key: tuple, models: list[str]) -> dict[str, str]:
        """The other heads on the best key (mlp on it, cnn/attention on its (t, block)'s full map), for the model
        and its twin; returns the heads skipped, with why."""
        t, b, p = key
        if "mlp" in self.args.heads:
            self.probe(dataset=name, model=models[0], t=[t], blocks=[str(b)], pools=[p], head="mlp")
        spatial = [h for h in self.args.heads if h in SPATIAL]
        if not spatial:
            return {}
        for role in ("model", "twin"):
            self.extract(name, role, t=str(t), blocks=str(b), pools="full")
        block = Store.open(self.args.store, "r").features(FeatureKey(name, "train", models[0], "noised", t, b,
                                                                     "full")).attrs["block"]
        side = min(block["height"], block["width"])
        fits = [h for h in spatial if side >= MIN_SIDE[h]]
        if fits:
            self.probe(dataset=name, model=models[0], t=[t], blocks=[str(b)], pools=["full"], head=",".join(fits))
        return {h: f"block {b}'s map is {side}x{side}; the {h} head needs {MIN_SIDE[h]}x{MIN_SIDE[h]} or more"
                for h in spatial if h not in fits}

    def run(self) -> dict:
        a, names = self.args, {}
        for name in self.datasets:
            for role in ("model", "twin", "compare"):
                names[role] = self.extract(name, role)
        model, twin, compare = names["model"], names["twin"], names["compare"]
        store = Store.open(a.store, "r")
        labels = {n: store.split(n, "test").labels for n in self.datasets}
        for name in self.datasets:
            self.probe(dataset=name, model=model, t=a.t, blocks=a.blocks, pools=a.pools, head="linear")
            if compare:
                self.probe(dataset=name, model=compare, pools=a.pools, head="linear")
        keys = {n: key_of(best(self.results, n, model)) for n in self.datasets}
        skipped = {n: self.heads(n, keys[n], [model, twin]) for n in self.datasets}
        reference = next(iter(self.datasets))
        at = {(r["dataset"], r["model"], r["head_label"], key_of(r)): r for r in self.results}
        rows, comparisons = [], []
        for n in self.datasets:
            own = at[(n, model, "linear", keys[n])]
            rows += [scored(at[(n, m, h, k)], labels[n]) for m in (model, twin) for h, k in head_keys(keys[n], a.heads)
                     if (n, m, h, k) in at]
            if n != reference:
                comparisons.append(paired(f"own best key vs {reference}'s best key", own,
                                          at[(n, model, "linear", keys[reference])], labels[n]))
            if twin:
                comparisons.append(paired("vs its random-init twin at the same key", own,
                                          at[(n, twin, "linear", keys[n])], labels[n]))
            if compare:
                comparisons.append(paired(f"vs {compare}'s best key", own, best(self.results, n, compare), labels[n]))
        sweep = [scored(r, labels[r["dataset"]]) for r in self.results
                 if r["head_label"] == "linear" and r["model"] in (model, twin) and r["pool"] != "full"]
        out = Path(a.out)
        figure = draw(sweep, keys, model, twin, out / "transfer.png")
        report = {"model": model, "twin": twin, "compare": compare, "store": a.store, "datasets": self.datasets,
                  "chance": {n: 1 / len(np.unique(labels[n])) for n in self.datasets}, "reference": reference,
                  "best_keys": {n: list(k) for n, k in keys.items()}, "heads": rows, "skipped": skipped,
                  "comparisons": comparisons, "sweep": sweep, "figure": str(figure), "args": vars(a)}
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1))
        return report


def pool_order(p: str) -> tuple:
    return p == "full", int(p) if p != "full" else 0


def draw(sweep: list[dict], keys: dict, model: str, twin: str | None, path: Path) -> Path:
    """Mean-per-class accuracy vs block, vs t and vs pool: per dataset one line through its best key (the other two
    settings held at it), with its 95% stratified-bootstrap band; the twin dashed at the same settings."""
    cells = {(r["dataset"], r["model"], r["t"], r["block"], r["pool"]): r for r in sweep}
    axes = {"block": sorted({r["block"] for r in sweep}), "t": sorted({r["t"] for r in sweep}),
            "pool": sorted({r["pool"] for r in sweep}, key=pool_order)}
    panels = [(AXIS_LABELS[what], ticks, {}) for what, ticks in axes.items()]
    styles, marks = {}, {}
    for k, (name, (t, b, p)) in enumerate(keys.items()):
        for m, label in ((model, name), (twin, f"{name}, random-init twin")):
            if m is None:
                continue
            styles[label] = {"color": f"C{k % 10}", "ls": "-" if m == model else "--"}
            marks[label] = []
            for what, (_, ticks, series) in zip(axes, panels):
                found = [cells.get((name, m, *(v if what == f else held for f, held in
                                               (("t", t), ("block", b), ("pool", p))))) for v in ticks]
                y = [100 * r["mean_per_class"] if r else np.nan for r in found]
                lo, hi = ([100 * r["mean_per_class_ci95"][i] if r else np.nan for r in found] for i in (0, 1))
                series[label] = (y, lo, hi) if m == model else (y, None, None)
                marks[label].append(ticks.index({"t": t, "block": b, "pool": p}[what]) if m == model else None)
    title = (f"{model}: mean-per-class test accuracy (%) with 95% stratified-bootstrap bands; each panel varies one "
             "setting,\nthe other two held at the dataset's best key (\u2605, chosen by validation top-1)"
             + ("; dashed: the random-init twin" if twin else ""))
    return bands(panels, "mean-per-class accuracy (%)", title, path, styles, marks)


def pct(v: float, ci: list, signed: bool = False) -> str:
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"{f.format(100 * v)} [{f.format(100 * ci[0])}, {f.format(100 * ci[1])}]"


def setting(r: dict) -> str:
    return f"t={r['t']}, b{block_label(r)}, p={r['pool']}"


def print_report(report: dict) -> None:
    print(f"\n{report['model']} on {', '.join(report['datasets'])}: each dataset's best key by validation top-1; test "
          "accuracies with 95% bootstrap intervals (mean-per-class: stratified within classes); chance: "
          + ", ".join(f"{n} {100 * c:.1f}%" for n, c in report["chance"].items()) + "\n")
    print("| dataset | model | head | setting | top-1 | mean-per-class |")
    print("|---|---|---|---|---|---|")
    for r in report["heads"]:
        note = "" if r["converged"] is not False else " (not converged)"
        print(f"| {r['dataset']} | {r['model']} | {r['head']} | {setting(r)} | "
              f"{pct(r['top1'], r['top1_ci95'])}{note} | {pct(r['mean_per_class'], r['mean_per_class_ci95'])} |")
    for name, why in ((n, w) for n, s in report["skipped"].items() for w in s.values()):
        print(f"\n{name}: {why}")
    if report["comparisons"]:
        print("\nPaired comparisons (linear probe; a minus b on the same test images, paired 95% intervals)\n")
        print("| dataset | comparison | a | b | Δ top-1 | Δ mean-per-class |")
        print("|---|---|---|---|---|---|")
        for c in report["comparisons"]:
            a, b = c["a"], c["b"]
            print(f"| {c['dataset']} | {c['what']} | {a['model']} {setting(a)} | {b['model']} {setting(b)} | "
                  f"{pct(c['top1']['diff'], c['top1']['ci95'], True)} | "
                  f"{pct(c['mean_per_class']['value'], c['mean_per_class']['ci95'], True)} |")
    print(f"\nfigure: {report['figure']}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", required=True, help="NAME=DIR,NAME2=DIR2: ImageFolder datasets (first: reference)")
    ap.add_argument("--model", default="default", help="the diffusion model (any --model spec of diffstore extract)")
    ap.add_argument("--random-init", type=int, default=None, help="also the model's random-init twin, this seed")
    ap.add_argument("--compare", default=None, help="a comparison network: py:examples/plugins/resnet50.py:factory")
    ap.add_argument("--compare-name", default=None, help="its name in the store (default: the plugin's)")
    ap.add_argument("--compare-random-init", type=int, default=None, help="the comparison network's random weights")
    ap.add_argument("--out", default="data/transfer", help="folder for transfer.png and report.json")
    ap.add_argument("--store", default=None, help="default: OUT/store.zarr")
    ap.add_argument("--t", default="10,50,150,300", help="time steps of the sweep")
    ap.add_argument("--blocks", default="all", help="blocks of the sweep")
    ap.add_argument("--pools", default="1,2", help="pools of the sweep")
    ap.add_argument("--heads", default=",".join(HEADS), help="heads on each dataset's best key (mlp,cnn,attention)")
    ap.add_argument("--steps", type=int, default=3000, help="converged recipe: step budget of the heads")
    ap.add_argument("--lrs", default="0.001,0.003,0.01", help="converged recipe: the heads' learning rates")
    ap.add_argument("--weight-decays", default="0,0.05,0.5", help="converged recipe: the heads' weight decays")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = ap.parse_args(argv)
    args.store = args.store or str(Path(args.out) / "store.zarr")
    args.heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        unknown = [h for h in args.heads if h not in HEADS]
        if unknown:
            raise DiffstoreError(f"--heads {','.join(unknown)}: choose among {','.join(HEADS)} (linear always runs)")
        report = Protocol(args, parse_datasets(args.datasets)).run()
    except DiffstoreError as e:
        stderr.print(f"error: {e}", markup=False, highlight=False)
        sys.exit(2)
    print_report(report)
    stderr.print(f"wrote {Path(args.out) / 'report.json'}")
    return report


if __name__ == "__main__":
    main()
