"""The RepFusion real-data report: teacher targets -> distillation with the time-step policy -> fine-tuning,
against a student trained without distillation (same seed, epochs, data and views) -> analyses of z(t).

    python pipelines/repfusion.py                                   # digits + the shipped default model (CPU)
    python pipelines/repfusion.py --dataset fashion-mnist --model data/models/fashion-ddpm --limit 10000 \\
        --store data/repfusion-fmnist.zarr --out data/repfusion-fmnist --epochs 10 --finetune-epochs 10

Every stage is a `diffstore repfusion` command and is resumable: targets skip done shards, a finished distill
run is read back. Writes OUT/report.json and OUT/report.md (test accuracy with and without distillation per
loss, the learned distribution over t, the effective rank per t, the PNGs). Numbers are whatever they are:
the report states the gain, or the loss, as measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffstore.repfusion import analyze_command, finetune_command, targets_command, train_command
from diffstore.repfusion.analyze import AnalyzeConfig
from diffstore.repfusion.distill import DistillConfig, FinetuneConfig
from diffstore.repfusion.losses import LOSSES, NEEDS_MAP
from diffstore.repfusion.targets import TargetsConfig


def by_t(ts: list[int], values: list[float], fmt: str) -> str:
    return ", ".join(f"{t}: {v:{fmt}}" for t, v in zip(ts, values))


def markdown(args, targets: dict, runs: list[tuple[dict, dict]], analysis: dict) -> str:
    first = runs[0][0]
    lines = [f"# RepFusion on {args.dataset} (teacher: {args.model}, layer {targets['module']})", "",
             f"Targets: {targets['path']}, {targets['shape']['pooled'][0]} train images x {len(targets['views'])} "
             f"views x K = {targets['K']} time steps ({args.t_grid}), input {args.input}. "
             f"Student: {args.student} x{args.width}; distillation {args.epochs} epochs, fine-tuning "
             f"{args.finetune_epochs} epochs, seed {args.seed}.", "",
             "| loss | test acc, distilled + fine-tuned | test acc, no distillation | gain | E[t] under pi | mode t |",
             "|---|---|---|---|---|---|"]
    for trained, tuned in runs:
        lines.append(f"| {trained['config']['loss']} | {tuned['distilled_acc']:.4f} | {tuned['scratch_acc']:.4f} | "
                     f"{tuned['gain']:+.4f} | {trained['expected_t']:.1f} | {trained['mode_t']} |")
    lines += ["", "Learned distribution over t (mean pi(t | x) over the train images), top 5:", ""]
    for trained, _ in runs:
        top = sorted(zip(trained["distribution"], trained["t_grid"]), reverse=True)[:5]
        lines.append(f"- {trained['run']}: " + ", ".join(f"t={t}: {p:.3f}" for p, t in top)
                     + f" (uniform: {1 / targets['K']:.3f})")
    lines += ["", "How well each t's teacher feature tells the class, by the frozen decoder g "
                  "(train images, identity view):",
              "", "- reward -CE(g(z_t), y): " + by_t(first["t_grid"], first["reward_by_t"], ".3f"),
              "- accuracy of g: " + by_t(first["t_grid"], first["decoder_acc_by_t"], ".2f"),
              "", "Effective rank of z(t) by t: " + by_t(analysis["t_grid"], analysis["effective_rank"], ".1f"),
              "", "Plots: " + ", ".join(analysis["pngs"]), ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="data/repfusion.zarr")
    ap.add_argument("--out", default="data/repfusion-report")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--limit", type=int, default=None, help="use the first N train images only")
    ap.add_argument("--model", default="default")
    ap.add_argument("--layer", default="mid-conv")
    ap.add_argument("--t-grid", default="0:1000:50")
    ap.add_argument("--views", default="flip")
    ap.add_argument("--input", default="clean", choices=("clean", "noised"))
    ap.add_argument("--losses", default="hint", help=f"comma-separated, from {', '.join(LOSSES)}")
    ap.add_argument("--student", default="resnet18")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--finetune-epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    losses = [s.strip() for s in args.losses.split(",") if s.strip()]

    targets = targets_command(TargetsConfig(store=args.store, dataset=args.dataset, data_root=args.data_root,
                                            limit=args.limit, model=args.model, layer=args.layer, t_grid=args.t_grid,
                                            views=args.views, input=args.input,
                                            maps=any(x in NEEDS_MAP for x in losses), device=args.device))
    runs = []
    for loss in losses:
        trained = train_command(DistillConfig(store=args.store, targets=targets["path"], student=args.student,
                                              width=args.width, loss=loss, epochs=args.epochs,
                                              batch_size=args.batch_size, seed=args.seed, device=args.device))
        tuned = finetune_command(FinetuneConfig(store=args.store, run=trained["run"], epochs=args.finetune_epochs,
                                                batch_size=args.batch_size, seed=args.seed, device=args.device))
        runs.append((trained, tuned))
    analysis = analyze_command(AnalyzeConfig(store=args.store, targets=targets["path"], out=args.out, seed=args.seed))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(args), "targets": targets, "runs": [{"distill": t, "finetune": f} for t, f in runs],
              "analysis": analysis}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(args, targets, runs, analysis))
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
