"""`diffstore` command line: a thin layer over the API. Each stage's command is built from its options dataclass
(extract/options.py, probe/options.py, cka/options.py, finetune/options.py, repfusion/config.py: one definition of
every option's name, type, default and help), parses the flags into it and calls the stage with it.

Results go to stdout (rich tables, or --json); progress and errors go to stderr. A DiffstoreError exits 2 with
its message, printed as text (never as markup); Ctrl-C exits 130; nothing else is printed.

Start-up is part of the interface: `diffstore --help`, `ls`, `info` and `verify` must not import torch or
matplotlib, so every command imports its stage inside its body, and options come from torch-free modules.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import typing
from typing import Optional

# A Ctrl-C while this module loads (typer takes a moment) exits 130 as well; main() takes over from there, and the
# handler this replaces is restored at the end of the module.
LOADING = signal.signal(signal.SIGINT, lambda *_: sys.exit(130)) \
    if threading.current_thread() is threading.main_thread() else None

import typer  # noqa: E402

from .errors import DiffstoreError, redact  # noqa: E402
from .interrupts import Interrupts  # noqa: E402
from .key import DEFAULT_STORE  # noqa: E402
from .options import JSON_HELP, STORE_HELP, command  # noqa: E402
from .terminal import console, emit, human_bytes  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Cached feature stores of diffusion-model activations.")

StoreOpt = typer.Option(DEFAULT_STORE, "--store", "-s", help=STORE_HELP)
JsonOpt = typer.Option(False, "--json", help=JSON_HELP)


def show_version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"diffstore {__version__}")
        raise typer.Exit()


@app.callback()
def options(version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True,
                                         help="Print the version and exit.")):
    """Cached feature stores of diffusion-model activations."""


def options_command(group: typer.Typer, name: str, cls, run: typing.Callable, help: str,
                    arguments: tuple[str, ...] = (), csv: bool = False) -> None:
    """Register the command options.command builds from `cls` (its fields as flags, plus --json and --csv)."""
    group.command(name)(command(cls, run, help, arguments, csv))


def run_extract(o, fmt: str | None) -> None:
    from .extract.stage import run

    rows, as_json = run(o), fmt == "json"
    if o.dry_run:
        if as_json:
            return emit(rows, "", True)
        for r in rows:
            emit(r["arrays"], f"extract --dry-run -> {o.store}: {r['dataset']}/{r['split']}, rows {r['rows']} of "
                 f"{r['of']}", False, lambda a: {**a, "bytes": human_bytes(a["bytes"])})
            console().print(f"{r['dataset']}/{r['split']}: {r['to_create']} arrays to create, {r['tasks']} (t, shard) "
                            f"tasks, {human_bytes(r['bytes'])} to write, about {r['seconds']:.0f} s of forward "
                            f"(micro-batch {r['micro_batch']}); nothing was written", highlight=False, markup=False)
        return None
    emit(rows, f"extract -> {o.store}", as_json,
         lambda r: {**{k: v for k, v in r.items() if k != "store"}, "arrays": len(r["arrays"])})
    if not as_json and all(r["shards_run"] == 0 for r in rows):
        console().print("Everything requested is already stored; nothing was recomputed.")


def run_repair(o, fmt: str | None) -> None:
    from .extract.repair import run

    rows = run(o)
    emit(rows or [{"status": "nothing to repair: verify finds no problem"}], f"repair {o.store}", fmt == "json")


def run_probe(o, fmt: str | None) -> None:
    from .probe.stage import probe_command

    probe_command(o, fmt)


def run_finetune(o, fmt: str | None) -> None:
    from .finetune.stage import finetune_command

    finetune_command(o, json_out=fmt == "json")


def run_cka(o, fmt: str | None) -> None:
    from .cka.stage import cka_command

    cka_command(o, fmt, command=as_typed("--method"))


def add_stage_commands() -> None:
    from .cka.options import CKAOptions
    from .extract.options import ExtractOptions, RepairOptions
    from .finetune.options import FinetuneOptions
    from .probe.options import ProbeOptions

    options_command(app, "extract", ExtractOptions, run_extract,
                    "Run the U-Net once per (batch, t) and store every requested (t, block, pool) feature array.")
    options_command(app, "repair", RepairOptions, run_repair,
                    "Recompute exactly the shards verify reports bad (bit-identical to a clean run); rebuild broken "
                    "metadata. The model comes from --model (as extract takes it) and must be the one that wrote "
                    "the arrays.", arguments=("keys",))
    options_command(app, "probe", ProbeOptions, run_probe,
                    "Train heads on stored features (the U-Net is never run): table on stdout, results saved in the "
                    "store.", csv=True)
    options_command(app, "cka", CKAOptions, run_cka,
                    "Linear (or RBF) CKA between stored feature arrays: blocks, time steps, pools, models, stores.",
                    csv=True)
    options_command(app, "finetune", FinetuneOptions, run_finetune,
                    "Fine-tune the network truncated after the key's block, plus a head, end to end (--from scratch: "
                    "the same architecture from seeded random weights); stored and compared with the frozen probe. "
                    "The model comes from --model (as extract takes it) and must be the one that wrote the arrays.")


add_stage_commands()


# --- store commands: list, inspect, verify, remove ----------------------------------------------------------------

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
        from .models.adm import adm_block_table
        from .models.adm import adm_config as read_config

        table, title = adm_block_table(read_config(adm_config)), f"ADM {adm_config}"
    else:
        from .models import load_model

        m = load_model(model or "default", random_init=random_init, adm_config=adm_config, prompt=prompt,
                       resolution=resolution)
        table, title = m.blocks, m.name
    rows = [{"b": b.index, "name": b.name, "module": b.module, "C": b.channels, "H": b.height, "W": b.width}
            for b in table]
    emit(rows, f"blocks of {title}" + (f" (mid = {table.mid})" if table.mid else ""), as_json)


def feature_row(url: str, info) -> dict:
    """One array as data (ls --json): its store and path, key fields, shape, shards and rows done, bytes stored
    (every object in its folder). `info`: a store.listing.ArrayInfo."""
    from .store.attrs import shown

    a = info.array
    k, r = a.key, a.attrs["recipe"]
    return {"store": url, "path": a.path, **k.to_dict(), "block_name": shown(a.attrs["block"]["name"], 60),
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


def warn(message: str) -> None:
    print(f"warning: {redact(message)}", file=sys.stderr, flush=True)


SelectorsArg = typer.Argument(None, help="Only these arrays: store paths or selectors like t=10/model=digits-ddpm "
                                         "(dataset=, split=, model=, input=, t=, block=, pool=).")


@app.command("ls")
def ls_(keys: Optional[list[str]] = SelectorsArg, store: str = StoreOpt, as_json: bool = JsonOpt):
    """Feature arrays in the store (all, or those the selectors name): key, shape, rows done / total, size."""
    from .store import Store
    from .store.attrs import shown
    from .store.listing import survey

    rows = []
    s = Store.open(store, mode="r")
    for info in survey(s, keys, roots=("features",)):
        try:  # one broken array does not hide the others
            if info.error:
                raise DiffstoreError(info.error)
            rows.append(feature_row(store, info))
        except (DiffstoreError, KeyError, TypeError, ValueError) as e:
            warn(str(e) if isinstance(e, DiffstoreError)
                 else f"{info.path}: unreadable attributes ({type(e).__name__})")
    s.feature_keys()  # names the folders that are not keys (a name edited by hand): listed, never parsed
    for path in s.invalid:
        warn(f"{shown(path)} is not a feature key (names are letters, digits and . _ + -): remove it with "
             f"`diffstore rm --store {store} {shown(path)} --yes`")
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
          as_json: bool = JsonOpt,
          quiet: bool = typer.Option(False, "--quiet/--progress", "-q", help="No progress on stderr.")):
    """Merge arrays (and their splits and results) into another store: only the done shards it lacks move,
    every chunk's crc32c checked; a conflicting fingerprint is refused before anything is written. Resumable."""
    from .store.copy import copy as run

    rows = run(src, dst, keys, dry_run=dry_run, workers=workers, show_progress=not quiet)
    moved = sum(r["bytes"] for r in rows)
    title = f"{'dry run (nothing written): ' if dry_run else ''}copy {src} -> {dst}: {human_bytes(moved)}"
    emit(rows, title, as_json, lambda r: {**r, "bytes": human_bytes(r["bytes"])})


@app.command()
def info(keys: list[str] = typer.Argument(..., help="Store paths or selectors like "
                                                    "t=90/b=5/p=2 (model=..., split=...)."),
         store: str = StoreOpt, as_json: bool = JsonOpt):
    """One array's full key, fingerprint, recipe and provenance (always JSON; --json is accepted as elsewhere)."""
    from .key import LEGACY_FORWARD
    from .store import Store

    s = Store.open(store, mode="r")
    out = []
    for path in s.match(keys):
        a = s.open_array(path)
        recipe = {**LEGACY_FORWARD, **a.attrs.get("recipe", {})}  # forward fields absent from older stores
        out.append({"store": store, "path": a.path, **a.attrs, "recipe": recipe, "shape": list(a.shape),
                    "chunks": list(a.x.chunks), "shards": list(a.x.shards), "dtype": str(a.x.dtype),
                    "shards_done": int(a.done_mask().sum()), "n_shards": a.n_shards, "bytes_stored": a.nbytes_stored(),
                    "codec": a.codec})
    print(json.dumps(out, indent=1, default=str))


@app.command()
def verify(store: str = StoreOpt, as_json: bool = JsonOpt):
    """Check every array and split: metadata, completeness, crc32c per chunk, NaN rows; exits 1 naming what is
    wrong."""
    from .store import Store
    from .store.verify import verify_store

    problems, checked = verify_store(Store.open(store, mode="r"))
    rows = [{"array": p["array"], "problem": p["problem"]} for p in problems]
    emit((problems if as_json else rows) or [{"arrays checked": checked, "status": "ok"}], f"verify {store}", as_json)
    if problems:
        raise typer.Exit(1)


@app.command()
def rm(keys: list[str] = typer.Argument(..., help="Arrays to remove: store paths or selectors like t=90/b=5/p=2."),
       store: str = StoreOpt,
       yes: bool = typer.Option(False, "--yes/--no-yes", "-y",
                                help="Remove without asking (--no-yes: ask, the default)."),
       as_json: bool = JsonOpt):
    """Remove feature (or target) arrays and the stored results computed from them."""
    from .store import Store
    from .store.remove import plan_removal, remove

    s = Store.open(store, mode="a")
    arrays, results = plan_removal(s, keys)
    listing = "\n  ".join(arrays + results)
    if not yes:
        from rich.console import Console

        if not sys.stdin.isatty():
            raise DiffstoreError(f"rm would remove {len(arrays)} array(s) and {len(results)} result(s):\n  {listing}\n"
                                 "Nothing was removed: pass --yes to confirm (stdin is not a terminal)")
        Console(stderr=True).print(f"remove {len(arrays)} array(s) and {len(results)} result(s)?\n  {listing}",
                                   highlight=False, soft_wrap=True, markup=False)
        if not typer.confirm("remove them", default=False, err=True):
            raise typer.Exit(1)
    remove(s, arrays + results)
    emit([{"removed": p} for p in arrays + results], f"rm {store}", as_json)


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
        elif arg.split("=")[0] not in drop:
            out.append(shlex.quote(arg))
    return " ".join(["diffstore", *out])


# --- repfusion: the same builder over repfusion/config.py ----------------------------------------------------

repfusion_app = typer.Typer(no_args_is_help=True,
                            help="RepFusion from the store: teacher targets, t policy, distillation.")
app.add_typer(repfusion_app, name="repfusion")


def add_repfusion_commands() -> None:
    from .repfusion.config import AnalyzeConfig, DistillConfig, FinetuneConfig, TargetsConfig

    def runner(name: str):
        def run(cfg, fmt: str | None) -> None:
            from .repfusion import commands

            getattr(commands, name)(cfg, json_out=fmt == "json", show_progress=cfg.show_progress)
        return run

    for name, cls, fn, help in (
            ("targets", TargetsConfig, "targets_command", "Precompute teacher targets z(t) for every sample x view x t "
                                                          "on the grid (truncated forward, once)."),
            ("train", DistillConfig, "train_command", "Train the t policy (REINFORCE) and distil the stored targets "
                                                      "into a student; no U-Net is loaded."),
            ("finetune", FinetuneConfig, "finetune_command", "Fine-tune a distilled student with labels, beside a "
                                                             "no-distillation baseline; no U-Net is loaded."),
            ("analyze", AnalyzeConfig, "analyze_command", "Singular values, effective rank and t-SNE of the targets "
                                                          "per t (PNG beside the store).")):
        options_command(repfusion_app, name, cls, runner(fn), help)


add_repfusion_commands()


def print_error(message: str) -> None:
    """An error on stderr as plain text (never markup: `[/x]` or `:name:` in a name or path is printed as it is),
    credentials redacted. Imports nothing: after a Ctrl-C that stopped an import midway, importing again can fail."""
    print(f"error: {redact(message)}", file=sys.stderr, flush=True)


def run_app() -> int:
    """The command's exit code: 0, 1 (verify found problems), 2 (bad input: the message on stderr, as text), 130
    (Ctrl-C)."""
    try:
        code = app(standalone_mode=False)  # click's own exits are handled here: Ctrl-C must exit 130, not 1
        return code if isinstance(code, int) else 0
    except DiffstoreError as e:
        print_error(str(e))
        return 2
    except Exception as e:
        # click (or the copy typer vendors) signals Ctrl-C and usage errors with classes of its own
        if type(e).__name__ == "Abort":
            return 130
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()  # a usage error: click's own message and exit code (2)
            return e.exit_code
        from .store.backend import storage_failure  # the storage failing (disk full, network, ...) is not a bug

        message = storage_failure("the store", e)
        if message is None:
            raise
        print_error(message)
        return 2


def main():
    # When a storage server drops mid-run, its in-flight uploads fail in background tasks nobody awaits any more, and
    # asyncio logs each with a traceback; the command reports the outage itself (below), once and without one.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    with Interrupts() as interrupts:
        try:
            code = run_app()
        except (KeyboardInterrupt, Exception):  # (typer returns 130 for a KeyboardInterrupt inside a command)
            if not interrupts.received:  # a bug: its traceback is shown
                raise  # (an error after Ctrl-C, e.g. a module whose import it stopped, is the interrupt's doing)
        if interrupts.received or code == 130:
            interrupts.end()  # the message, then exit 130 at once
    sys.exit(code)


if LOADING is not None:
    signal.signal(signal.SIGINT, LOADING)

if __name__ == "__main__":
    main()
