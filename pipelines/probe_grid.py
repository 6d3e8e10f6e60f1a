"""The real-data probe report: which (t, block, pool) and which head, and do diffusion features beat the baselines?

    python pipelines/probe_grid.py --t 10,50 --top 1                 # digits with the shipped default model
    python pipelines/train_ddpm.py --dataset fashion-mnist --data-root ../shared/datasets/fashion-mnist \\
        --size 16 --out data/models/fashion-ddpm
    python pipelines/probe_grid.py --dataset fashion-mnist --data-root ../shared/datasets/fashion-mnist \\
        --model data/models/fashion-ddpm --train-limit 10000 --t 10 --blocks 4,5,6,7,8,9 --top 1 \\
        --out data/probe_grid/fashion

Steps (library calls; every result is stored in the store, so a re-run only computes what is new):
 1. extract train + test at every (t, block) with pools --pools for the model and its random-init twin
 2. linear probes on every key (grid table, heatmaps, top-1 vs t curves) + the pixel baseline, per recipe
    (--recipes: the converged default and the paper's recipe beside it)
 3. the --top (t, block) pairs of the trained model by converged linear *validation* top-1 (never test): extract
    their full maps for both models, then MLP on their pooled keys and CNN + attention on their full maps; every
    head also runs on pixels
 4. summary per (head, recipe): the best setting by validation top-1 and its test top-1 with its 95% interval, and
    the paired differences (95% intervals) to the random-init twin at the same setting and to the same head on
    pixels (probe.report.summary); printed as a Markdown table and written to OUT/report.json with the PNGs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffstore.datasets import Split, load_split
from diffstore.extract import extract_features, plan_extraction
from diffstore.models import load_model
from diffstore.probe import ProbeOptions
from diffstore.probe.frame import summary_json
from diffstore.probe.heads import HEADS
from diffstore.probe.report import block_label, signed, summary, with_ci
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
            extract_features(plan_extraction(store, model, split, t=ts, blocks=blocks, pools=pools),
                             batch_size=batch_size)


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
    ap.add_argument("--recipes", default="converged,paper", help="probe recipes, side by side")
    ap.add_argument("--steps", type=int, default=3000, help="converged recipe: step budget of iterative heads")
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
    common = dict(seed=args.seed, steps=args.steps, store=url, dataset=args.dataset, model=name,
                  data_root=args.data_root, show_all=False)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]

    extract(store, models, splits, args.t, args.blocks, args.pools, args.extract_batch_size)
    results, plots = [], []
    for recipe in recipes:
        grid = probe_command(ProbeOptions.build(head="linear", t=args.t, blocks=args.blocks, pools=args.pools,
                                                baseline="pixels", grid=True, plot=str(out / "plots"), recipe=recipe,
                                                **common))
        results += grid.results
        plots += grid.plots
    ranked = sorted((r for r in results if r["model"] == name and r["recipe"]["name"] == recipes[0]),
                    key=lambda r: -r["val_top1"])
    pairs = list(dict.fromkeys((r["t"], r["block"]) for r in ranked))[:args.top]
    for t, b in pairs:
        extract(store, models, splits, str(t), str(b), "full", args.extract_batch_size)
        for recipe in recipes:
            results += probe_command(ProbeOptions.build(head="mlp", t=t, blocks=b, pools=args.pools,
                                                        baseline="pixels", recipe=recipe, **common)).results
            results += probe_command(ProbeOptions.build(head="cnn,attention", t=t, blocks=b, pools="full",
                                                        baseline="pixels", recipe=recipe, **common)).results

    lines = summary(results)
    print(f"\n{args.dataset}, {name}: best setting per head and recipe (chosen by validation top-1; test top-1 with "
          "its 95% bootstrap interval; differences paired on the same test samples, 95% intervals)\n")
    print("| head | recipe | setting | test top-1 | vs random-init twin (same setting) | vs pixels |")
    print("|---|---|---|---|---|---|")
    for s in sorted(lines, key=lambda s: (HEADS.index(s["head"].split("+")[0]), s["recipe"])):
        b = s["best"]
        vs = {k: f"{signed(s[k])} ({with_ci(s[k]['result'])})" if k in s else "-" for k in ("twin", "pixels")}
        not_conv = "" if b.get("converged", True) else " (not converged)"
        print(f"| {s['head']} | {s['recipe']} | t={b['t']}, b{block_label(b)}, p={b['pool']} | {with_ci(b)}{not_conv} "
              f"| {vs['twin']} | {vs['pixels']} |")
    report = {"dataset": args.dataset, "model": name, "store": url, "args": vars(args), "top_pairs": pairs,
              "summary": [summary_json(s) for s in lines], "results": results, "plots": plots}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    stderr.print(f"wrote {out / 'report.json'}")


if __name__ == "__main__":
    main()
