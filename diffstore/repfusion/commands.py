"""`diffstore repfusion targets|train|finetune|analyze`: parsed options (a config) -> result dict, printed.

Each command prints a rich table on stdout, or the result as JSON with json_out=True; progress goes to
stderr. Every command runs with no options on the embedded default: digits and the shipped model, with
CPU-sized defaults (see the config dataclasses): targets on a 20-point grid with the flip view, a
ResNet-18 at a quarter width distilled for 3 epochs, fine-tuned for 3.
"""

from __future__ import annotations

import json

from rich.table import Table
from rich.text import Text

from ..datasets import load_split
from ..device import pick_device
from ..errors import require
from ..models import load_model
from ..store import Store
from ..terminal import console, fold
from .config import AnalyzeConfig, DistillConfig, FinetuneConfig, TargetsConfig
from .distill import distill, finetune
from .targets import build_targets


def emit(result: dict, title: str, rows: list[tuple[str, object]], json_out: bool) -> dict:
    if json_out:
        print(json.dumps(result, indent=2))
        return result
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for name, value in rows:  # Text: "E[t]" and paths are data, not rich markup
        table.add_row(Text(name), Text(f"{value:.4g}" if isinstance(value, float) else str(value)))
    out = console()
    out.print(fold(table, out.width))
    return result


def fmt_ts(ts: list[int], values: list[float], digits: int = 3) -> str:
    return "  ".join(f"{t}:{v:.{digits}f}" for t, v in zip(ts, values))


def targets_command(cfg: TargetsConfig | None = None, json_out: bool = False, show_progress: bool = True) -> dict:
    cfg = cfg or TargetsConfig()
    store = Store.open(cfg.store, "a")
    whole = load_split(cfg.dataset, cfg.split, cfg.data_root)  # the store records the whole split's order
    split = whole.head(cfg.limit) if cfg.limit else whole
    model = load_model(cfg.model).to(pick_device(cfg.device))
    r = build_targets(store, model, split, cfg, show_progress, whole)
    return emit(r, f"RepFusion targets: {r['path']}", [
        ("layer", r["layer"] if r["layer"] == r["module"] else f"{r['layer']} ({r['module']})"),
        ("t grid", f"K={r['K']}: {r['t_grid']}"), ("views", len(r["views"])), ("shape", r["shape"]),
        ("shards written", f"{r['shards_written']}/{r['shards_total']}"),
        ("bytes per image", r["bytes_per_image"])], json_out)


def train_command(cfg: DistillConfig | None = None, json_out: bool = False, show_progress: bool = True) -> dict:
    r = distill(cfg or DistillConfig(), show_progress)
    last = r["history"][-1]
    return emit(r, f"RepFusion distillation: {r['run']}" + (" (already trained)" if r.get("cached") else ""), [
        ("targets", r["targets"]),
        ("student", f"{r['config']['student']} x{r['config']['width']} ({r['student_channels']} ch)"),
        ("loss", r["config"]["loss"]), ("epochs", r["config"]["epochs"]), ("final distill loss", last["distill_loss"]),
        ("final mean reward", last["reward"]), ("pi(t), mean over x", fmt_ts(r["t_grid"], r["distribution"])),
        ("E[t], mode t", f"{r['expected_t']:.1f}, {r['mode_t']}"),
        ("reward by t", fmt_ts(r["t_grid"], r["reward_by_t"])),
        ("decoder acc by t", fmt_ts(r["t_grid"], r["decoder_acc_by_t"], 2)),
        ("seconds", r["seconds"])], json_out)


def finetune_command(cfg: FinetuneConfig | None = None, json_out: bool = False, show_progress: bool = True) -> dict:
    r = finetune(cfg or FinetuneConfig(), show_progress)
    return emit(r, f"RepFusion fine-tuning: {r['run']} (n_train={r['n_train']}, n_test={r['n_test']})", [
        ("student / loss", f"{r['student']} / {r['loss']}"), ("epochs", r["config"]["epochs"]),
        ("test acc, distilled", r["distilled_acc"]), ("test acc, no distillation", r["scratch_acc"]),
        ("gain", r["gain"]), ("seconds", r["seconds"])], json_out)


def analyze_command(cfg: AnalyzeConfig | None = None, json_out: bool = False, show_progress: bool = True) -> dict:
    require("matplotlib", "plots")
    from .analyze import analyze

    r = analyze(cfg or AnalyzeConfig(), show_progress)
    return emit(r, f"RepFusion analysis: {r['targets']}", [
        ("effective rank by t", fmt_ts(r["t_grid"], r["effective_rank"], 1)),
        ("t-SNE at t", r["tsne_t"]), ("runs plotted", ", ".join(r["runs"]) or "-"), ("PNGs", "\n".join(r["pngs"]))],
        json_out)
