"""`diffstore` command line: typer commands that parse options and call one function each.

Results go to stdout (rich tables, or --json); progress and errors go to stderr. A DiffstoreError exits 2
with its message; nothing else is printed.

Start-up is part of the interface: `diffstore --help`, `ls`, `info` and `verify` must not import torch or
matplotlib, so every command imports its stage inside its body, and option defaults and help come from
torch-free modules (repfusion/config.py).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import sys
import typing
from typing import Optional

import typer

from .errors import DiffstoreError
from .key import DEFAULT_STORE

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Cached feature stores of diffusion-model activations.")

StoreOpt = typer.Option(DEFAULT_STORE, "--store", "-s", help="Store path or fsspec URL (s3://bucket/team.zarr).")
JsonOpt = typer.Option(False, "--json", help="Machine-readable JSON on stdout (data: paths, lists, ints, bytes).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress on stderr.")
LimitOpt = typer.Option(None, "--limit", min=1, help="Only the first N rows of each split (recorded in the dataset fingerprint; split names unchanged).")


def show_version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"diffstore {__version__}")
        raise typer.Exit()


@app.callback()
def options(version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True,
                                         help="Print the version and exit.")):
    """Cached feature stores of diffusion-model activations."""


def console():
    """stdout for results; piped output is not wrapped at 80 columns."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


def emit(rows: list[dict], title: str, as_json: bool, show: typing.Callable[[dict], dict] | None = None) -> None:
    """Print rows as JSON (the data as it is), or as a rich table (through `show`, which formats for people)."""
    if as_json:
        print(json.dumps(rows, indent=1, default=str))
        return
    from rich.table import Table

    rows = [show(r) for r in rows] if show else rows
    table = Table(title=title)
    for col in (rows[0] if rows else {}):
        table.add_column(str(col), justify="right" if isinstance(rows[0][col], (int, float)) else "left")
    for row in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()])
    console().print(table)


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


@app.command()
def extract(
    store: str = StoreOpt,
    dataset: str = typer.Option("digits", help="digits | mnist | fashion-mnist | cifar10 | imagefolder"),
    data_root: Optional[str] = typer.Option(None, help="Dataset directory (default: $DIFFSTORE_DATA/<dataset>)."),
    split: str = typer.Option("train,test", help="Splits, comma-separated."),
    model: str = typer.Option("default", help="default | FOLDER | owner/name | adm:PATH.pt | sd:PATH_OR_ID | dit:PATH_OR_ID | py:FILE.py:FACTORY"),
    model_name: Optional[str] = typer.Option(None, help="Name of the model in store paths (default: from the folder/id)."),
    random_init: Optional[int] = typer.Option(None, help="Same architecture, random weights with this seed (the control)."),
    adm_config: Optional[str] = typer.Option(None, help="ADM config: 256-uncond, 256-cond, 128-cond, 64-cond or a JSON file."),
    class_label: Optional[str] = typer.Option(None, help="Class-conditional ADM/DiT: a class index N, or 'dataset' (the dataset's labels). Default: ADM the dataset's labels, DiT its null class."),
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
    shard_rows: Optional[int] = typer.Option(None, help="Rows per shard (a multiple of the micro-batch; default: sized to ~256 MB per task)."),
    micro_batch: Optional[int] = typer.Option(None, help="Rows per forward: part of the recipe (changes the last bits). Default: what the arrays hold, else 16 on CPU, sized to memory on CUDA."),
    attention: Optional[str] = typer.Option(None, help="ADM attention: sdpa (default for new arrays) | eager (the reference's einsum). Part of the recipe."),
    compile_: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the blocks' layers (part of the recipe; default: what the arrays hold, else off)."),
    loader_workers: Optional[int] = typer.Option(None, help="Processes decoding images ahead of the device (default: cores - 1, at most 8; does not change values)."),
    skip_bad: bool = typer.Option(False, "--skip-bad/--no-skip-bad", help="Skip unreadable images, recording their ids."),
    limit: Optional[int] = LimitOpt,
    workers: Optional[int] = typer.Option(None, help="Run on a local dask cluster with this many worker processes."),
    scheduler: Optional[str] = typer.Option(None, help="Run on a dask.distributed scheduler (tcp://HOST:8786)."),
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
):
    """Run the U-Net once per (batch, t) and store every requested (t, block, pool) feature array."""
    from .api import extract as run

    rows = run(store, dataset=dataset, data_root=data_root, split=split, model=model, model_name=model_name,
               random_init=random_init, adm_config=adm_config, class_label=class_label, prompt=prompt,
               resolution=resolution, t=t, blocks=blocks, pools=pools, input=input_mode, noise_seed=noise_seed,
               noise_draws=noise_draws, batch_size=batch_size, device=device, dtype=dtype, compute_dtype=compute_dtype,
               shard_rows=shard_rows, micro_batch=micro_batch, attention=attention, compile=compile_,
               loader_workers=loader_workers, skip_bad=skip_bad, limit=limit, workers=workers, scheduler=scheduler,
               show_progress=not quiet)
    emit(rows, f"extract -> {store}", as_json, lambda r: {**{k: v for k, v in r.items() if k != "store"}, "arrays": len(r["arrays"])})
    if not as_json and all(r["shards_run"] == 0 for r in rows):
        console().print("Everything requested is already stored; nothing was recomputed.")


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
        from .models import load_model

        m = load_model(model or "default", random_init=random_init, adm_config=adm_config, prompt=prompt, resolution=resolution)
        table, title = m.blocks, m.name
    rows = [{"b": b.index, "name": b.name, "module": b.module, "C": b.channels, "H": b.height, "W": b.width} for b in table]
    emit(rows, f"blocks of {title}" + (f" (mid = {table.mid})" if table.mid else ""), as_json)


def feature_row(url: str, info) -> dict:
    """One array as data (ls --json): its store and path, key fields, shape, shards and rows done, bytes stored
    (every object in its folder). `info`: a store.listing.ArrayInfo."""
    a = info.array
    k, r = a.key, a.attrs["recipe"]
    return {"store": url, "path": a.path, **k.to_dict(), "block_name": a.attrs["block"]["name"],
            "noise_seed": r["noise_seed"], "noise_draws": r["noise_draws"], "dtype": r["storage_dtype"],
            "shape": list(a.shape), "shards_done": int(info.done.sum()), "shards": a.n_shards,
            "rows_done": info.rows_done, "rows": a.n_rows, "bytes": info.bytes}


def show_feature_row(r: dict) -> dict:
    """The same row for people: compact columns, human sizes."""
    return {"dataset": f"{r['dataset']}/{r['split']}", "model": r["model"], "input": r["input"], "t": r["t"],
            "block": f"{r['block']} {r['block_name']}", "pool": r["pool"],
            "noise": f"seed {r['noise_seed']} x{r['noise_draws']}", "dtype": r["dtype"],
            "shape": "x".join(map(str, r["shape"])), "rows done": f"{r['rows_done']}/{r['rows']}",
            "size": human_bytes(r["bytes"])}


SelectorsArg = typer.Argument(None, help="Only these arrays: store paths or selectors like t=10/model=digits-ddpm "
                                         "(dataset=, split=, model=, input=, t=, block=, pool=).")


@app.command("ls")
def ls_(keys: Optional[list[str]] = SelectorsArg, store: str = StoreOpt, as_json: bool = JsonOpt):
    """Feature arrays in the store (all, or those the selectors name): key, shape, rows done / total, size."""
    from rich.console import Console

    from .store import Store
    from .store.listing import survey

    rows = []
    for info in survey(Store.open(store, mode="r"), keys, roots=("features",)):
        try:  # one broken array does not hide the others
            if info.error:
                raise DiffstoreError(info.error)
            rows.append(feature_row(store, info))
        except (DiffstoreError, KeyError, TypeError, ValueError) as e:
            why = e if isinstance(e, DiffstoreError) else f"{info.path}: unreadable attributes ({type(e).__name__})"
            Console(stderr=True).print(f"warning: {why}", highlight=False, soft_wrap=True, markup=False)
    emit(rows, f"{store}: {len(rows)} feature arrays", as_json, show_feature_row)


@app.command()
def du(keys: Optional[list[str]] = SelectorsArg, store: str = StoreOpt,
       by: str = typer.Option("dataset,split,model", help="Group by these key fields, comma-separated: kind, dataset, "
                              "split, model, input, t, block, pool."),
       as_json: bool = JsonOpt):
    """Bytes stored per dataset, split and model (feature and target arrays; --by for other groupings)."""
    from .store import Store
    from .store.listing import usage

    rows = usage(Store.open(store, mode="r"), keys, tuple(f.strip() for f in by.split(",") if f.strip()))
    total = sum(r["bytes"] for r in rows)
    emit(rows, f"{store}: {human_bytes(total)} in {sum(r['arrays'] for r in rows)} arrays", as_json,
         lambda r: {**r, "bytes": human_bytes(r["bytes"])})


@app.command("copy")
def copy_(src: str = typer.Argument(..., help="Store to copy from: a path or URL (s3://bucket/team.zarr)."),
          dst: str = typer.Argument(..., help="Store to copy into (created when absent; other keys in it are kept)."),
          keys: Optional[list[str]] = SelectorsArg,
          dry_run: bool = typer.Option(False, "--dry-run/--no-dry-run", help="List what would move and its bytes; "
                                       "write nothing."),
          workers: int = typer.Option(16, help="Objects in flight at once (reads and writes)."),
          as_json: bool = JsonOpt, quiet: bool = QuietOpt):
    """Merge arrays (and their splits and results) into another store: only the done shards it lacks move,
    every chunk's crc32c checked; a conflicting fingerprint is refused before anything is written. Resumable."""
    from .store.copy import copy as run

    rows = run(src, dst, keys, dry_run=dry_run, workers=workers, show_progress=not quiet)
    moved = sum(r["bytes"] for r in rows)
    title = f"{'dry run (nothing written): ' if dry_run else ''}copy {src} -> {dst}: {human_bytes(moved)}"
    emit(rows, title, as_json, lambda r: {**r, "bytes": human_bytes(r["bytes"])})


@app.command()
def info(keys: list[str] = typer.Argument(..., help="Store paths or selectors like t=90/b=5/p=2 (model=..., split=...)."),
         store: str = StoreOpt, as_json: bool = JsonOpt):
    """One array's full key, fingerprint, recipe and provenance (always JSON; --json is accepted as elsewhere)."""
    from .key import LEGACY_FORWARD
    from .store import Store
    from .store.repair import match

    s = Store.open(store, mode="r")
    out = []
    for path in match(s, keys):
        a = s.open_array(path)
        recipe = {**LEGACY_FORWARD, **a.attrs.get("recipe", {})}  # forward fields absent from older stores
        out.append({"store": store, "path": a.path, **a.attrs, "recipe": recipe, "shape": list(a.shape),
                    "chunks": list(a.x.chunks), "shards": list(a.x.shards), "dtype": str(a.x.dtype),
                    "shards_done": int(a.done_mask().sum()), "n_shards": a.n_shards, "bytes_stored": a.nbytes_stored()})
    print(json.dumps(out, indent=1, default=str))


@app.command()
def verify(store: str = StoreOpt, as_json: bool = JsonOpt):
    """Check every array: metadata, completeness, crc32c per chunk, NaN rows; exits 1 naming what is wrong."""
    from .store import Store
    from .store.verify import verify_store

    problems, checked = verify_store(Store.open(store, mode="r"))
    rows = [{"array": p["array"], "problem": p["problem"]} for p in problems]
    emit((problems if as_json else rows) or [{"arrays checked": checked, "status": "ok"}], f"verify {store}", as_json)
    if problems:
        raise typer.Exit(1)


@app.command()
def repair(keys: Optional[list[str]] = typer.Argument(None, help="Arrays to repair (paths or selectors); default: all."),
           store: str = StoreOpt,
           batch_size: int = typer.Option(64, help="Rows per step (does not change values)."),
           device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (does not change values)."),
           as_json: bool = JsonOpt, quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars.")):
    """Recompute exactly the shards verify reports bad (bit-identical to a clean run); rebuild broken metadata."""
    from .store import Store
    from .store.repair import repair as repair_store

    if batch_size < 1:
        raise DiffstoreError(f"--batch-size must be >= 1, got {batch_size}")
    rows = repair_store(Store.open(store, mode="a"), keys, batch_size=batch_size, device=device, show_progress=not quiet)
    emit(rows or [{"status": "nothing to repair: verify finds no problem"}], f"repair {store}", as_json)


@app.command()
def rm(keys: list[str] = typer.Argument(..., help="Arrays to remove: store paths or selectors like t=90/b=5/p=2."),
       store: str = StoreOpt, yes: bool = typer.Option(False, "--yes/--no-yes", "-y", help="Remove without asking (--no-yes: ask, the default)."),
       as_json: bool = JsonOpt):
    """Remove feature (or target) arrays and the stored results computed from them."""
    from .store import Store
    from .store.repair import plan_removal, remove

    s = Store.open(store, mode="a")
    arrays, results = plan_removal(s, keys)
    listing = "\n  ".join(arrays + results)
    if not yes:
        from rich.console import Console

        if not sys.stdin.isatty():
            raise DiffstoreError(f"rm would remove {len(arrays)} array(s) and {len(results)} result(s):\n  {listing}\n"
                                 "Nothing was removed: pass --yes to confirm (stdin is not a terminal)")
        Console(stderr=True).print(f"remove {len(arrays)} array(s) and {len(results)} result(s)?\n  {listing}", highlight=False, soft_wrap=True)
        if not typer.confirm("remove them", default=False, err=True):
            raise typer.Exit(1)
    remove(s, arrays + results)
    emit([{"removed": p} for p in arrays + results], f"rm {store}", as_json)


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
    lrs: str = typer.Option("0.001,0.003,0.01", help="converged recipe: AdamW learning rates that mlp/cnn/attention "
                            "heads are tuned over (each paired with every --weight-decays value; picked on validation)."),
    weight_decays: str = typer.Option("0,0.05,0.5", help="converged recipe: AdamW weight decays of that grid."),
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
    limit: Optional[int] = LimitOpt,
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
    model: Optional[str] = typer.Option(None, help="Model of the arrays (needed when the store holds several)."),
    dataset: Optional[str] = typer.Option(None, help="Dataset of the arrays (needed when the store holds several)."),
    split: Optional[str] = typer.Option(None, help="Split to compare on (default: test when the store holds several)."),
    input_mode: Optional[str] = typer.Option(None, "--input", help="Input mode, noised | clean (needed when the store holds both)."),
    a: Optional[str] = typer.Option(None, help="Row keyset: t=90/b=5/p=2,t=150/b=6/p=2 (model=... too)."),
    b: Optional[str] = typer.Option(None, help="Column keyset (default: the rows)."),
    store_b: Optional[str] = typer.Option(None, help="Store of the column keyset (across stores)."),
    method: str = typer.Option("unbiased", help="unbiased (debiased, all rows, O(D^2) memory) | exact (full-batch, biased upwards when N is not >> D) | minibatch (unbiased, O(batch^2)) | auto (exact if it fits, else minibatch)."),
    kernel: str = typer.Option("linear", help="linear | rbf (minibatch only)."),
    batch_size: int = typer.Option(256, help="Minibatch size (recorded with the result)."),
    seed: int = typer.Option(0, help="Sample-order seed of the minibatch estimator (recorded)."),
    sigma_frac: float = typer.Option(1.0, help="RBF bandwidth as a fraction of the median distance."),
    limit: Optional[int] = LimitOpt,
    plot: Optional[str] = typer.Option(None, help="Write the heatmap PNG into this folder."),
    out: Optional[str] = typer.Option(None, help="Write the matrix JSON into this folder."),
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
    workers: Optional[int] = typer.Option(None, help="Compute on a local dask cluster with this many workers."),
    scheduler: Optional[str] = typer.Option(None, help="Compute on a dask.distributed scheduler."),
):
    """Linear (or RBF) CKA between stored feature arrays: blocks, time steps, pools, models, stores."""
    opts = {k: v for k, v in locals().items() if k not in ("as_json", "quiet")}
    from .cka.stage import cka_command

    cka_command(**opts, json_out=as_json, show_progress=not quiet, command=as_typed("--method"))


def as_typed(*drop: str) -> str:
    """The command line as the user typed it, without the options in `drop` (and their values)."""
    import shlex

    args, out = sys.argv[1:], []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in drop:
            skip = True
        elif not arg.split("=")[0] in drop:
            out.append(shlex.quote(arg))
    return " ".join(["diffstore", *out])


def config_command(group: typer.Typer, name: str, config_cls, run: str, help: str) -> None:
    """A typer command whose options are the fields of a config dataclass (one source of option names and
    help: repfusion/config.py). Booleans get --x/--no-x. `run` names the function in repfusion.commands,
    imported only when the command runs."""
    hints = typing.get_type_hints(config_cls)

    def option(f: dataclasses.Field):
        flag = f"--{f.name.replace('_', '-')}"
        decls = [f"{flag}/--no-{flag[2:]}"] if hints[f.name] is bool else [flag]
        return typer.Option(f.default, *decls, help=f.metadata.get("help"))

    params = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name], default=option(f))
              for f in dataclasses.fields(config_cls)]
    params += [inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=JsonOpt),
               inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=QuietOpt)]

    def command(**kw):
        as_json, quiet = kw.pop("as_json"), kw.pop("quiet")
        from .repfusion import commands

        getattr(commands, run)(config_cls(**kw), json_out=as_json, show_progress=not quiet)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = help
    group.command(name)(command)


repfusion_app = typer.Typer(no_args_is_help=True, help="RepFusion from the store: teacher targets, t policy, distillation.")
app.add_typer(repfusion_app, name="repfusion")


def add_repfusion_commands() -> None:
    from .repfusion.config import AnalyzeConfig, DistillConfig, FinetuneConfig, TargetsConfig

    config_command(repfusion_app, "targets", TargetsConfig, "targets_command",
                   "Precompute teacher targets z(t) for every sample x view x t on the grid (truncated forward, once).")
    config_command(repfusion_app, "train", DistillConfig, "train_command",
                   "Train the t policy (REINFORCE) and distil the stored targets into a student; no U-Net is loaded.")
    config_command(repfusion_app, "finetune", FinetuneConfig, "finetune_command",
                   "Fine-tune a distilled student with labels, beside a no-distillation baseline; no U-Net is loaded.")
    config_command(repfusion_app, "analyze", AnalyzeConfig, "analyze_command",
                   "Singular values, effective rank and t-SNE of the targets per t (PNG beside the store).")


add_repfusion_commands()


def main():
    # When a storage server drops mid-run, its in-flight uploads fail in background tasks nobody awaits any more, and
    # asyncio logs each with a traceback; the command reports the outage itself (below), once and without one.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    try:
        app()
    except DiffstoreError as e:
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception as e:  # the storage failing (disk full, read-only, network, credentials) is not a bug
        from rich.console import Console

        from .store.backend import storage_failure

        message = storage_failure("the store", e)
        if message is None:
            raise
        Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
