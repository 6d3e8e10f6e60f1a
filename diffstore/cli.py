"""`diffstore` command line: typer commands that parse options and call one function each.

Results go to stdout (rich tables, or --json); progress and errors go to stderr. A DiffstoreError exits 2
with its message; nothing else is printed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import sys
import typing
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import DiffstoreError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cached feature stores of diffusion-model activations.")
stdout = Console(width=None if sys.stdout.isatty() else 200)  # piped output: no 80-column wrap
DEFAULT_STORE = "data/default.zarr"

StoreOpt = typer.Option(DEFAULT_STORE, "--store", "-s", help="Store path or fsspec URL (s3://bucket/team.zarr).")
JsonOpt = typer.Option(False, "--json", help="Machine-readable JSON on stdout.")


def emit(rows: list[dict], title: str, as_json: bool) -> None:
    """Print rows as a rich table, or as JSON."""
    if as_json:
        print(json.dumps(rows, indent=1, default=str))
        return
    table = Table(title=title)
    for col in (rows[0] if rows else {}):
        table.add_column(str(col), justify="right" if isinstance(rows[0][col], (int, float)) else "left")
    for row in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()])
    stdout.print(table)


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


@contextlib.contextmanager
def cluster_or_none(workers, scheduler):
    """A dask client when --workers/--scheduler is given, else None (everything in-process)."""
    if not (workers or scheduler):
        yield None
        return
    from .distributed import cluster_client

    with cluster_client(workers, scheduler) as client:
        yield client


def model_options(model: str, model_name, random_init, adm_config, class_label, prompt, resolution):
    from .models import load_model

    return load_model(model, name=model_name, random_init=random_init, adm_config=adm_config,
                      class_label=class_label, prompt=prompt, resolution=resolution)


@app.command()
def extract(
    store: str = StoreOpt,
    dataset: str = typer.Option("digits", help="digits | mnist | fashion-mnist | cifar10 | imagefolder"),
    data_root: Optional[str] = typer.Option(None, help="Dataset directory (default: $DIFFSTORE_DATA/<dataset>)."),
    split: str = typer.Option("train,test", help="Splits, comma-separated."),
    model: str = typer.Option("default", help="default | FOLDER | owner/name | adm:PATH.pt | sd:PATH_OR_ID | py:FILE.py:FACTORY"),
    model_name: Optional[str] = typer.Option(None, help="Name of the model in store paths (default: from the folder/id)."),
    random_init: Optional[int] = typer.Option(None, help="Same architecture, random weights with this seed (the control)."),
    adm_config: Optional[str] = typer.Option(None, help="ADM config: 256-uncond, 256-cond, 128-cond, 64-cond or a JSON file."),
    class_label: Optional[int] = typer.Option(None, help="Class label for class-conditional ADM models."),
    prompt: str = typer.Option("", help="Stable Diffusion prompt ('' = the paper's null text)."),
    resolution: Optional[int] = typer.Option(None, help="Stable Diffusion input resolution (default: the model's)."),
    t: str = typer.Option("10,50,150,300", "--t", help="Time steps, comma-separated."),
    blocks: str = typer.Option("all", help="Block indices or names (mid), comma-separated, or all."),
    pools: str = typer.Option("1,2", help="Pool sizes p (adaptive average pool to p x p) and/or full."),
    input_mode: str = typer.Option("noised", "--input", help="noised (x_t) | clean (x_0, t only in the time embedding)."),
    noise_seed: int = typer.Option(0, help="Noise seed: eps is a function of (seed, sample id, t, draw)."),
    noise_draws: int = typer.Option(1, help="Average features over this many noise draws."),
    batch_size: int = typer.Option(64, help="Rows per step (does not change values)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (does not change the key)."),
    dtype: str = typer.Option("float16", help="Storage dtype: float16 | float32."),
    compute_dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16 (autocast)."),
    shard_rows: Optional[int] = typer.Option(None, help="Rows per shard (multiple of 16; default: sized to ~256 MB per task)."),
    skip_bad: bool = typer.Option(False, help="Skip unreadable images, recording their ids."),
    workers: Optional[int] = typer.Option(None, help="Run on a local dask cluster with this many worker processes."),
    scheduler: Optional[str] = typer.Option(None, help="Run on a dask.distributed scheduler (tcp://HOST:8786)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Run the U-Net once per (batch, t) and store every requested (t, block, pool) feature array."""
    from .datasets import load_split
    from .extract import extract_features, pick_device, plan_extraction
    from .store import Store

    m = model_options(model, model_name, random_init, adm_config, class_label, prompt, resolution).to(pick_device(device))
    s = Store.open(store)
    rows = []
    with cluster_or_none(workers, scheduler) as client:  # one cluster (and one model load per worker) for all splits
        for sp in [x.strip() for x in split.split(",") if x.strip()]:
            data = load_split(dataset, sp, data_root, skip_bad=skip_bad)
            plan = plan_extraction(s, m, data, t, blocks, pools, input_mode, noise_seed, noise_draws, compute_dtype, dtype, shard_rows)
            if client is not None:
                from .distributed import extract_distributed

                summary = extract_distributed(
                    plan, store, client=client, batch_size=batch_size, device=device, show_progress=not quiet,
                    model_spec=dict(spec=model, name=model_name, random_init=random_init, adm_config=adm_config,
                                    class_label=class_label, prompt=prompt, resolution=resolution),
                    data_spec=dict(name=dataset, split=sp, root=data_root, skip_bad=skip_bad))
            else:
                summary = extract_features(plan, batch_size=batch_size, show_progress=not quiet)
            rows.append({"dataset": dataset, "split": sp, "model": m.name, "arrays": summary["arrays"],
                         "shards run": summary["tasks_run"], "shards total": summary["tasks_total"],
                         "status": "already stored" if summary["tasks_run"] == 0 else "extracted"})
    emit(rows, f"extract -> {store}", False)
    if all(r["shards run"] == 0 for r in rows):
        stdout.print("Everything requested is already stored; nothing was recomputed.")


@app.command()
def blocks(
    model: Optional[str] = typer.Option(None, help="Model spec, as for extract (default: the shipped model)."),
    adm_config: Optional[str] = typer.Option(None, help="ADM config name or JSON: prints the table without weights."),
    random_init: Optional[int] = typer.Option(None, help="Seeded random weights (same table)."),
    prompt: str = typer.Option("", help="Stable Diffusion prompt."),
    resolution: Optional[int] = typer.Option(None, help="Stable Diffusion input resolution."),
    as_json: bool = JsonOpt,
):
    """The model's block table: b, name, module path, channels, H, W."""
    if model is None and adm_config is not None:
        from .models.adm import adm_block_table, adm_config as read_config

        table, title = adm_block_table(read_config(adm_config)), f"ADM {adm_config}"
    else:
        m = model_options(model or "default", None, random_init, adm_config, None, prompt, resolution)
        table, title = m.blocks, m.name
    rows = [{"b": b.index, "name": b.name, "module": b.module, "C": b.channels, "H": b.height, "W": b.width} for b in table]
    emit(rows, f"blocks of {title}" + (f" (mid = {table.mid})" if table.mid else ""), as_json)


def feature_row(a) -> dict:
    k, r = a.key, a.attrs["recipe"]
    mask = a.done_mask()
    return {"dataset": f"{k.dataset}/{k.split}", "model": k.model, "input": k.input, "t": k.t,
            "block": f"{k.block} {a.attrs['block']['name']}", "pool": k.pool,
            "noise": f"seed {r['noise_seed']} x{r['noise_draws']}", "dtype": f"{r['storage_dtype']}",
            "shape": "x".join(map(str, a.shape)), "complete": f"{mask.sum()}/{len(mask)}", "size": human_bytes(a.nbytes_stored())}


@app.command("ls")
def ls_(store: str = StoreOpt, as_json: bool = JsonOpt):
    """Every feature array in the store, with its key, shape, completeness and size on disk."""
    from .store import Store

    s = Store.open(store, mode="r")
    rows = [feature_row(s.features(k)) for k in s.feature_keys()]
    emit(rows, f"{store}: {len(rows)} feature arrays", as_json)


@app.command()
def info(keys: list[str] = typer.Argument(..., help="Store paths or selectors like t=90/b=5/p=2 (model=..., split=...)."),
         store: str = StoreOpt):
    """One array's full key, fingerprint, recipe and provenance (JSON)."""
    from .key import select
    from .store import Store

    s = Store.open(store, mode="r")
    known = s.feature_keys()
    out = []
    for text in keys:
        try:
            matched = select(known, text)
        except ValueError as e:
            raise DiffstoreError(str(e)) from None
        if not matched:
            raise DiffstoreError(f"no array in {store} matches {text!r}; `diffstore ls --store {store}` lists the keys")
        for k in matched:
            a = s.features(k)
            out.append({"path": a.path, **a.attrs, "shape": a.shape, "chunks": a.x.chunks, "shards": a.x.shards,
                        "dtype": str(a.x.dtype), "done_shards": f"{a.done_mask().sum()}/{a.n_shards}",
                        "bytes_stored": a.nbytes_stored()})
    print(json.dumps(out, indent=1, default=str))


@app.command()
def verify(store: str = StoreOpt, as_json: bool = JsonOpt):
    """Check every array for completeness and corruption (crc32c per chunk); exits 1 naming what is wrong."""
    from .verify import verify_store
    from .store import Store

    problems, checked = verify_store(Store.open(store, mode="r"))
    emit(problems or [{"arrays checked": checked, "status": "ok"}], f"verify {store}", as_json)
    if problems:
        raise typer.Exit(1)


@app.command()
def probe(
    store: str = StoreOpt,
    dataset: Optional[str] = typer.Option(None, help="Only keys of this dataset."),
    model: Optional[str] = typer.Option(None, help="Only keys of this model (its random-init twins are shown too)."),
    input_mode: Optional[str] = typer.Option(None, "--input", help="Only keys of this input mode."),
    t: Optional[str] = typer.Option(None, "--t", help="Only these time steps (comma-separated)."),
    blocks: Optional[str] = typer.Option(None, help="Only these blocks: indices or names, as extract takes (7,mid,down1.0)."),
    pools: Optional[str] = typer.Option(None, help="Only these pools (comma-separated)."),
    head: str = typer.Option("linear", help="linear | mlp | cnn | attention | fusion (comma-separated for several; fusion needs --fuse)."),
    head_pool: Optional[int] = typer.Option(None, help="Pool the stored map to this size inside the head (fusion: tokens per key side, default 8)."),
    batchnorm: bool = typer.Option(False, help="BatchNorm before the linear head."),
    hidden: str = typer.Option("512", help="MLP hidden sizes."),
    channels: str = typer.Option("64,64", help="CNN channels of the two conv blocks."),
    dim: int = typer.Option(128, help="Attention/fusion head width."),
    depth: int = typer.Option(1, help="Attention/fusion head Transformer blocks."),
    n_heads: int = typer.Option(4, help="Attention heads."),
    recipe: str = typer.Option("converged", help="converged: linear solved to convergence (L-BFGS, C on validation), "
                               "other heads tuned and early-stopped on validation | paper: Adam, 28 epochs, StepLR."),
    steps: int = typer.Option(3000, help="converged recipe: optimizer-step budget of mlp/cnn/attention heads."),
    epochs: int = typer.Option(28, help="paper recipe: epochs."),
    lr: float = typer.Option(1e-3, help="paper recipe: Adam learning rate."),
    weight_decay: float = typer.Option(0.0, help="paper recipe: Adam weight decay."),
    batch_size: int = typer.Option(128, help="Batch size of trained heads."),
    step_every: int = typer.Option(8, help="paper recipe: StepLR step (epochs)."),
    gamma: float = typer.Option(0.1, help="paper recipe: StepLR gamma."),
    val_frac: float = typer.Option(0.1, help="Validation share carved from train (never from test)."),
    early_stop: bool = typer.Option(False, help="paper recipe: keep the epoch with the best validation accuracy."),
    seed: int = typer.Option(0, help="Seed of the validation carve, inits and batch order."),
    seeds: int = typer.Option(1, help="Run seeds seed..seed+K-1 and report mean +- std."),
    baseline: Optional[str] = typer.Option(None, help="pixels: the same head on raw preprocessed pixels."),
    data_root: Optional[str] = typer.Option(None, help="Dataset directory for --baseline pixels."),
    select: int = typer.Option(0, help="Rank every key by a closed-form ridge proxy; train the top K."),
    fuse: Optional[str] = typer.Option(None, help="One head on concatenated keys: t=90/b=5/p=2,t=150/b=6/p=2, or auto "
                                       "(the top --select K); with --head fusion the keys the fusion head fuses."),
    grid: bool = typer.Option(False, help="Accuracy table over (t, block, pool)."),
    plot: Optional[str] = typer.Option(None, help="Write heatmaps and accuracy-vs-t curves (PNG) here."),
    show_all: bool = typer.Option(False, "--all", help="Print every result, not only the summary."),
    as_json: bool = JsonOpt,
    list_results: bool = typer.Option(False, "--list", help="List stored probe results without training."),
    retrain: bool = typer.Option(False, help="Train again even when the same recipe is stored."),
    device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda when present)."),
    memory_gb: float = typer.Option(2.0, help="Features held in RAM up to this size; larger ones stream from the store."),
    workers: Optional[int] = typer.Option(None, help="Train on a local dask cluster with this many workers."),
    scheduler: Optional[str] = typer.Option(None, help="Train on a dask.distributed scheduler."),
):
    """Train heads on stored features (the U-Net is never run): table on stdout, results saved in the store."""
    opts = {k: v for k, v in locals().items() if k not in ("as_json", "input_mode")}
    from .probe.stage import probe_command

    probe_command(**opts, input=input_mode, json_out=as_json)


@app.command()
def cka(
    store: str = StoreOpt,
    by: Optional[str] = typer.Option(None, help="block | t | pool: the matrix axis; the other fields stay fixed."),
    t: Optional[str] = typer.Option(None, "--t", help="Time step(s) (comma-separated)."),
    block: Optional[str] = typer.Option(None, help="Block(s)."),
    pool: Optional[str] = typer.Option(None, help="Pool(s)."),
    model: Optional[str] = typer.Option(None), dataset: Optional[str] = typer.Option(None),
    split: Optional[str] = typer.Option(None), input_mode: Optional[str] = typer.Option(None, "--input"),
    a: Optional[str] = typer.Option(None, help="Row keyset: t=90/b=5/p=2,t=150/b=6/p=2 (model=... too)."),
    b: Optional[str] = typer.Option(None, help="Column keyset (default: the rows)."),
    store_b: Optional[str] = typer.Option(None, help="Store of the column keyset (across stores)."),
    method: str = typer.Option("exact", help="exact (streamed, O(D^2) memory) | minibatch (unbiased, O(batch^2)) | auto."),
    kernel: str = typer.Option("linear", help="linear | rbf (minibatch only)."),
    batch_size: int = typer.Option(256, help="Minibatch size (recorded with the result)."),
    seed: int = typer.Option(0, help="Sample-order seed of the minibatch estimator (recorded)."),
    sigma_frac: float = typer.Option(1.0, help="RBF bandwidth as a fraction of the median distance."),
    plot: Optional[str] = typer.Option(None, help="Write the heatmap PNG here."),
    out: Optional[str] = typer.Option(None, help="Write the matrix JSON here."),
    as_json: bool = JsonOpt,
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    workers: Optional[int] = typer.Option(None, help="Compute on a local dask cluster with this many workers."),
    scheduler: Optional[str] = typer.Option(None, help="Compute on a dask.distributed scheduler."),
):
    """Linear (or RBF) CKA between stored feature arrays: blocks, time steps, pools, models, stores."""
    opts = {k: v for k, v in locals().items() if k not in ("as_json", "quiet")}
    from .cka_stage import cka_command

    cka_command(**opts, json_out=as_json, show_progress=not quiet)


def config_command(group: typer.Typer, name: str, config_cls, run, help: str) -> None:
    """A typer command whose options are the fields of a config dataclass (one source of option names)."""
    hints = typing.get_type_hints(config_cls)
    params = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name],
                                default=typer.Option(f.default, f"--{f.name.replace('_', '-')}"))
              for f in dataclasses.fields(config_cls)]
    params.append(inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=JsonOpt))

    def command(**kw):
        as_json = kw.pop("as_json")
        run(config_cls(**kw), json_out=as_json)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = help
    group.command(name)(command)


repfusion_app = typer.Typer(no_args_is_help=True, help="RepFusion from the store: teacher targets, t policy, distillation.")
app.add_typer(repfusion_app, name="repfusion")


def add_repfusion_commands() -> None:
    from .repfusion.analyze import AnalyzeConfig
    from .repfusion.commands import analyze_command, finetune_command, targets_command, train_command
    from .repfusion.distill import DistillConfig, FinetuneConfig
    from .repfusion.targets import TargetsConfig

    config_command(repfusion_app, "targets", TargetsConfig, targets_command,
                   "Precompute teacher targets z(t) for every sample x view x t on the grid (truncated forward, once).")
    config_command(repfusion_app, "train", DistillConfig, train_command,
                   "Train the t policy (REINFORCE) and distil the stored targets into a student; no U-Net is loaded.")
    config_command(repfusion_app, "finetune", FinetuneConfig, finetune_command,
                   "Fine-tune a distilled student with labels, beside a no-distillation baseline; no U-Net is loaded.")
    config_command(repfusion_app, "analyze", AnalyzeConfig, analyze_command,
                   "Singular values, effective rank and t-SNE of the targets per t (PNG).")


add_repfusion_commands()


def main():
    try:
        app()
    except DiffstoreError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
