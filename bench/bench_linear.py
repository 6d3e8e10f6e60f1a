"""The linear probe: time and accuracy of the converged default vs the paper recipe vs scikit-learn, side by side.

(a) accuracy  for each --key (a stored train array with its test twin): the converged default (probe.solve),
              the paper recipe (Adam, 28 epochs, StepLR; probe.train) and scikit-learn's multinomial
              LogisticRegression (lbfgs, tol 1e-8) on the same features, standardised on the same fit rows, C chosen
              on the same validation carve from the same grid (ties to the smaller C). Test top-1 with its 95%
              bootstrap interval, the chosen C, seconds, and ours minus scikit-learn paired on the test samples.
(b) speed     every train key of --speed-store: the converged linear probe vs the paper recipe, all keys side by
              side in each, timed in one run (the ratio is what to read; absolute seconds depend on the load).
(c) agreement every train key of --agree-store (of models matching --agree-model): the converged default vs
              scikit-learn (as in (a), tol --sk-tol), key by key: how many within 0.5 points, the lowest and
              largest difference, keys where the chosen C differs; --agree-out FILE keeps the per-key rows.
(d) grid      the C grid's cost and effect: every train key of --agree-store (of --agree-model) solved side by side
              with the earlier 4-point grid {1e-3 .. 1} and with the default 13-point grid {1e-4 .. 1e2}, in one run
              (seconds and their ratio; C chosen, keys at a grid end, test top-1 wide minus narrow with its paired
              interval on the key with the largest change), then scikit-learn on the wide grid for each --key.

Usage: python bench/bench_linear.py [--parts accuracy,speed,agreement,grid] [--key data/default.zarr:t=50/b=7/p=2 ...]
                                    [--train-rows N]
                                    [--speed-store data/default.zarr] [--agree-store data/default.zarr
                                    --agree-model digits-ddpm --agree-out FILE] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from diffstore.key import select
from diffstore.probe.feed import Rows, split_val
from diffstore.probe.heads import HeadSpec
from diffstore.probe.intervals import bootstrap_interval, difference
from diffstore.probe.recipe import ProbeRecipe
from diffstore.probe.solve import solve_many
from diffstore.probe.train import Job, train_many
from diffstore.progress import stderr
from diffstore.store import Store


def sklearn_probe(x, y, x_test, y_test, recipe: ProbeRecipe, tol: float = 1e-8) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    fit, val = split_val(len(y), recipe.val_frac, recipe.seed)
    scaler = StandardScaler().fit(x[fit])
    xf, xv, xt = (scaler.transform(a) for a in (x[fit], x[val], x_test))
    best = None
    for C in sorted(recipe.Cs):
        model = LogisticRegression(C=C, tol=tol, max_iter=10000).fit(xf, y[fit])
        score = model.score(xv, y[val])
        if best is None or score > best[0]:
            best = (score, C, model.predict(xt) == y_test, int(model.n_iter_[0]))
    return {"val_top1": best[0], "C": best[1], "hits": best[2], "iterations": best[3]}


def accuracy_rows(spec: str, recipe: ProbeRecipe, train_rows: int | None = None) -> list[dict]:
    url, _, selector = spec.partition(":")
    store = Store.open(url, "r")
    (key,) = select([k for k in store.feature_keys() if k.split == "train"], selector)
    train, test = store.features(key), store.features(replace(key, split="test"))
    y, y_test = store.split(key.dataset, "train").labels, store.split(key.dataset, "test").labels
    if train_rows:  # a smaller training set from the same store; the test split stays whole
        train, y = train.read()[:train_rows], y[:train_rows]
    n_classes = len(store.split(key.dataset, "train").class_names)
    what = f"{key.dataset} {key.model} {key.short()} (N={len(y):,}, D={int(np.prod(train.shape[1:]))})"
    stderr.print(f"{what}: converged")
    t0 = time.perf_counter()
    ours = solve_many([Rows.of(train)], [Rows.of(test)], [None], y, y_test, n_classes, recipe, show_progress=False)[0]
    ours_s = time.perf_counter() - t0
    stderr.print(f"{what}: paper recipe")
    t0 = time.perf_counter()
    paper = train_many([Job(Rows.of(train), Rows.of(test), HeadSpec())], y, y_test, n_classes,
                       replace(recipe, name="paper"), show_progress=False)[0]
    paper_s = time.perf_counter() - t0
    stderr.print(f"{what}: scikit-learn")
    t0 = time.perf_counter()
    x = np.asarray(train[:]).reshape(len(y), -1).astype(np.float64)
    sk = sklearn_probe(x, y, test.read().reshape(len(y_test), -1).astype(np.float64), y_test, recipe)
    sk_s = time.perf_counter() - t0
    rows = []
    for name, m, s in (("converged (default)", ours, ours_s), ("paper recipe", paper, paper_s),
                       ("scikit-learn", sk, sk_s)):
        vs = difference(ours["hits"], m["hits"]) if m is not ours else None
        rows.append({"features": what, "method": name, "top1": float(np.mean(m["hits"])),
                     "ci95": bootstrap_interval(m["hits"]), "val_top1": m["val_top1"], "C": m.get("C"),
                     "seconds": s, "seconds_over_converged": s / ours_s,
                     "converged_minus_this": vs})
    return rows


def speed_rows(url: str, recipe: ProbeRecipe) -> list[dict]:
    store = Store.open(url, "r")
    keys = [k for k in store.feature_keys() if k.split == "train"]
    dataset = keys[0].dataset
    y, y_test = store.split(dataset, "train").labels, store.split(dataset, "test").labels
    n_classes = len(store.split(dataset, "train").class_names)
    trains = [Rows.of(store.features(k)) for k in keys]
    tests = [Rows.of(store.features(replace(k, split="test"))) for k in keys]
    stderr.print(f"speed: {len(keys)} keys of {url}, converged")
    t0 = time.perf_counter()
    ours = solve_many(trains, tests, [None] * len(keys), y, y_test, n_classes, recipe, show_progress=False)
    ours_s = time.perf_counter() - t0
    stderr.print(f"speed: {len(keys)} keys of {url}, paper recipe")
    t0 = time.perf_counter()
    paper = train_many([Job(a, b, HeadSpec()) for a, b in zip(trains, tests)], y, y_test, n_classes,
                       replace(recipe, name="paper"), show_progress=False)
    paper_s = time.perf_counter() - t0
    gain = np.array([o["top1"] - p["top1"] for o, p in zip(ours, paper)])
    return [{"store": url, "keys": len(keys), "method": name, "seconds": s, "seconds_over_converged": s / ours_s,
             "mean_top1": float(np.mean([m["top1"] for m in ms])),
             "converged_keys": sum(m["converged"] for m in ms) if ms is ours else None,
             "converged_minus_paper_mean": float(gain.mean()), "keys_where_paper_higher": int((gain < 0).sum())}
            for name, ms, s in (("converged (default)", ours, ours_s), ("paper recipe", paper, paper_s))]


def agree_rows(url: str, model: str, recipe: ProbeRecipe, tol: float) -> list[dict]:
    store = Store.open(url, "r")
    keys = [k for k in store.feature_keys() if k.split == "train" and (not model or k.model == model)]
    y, y_test = store.split(keys[0].dataset, "train").labels, store.split(keys[0].dataset, "test").labels
    n_classes = len(store.split(keys[0].dataset, "train").class_names)
    tests = [store.features(replace(k, split="test")) for k in keys]
    ours = solve_many([Rows.of(store.features(k)) for k in keys], [Rows.of(a) for a in tests], [None] * len(keys),
                      y, y_test, n_classes, recipe, show_progress=False)
    rows = []
    for i, (key, test, o) in enumerate(zip(keys, tests, ours)):
        stderr.print(f"agreement: scikit-learn on {key.model} {key.short()} ({i + 1}/{len(keys)})")
        x = store.features(key).read().reshape(len(y), -1).astype(np.float64)
        sk = sklearn_probe(x, y, test.read().reshape(len(y_test), -1).astype(np.float64), y_test, recipe, tol)
        rows.append({"key": f"{key.model} {key.short()}", "ours": o["top1"], "sklearn": float(np.mean(sk["hits"])),
                     "diff": o["top1"] - float(np.mean(sk["hits"])), "C_ours": o["C"], "C_sklearn": sk["C"],
                     "converged": o["converged"]})
    return rows


def agree_summary(rows: list[dict]) -> str:
    d = np.array([r["diff"] for r in rows])
    return (f"{len(rows)} keys: converged default minus scikit-learn, test top-1 points: within 0.5 on "
            f"{int((np.abs(d) <= 0.005 + 1e-12).sum())}/{len(rows)}, lowest {100 * d.min():+.2f}, highest "
            f"{100 * d.max():+.2f}, mean |diff| {100 * np.abs(d).mean():.2f}; chosen C differs on "
            f"{sum(r['C_ours'] != r['C_sklearn'] for r in rows)} keys; converged {sum(r['converged'] for r in rows)}")


NARROW = (1e-3, 1e-2, 1e-1, 1.0)  # the grid of earlier releases


def grid_rows(url: str, model: str, recipe: ProbeRecipe) -> dict:
    """Every train key (of `model`) with the narrow and the wide grid, side by side in one run."""
    store = Store.open(url, "r")
    keys = [k for k in store.feature_keys() if k.split == "train" and (not model or k.model == model)]
    y, y_test = store.split(keys[0].dataset, "train").labels, store.split(keys[0].dataset, "test").labels
    n_classes = len(store.split(keys[0].dataset, "train").class_names)
    trains = [Rows.of(store.features(k)) for k in keys]
    tests = [Rows.of(store.features(replace(k, split="test"))) for k in keys]
    out = {"store": url, "keys": len(keys)}
    for name, Cs in (("narrow", NARROW), ("wide", recipe.Cs)):
        stderr.print(f"grid: {len(keys)} keys of {url}, {len(Cs)} values of C")
        t0 = time.perf_counter()
        out[name] = solve_many(trains, tests, [None] * len(keys), y, y_test, n_classes, replace(recipe, Cs=Cs),
                               show_progress=False)
        out[f"{name}_s"] = time.perf_counter() - t0
    gains = [difference(w["hits"], n["hits"]) for w, n in zip(out["wide"], out["narrow"])]
    worst = max(range(len(keys)), key=lambda i: abs(gains[i]["diff"]))
    out.update(ratio=out["wide_s"] / out["narrow_s"],
               C_changed=sum(w["C"] != n["C"] for w, n in zip(out["wide"], out["narrow"])),
               at_end={g: sum(r["C_at_grid_end"] is not None for r in out[g]) for g in ("narrow", "wide")},
               converged={g: sum(r["converged"] for r in out[g]) for g in ("narrow", "wide")},
               mean_gain=float(np.mean([g["diff"] for g in gains])), keys_higher=sum(g["diff"] > 0 for g in gains),
               keys_lower=sum(g["diff"] < 0 for g in gains),
               largest_change={"key": f"{keys[worst].model} {keys[worst].short()}", **gains[worst]},
               chosen_C={g: {f"{c:g}": sum(r["C"] == c for r in out[g]) for c in sorted({r["C"] for r in out[g]})}
                         for g in ("narrow", "wide")})
    for g in ("narrow", "wide"):
        out[g] = [{"key": f"{k.model} {k.short()}", "C": r["C"], "top1": r["top1"]} for k, r in zip(keys, out[g])]
    return out


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--key", action="append", help="STORE:selector of one train array (repeatable)")
    ap.add_argument("--train-rows", type=int, help="accuracy: only the first N train rows (test stays whole)")
    ap.add_argument("--parts", default="accuracy,speed", help="which of accuracy, speed, agreement, grid to run")
    ap.add_argument("--speed-store", default="data/default.zarr")
    ap.add_argument("--agree-store", default="data/default.zarr",
                    help="its every train key is checked against scikit-learn")
    ap.add_argument("--agree-model", default="", help="only this model's keys (e.g. digits-ddpm: not its twin)")
    ap.add_argument("--agree-out", help="write the per-key agreement rows (JSON) here")
    ap.add_argument("--sk-tol", type=float, default=1e-6, help="scikit-learn's tol in the agreement check")
    ap.add_argument("--tol", type=float, default=ProbeRecipe.tol, help="the converged probe's tolerance (recipe)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = ProbeRecipe(tol=args.tol)
    parts = args.parts.split(",")
    specs = args.key or ["data/default.zarr:t=50/b=7/p=2"]
    acc = [r for spec in specs for r in accuracy_rows(spec, recipe, args.train_rows)] if "accuracy" in parts else []
    speed = speed_rows(args.speed_store, recipe) if "speed" in parts else []
    agree = agree_rows(args.agree_store, args.agree_model, recipe, args.sk_tol) if "agreement" in parts else []
    grid = grid_rows(args.agree_store, args.agree_model, recipe) if "grid" in parts else None
    if args.agree_out:
        Path(args.agree_out).write_text(json.dumps(agree, indent=1))
    if args.json:
        print(json.dumps({"accuracy": acc, "speed": speed, "agreement": agree, "grid": grid, "threads": args.threads},
                         indent=1))
        return
    console = Console(width=200)
    if acc:
        table = Table(title=f"linear probe on stored features ({args.threads} thread(s)): test top-1 [95% CI]")
        for col in ("features", "method", "top-1 [95% CI]", "val top-1", "C", "seconds", "x converged time",
                    "converged minus this [paired 95% CI]"):
            table.add_column(col)
        for r in acc:
            d = r["converged_minus_this"]
            table.add_row(r["features"], r["method"], f"{pct(r['top1'])} [{pct(r['ci95'][0])}, {pct(r['ci95'][1])}]",
                          pct(r["val_top1"]), "-" if r["C"] is None else f"{r['C']:g}", f"{r['seconds']:.1f}",
                          f"{r['seconds_over_converged']:.2f}",
                          "-" if d is None
                          else f"{100 * d['diff']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]")
        console.print(table)
    if speed:
        table = Table(title="speed: every key of the store, side by side in one run")
        for col in ("store", "keys", "method", "seconds", "x converged time", "mean top-1", "converged keys",
                    "converged minus paper (mean)", "keys where paper higher"):
            table.add_column(col)
        for r in speed:
            table.add_row(r["store"], str(r["keys"]), r["method"], f"{r['seconds']:.1f}",
                          f"{r['seconds_over_converged']:.2f}", pct(r["mean_top1"]),
                          "-" if r["converged_keys"] is None else str(r["converged_keys"]),
                          f"{100 * r['converged_minus_paper_mean']:+.2f}", str(r["keys_where_paper_higher"]))
        console.print(table)
    if grid:
        g, d = grid, grid["largest_change"]
        console.print(f"C grid on {g['keys']} keys of {g['store']}, side by side in one run: 4 values "
                      f"{g['narrow_s']:.1f} s, "
                      f"13 values {g['wide_s']:.1f} s ({g['ratio']:.2f}x); chosen C {g['chosen_C']['narrow']} -> "
                      f"{g['chosen_C']['wide']} (changed on {g['C_changed']} keys); at a grid end: narrow "
                      f"{g['at_end']['narrow']}, wide {g['at_end']['wide']}; converged {g['converged']}; test top-1 "
                      f"wide "
                      f"minus narrow: mean {100 * g['mean_gain']:+.2f} points, higher on {g['keys_higher']} keys, "
                      f"lower on {g['keys_lower']}; largest change {d['key']}: {100 * d['diff']:+.1f} "
                      f"[{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]", highlight=False)
    if agree:
        console.print(f"agreement with scikit-learn (tol {args.sk_tol:g}) on every key of "
                      f"{args.agree_store}: {agree_summary(agree)}")


if __name__ == "__main__":
    main()
