"""The real-data probe report: which (t, block, pool) and which head, and do diffusion features beat the baselines?

    python pipelines/probe_grid.py                                   # digits with the shipped default model
    python pipelines/train_ddpm.py --dataset fashion-mnist --data-root ../shared/datasets/fashion-mnist \\
        --size 28 --out data/models/fashion-ddpm
    python pipelines/probe_grid.py --dataset fashion-mnist --data-root ../shared/datasets/fashion-mnist \\
        --model data/models/fashion-ddpm --train-limit 20000 --out data/probe_grid/fashion

Steps (library calls; every result is stored in the store, so a re-run only computes what is new):
 1. extract train + test at every (t, block) with pools --pools for the model and its random-init twin
 2. linear probes on every key (grid table, heatmaps, top-1 vs t curves) + the pixel baseline
 3. the --top (t, block) pairs of the trained model by linear *validation* top-1 (never test): extract their
    full maps for both models, then MLP on their pooled keys and CNN + attention on their full maps; every
    head also runs on pixels
 4. summary per head: the best setting by validation top-1 and its test top-1, against the random-init
    twin's best and the same head on pixels; written to OUT/report.json with the PNGs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from diffstore.datasets import Split, load_split
from diffstore.extract import extract_features, plan_extraction
from diffstore.models import load_model
from diffstore.probe.stage import probe_command
from diffstore.progress import stderr
from diffstore.store import Store


def first(split: Split, n: int | None) -> Split:
    """The split's first n samples (Fashion-MNIST's files are already in random class order)."""
    if not n or n >= len(split):
        return split
    return Split(split.name, split.split, split.ids[:n], split.labels[:n], split.class_names,
                 {**split.source, "first": n}, split.load, split.skipped)


def extract(store: Store, models: list, splits: list[Split], ts: str, blocks: str, pools: str, batch_size: int) -> None:
    for model in models:
        for split in splits:
            stderr.print(f"extract {model.name} {split.name}/{split.split} t={ts} blocks={blocks} pools={pools}")
            extract_features(plan_extraction(store, model, split, t=ts, blocks=blocks, pools=pools), batch_size=batch_size)


def best(results: list[dict], **match) -> dict | None:
    """The result with the best validation top-1 among those matching every field given (selection never sees test)."""
    found = [r for r in results if all(r.get(k) == v for k, v in match.items())]
    return max(found, key=lambda r: r["val_top1"]) if found else None


def setting(r: dict | None) -> str:
    return "-" if r is None else f"t={r['t']}/b={r['block']}/p={r['pool']}"


def pct(r: dict | None) -> str:
    return "-" if r is None else f"{100 * r['top1']:.1f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--model", default="default", help="load_model spec: default, a diffusers folder, adm:..., py:...")
    ap.add_argument("--random-init-seed", type=int, default=0)
    ap.add_argument("--store", default=None, help="default: OUT/store.zarr")
    ap.add_argument("--out", default="data/probe_grid/digits")
    ap.add_argument("--t", default="0,10,50,100,200,400")
    ap.add_argument("--blocks", default="all")
    ap.add_argument("--pools", default="1,2")
    ap.add_argument("--top", type=int, default=3, help="(t, block) pairs that get MLP, CNN and attention heads")
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=28)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extract-batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    url = args.store or str(out / "store.zarr")
    store = Store.open(url, "a")
    models = [load_model(args.model), load_model(args.model, random_init=args.random_init_seed)]
    name = models[0].name
    splits = [first(load_split(args.dataset, s, args.data_root), n) for s, n in (("train", args.train_limit),
                                                                                ("test", args.test_limit))]
    recipe = dict(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed, store=url,
                  dataset=args.dataset, model=name, data_root=args.data_root)

    extract(store, models, splits, args.t, args.blocks, args.pools, args.extract_batch_size)
    grid = probe_command(head="linear", pools=args.pools, baseline="pixels", grid=True, plot=str(out / "plots"), **recipe)
    results = list(grid["results"])
    ranked = sorted((r for r in results if r["model"] == name), key=lambda r: -r["val_top1"])
    pairs = list(dict.fromkeys((r["t"], r["block"]) for r in ranked))[:args.top]
    for t, b in pairs:
        extract(store, models, splits, str(t), str(b), "full", args.extract_batch_size)
        results += probe_command(head="mlp", t=str(t), blocks=str(b), pools=args.pools, baseline="pixels",
                                 **recipe)["results"]
        results += probe_command(head="cnn,attention", t=str(t), blocks=str(b), pools="full", baseline="pixels",
                                 **recipe)["results"]

    twin = models[1].name
    summary = []
    for head in ("linear", "mlp", "cnn", "attention"):
        ours, rand, pix = (best(results, head_label=head, model=m) for m in (name, twin, "pixels"))
        summary.append({"head": head, "diffusion": ours, "random_init": rand, "pixels": pix,
                        "beats_pixels": None if not (ours and pix) else ours["top1"] > pix["top1"],
                        "beats_random_init": None if not (ours and rand) else ours["top1"] > rand["top1"]})
    table = Table(title=f"{args.dataset}: best setting per head (chosen by validation top-1; test top-1 shown)")
    for col in ("head", f"{name}", "test top-1", "random-init twin", "test top-1 ", "pixels top-1", "beats pixels",
                "beats random-init"):
        table.add_column(col)
    for s in summary:
        yes = lambda v: "-" if v is None else ("yes" if v else "NO")  # noqa: E731
        table.add_row(s["head"], setting(s["diffusion"]), pct(s["diffusion"]), setting(s["random_init"]),
                      pct(s["random_init"]), pct(s["pixels"]), yes(s["beats_pixels"]), yes(s["beats_random_init"]))
    Console(width=200).print(table)
    report = {"dataset": args.dataset, "model": name, "store": url, "args": vars(args), "top_pairs": pairs,
              "summary": summary, "results": results, "plots": grid.get("plots", [])}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    stderr.print(f"wrote {out / 'report.json'}")


if __name__ == "__main__":
    main()
