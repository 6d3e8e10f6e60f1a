"""A careless user (issue 21): the bad inputs every command must refuse cleanly (exit 2, the problem and the fix
named, no traceback, nothing created or changed), and the CLI run in this process to try them. The hostile
colleague's payloads are in payloads.py.

Test-only code (not shipped), used by tests/test_hostile.py, tests/test_interrupt.py and bench/bench_faults.py:

    bed = Bed.build(work)            # a store, image folders, plugins and a pickled checkpoint to misuse
    for case in bad_inputs(bed): attempt(case, bed.work)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from payloads import MARKER, edit_attrs, image_folder, pickled_model

from conftest import tree_state


# --- the CLI in this process -------------------------------------------------------------------------------
def cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`diffstore ARGS` in this process (the real entry point, diffstore.cli.main): exit code, stdout and stderr; a
    traceback that escapes is kept in stderr, as a user would see it. `env` replaces the environment meanwhile."""
    from diffstore import cli as diffstore_cli

    out, err, saved, handler = io.StringIO(), io.StringIO(), dict(os.environ), signal.getsignal(signal.SIGINT)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    argv, sys.argv = sys.argv, ["diffstore", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                diffstore_cli.main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except BaseException:  # noqa: BLE001 - a traceback reaching the user is what these checks look for
                traceback.print_exc()
                code = 1
    finally:
        signal.signal(signal.SIGINT, handler)  # main ignores Ctrl-C once done: it expects the process to end
        sys.argv = argv
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def api(call: Callable[[], object]) -> subprocess.CompletedProcess:
    """A Python API call as the CLI's result: exit 2 with the message for a DiffstoreError, 0 when it returns,
    1 with the traceback for anything else."""
    from diffstore.errors import DiffstoreError

    try:
        call()
        return subprocess.CompletedProcess([], 0, "", "")
    except DiffstoreError as e:
        return subprocess.CompletedProcess([], 2, "", f"error: {e}")
    except BaseException:  # noqa: BLE001
        return subprocess.CompletedProcess([], 1, "", traceback.format_exc())


# --- plugins that misbehave ---------------------------------------------------------------------------------
PLUGIN = """import torch
from pathlib import Path
from safetensors.torch import load_file, save_file

WEIGHTS = Path(__file__).with_suffix(".safetensors")


class Block(torch.nn.Module):
    def forward(self, x):
        {block}


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.block = Block()

    def forward(self, x, t):
        return self.block(self.conv(x))


def factory():
    net = Net()
    if not WEIGHTS.exists():
        torch.manual_seed(0)
        save_file(Net().state_dict(), WEIGHTS)
    net.load_state_dict(load_file(WEIGHTS))
    return {{"module": net, "blocks": [("mid", "block")], "alphas_cumprod": [0.5] * 100, "image_size": 8,
            "image_channels": 1, "weight_files": [WEIGHTS]}}
"""
MISBEHAVING = {  # plugin file name -> its block's forward
    "batch_shape": "return torch.nn.functional.adaptive_avg_pool2d(x, 2 if len(x) == 1 else 4)",
    "emits_nan": "return x * float('nan')",
}


def plugin(folder: Path, name: str) -> str:
    """A plugin whose one block misbehaves as MISBEHAVING[name] says; returns its --model spec."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(PLUGIN.format(block=MISBEHAVING[name]))
    from diffstore.models import load_model

    load_model(f"py:{folder / name}.py:factory")  # writes its weights file, before any snapshot
    return f"py:{folder / name}.py:factory"


# --- the test bed: a store, and files to misuse ------------------------------------------------------------
LIMIT = ["--limit", "64"]  # readers read the rows done
STORE_ARGS = ["--split", "train,test", "--t", "10,20", "--blocks", "2,mid", "--pools", "1", *LIMIT, "--shard-rows",
              "16", "-q"]  # the shipped model, the first 64 rows of each digits split: 8 arrays, 4 shards done in each
ARRAY = "features/digits/test/digits-ddpm/noised/t10/b2/p1"


@dataclass
class Bed:
    work: Path
    store: Path  # a store written by `extract ... STORE_ARGS` (train and test arrays)

    @classmethod
    def build(cls, work: Path) -> "Bed":
        r = cli("extract", "--store", work / "store.zarr", *STORE_ARGS)
        assert r.returncode == 0, r.stderr
        return cls(work, work / "store.zarr")

    @property
    def new(self) -> Path:
        return self.work / "new.zarr"  # a store no case may create

    def copy(self, name: str) -> Path:
        """A copy of the store, to be misused by one case."""
        shutil.copytree(self.store, self.work / name)
        return self.work / name


@dataclass
class Case:
    name: str
    run: Callable[[], subprocess.CompletedProcess]
    needle: str  # what the message must say (whitespace-normalised)
    code: int = 2
    setup: Callable[[], object] | None = None  # prepares the files this case misuses (before the snapshot)
    unchanged: str | None = ""  # a folder under work that must not change (default: all of work; None: no check)
    after: Callable[[], bool] | None = None  # what must hold afterwards (e.g. the store verifies)
    seconds: float = 60.0  # a bound on the time taken (crafted attributes must not make a command slow)
    secret: tuple[str, ...] = ()  # text the output must never hold (a credential)


def attempt(case: Case, work: Path) -> dict:
    """Run one case; the row says whether it was clean: the expected exit, the message naming the problem, no
    traceback or Python warning, bounded output, and no file created or changed (sha256 + mtime of every file under
    `work`)."""
    if case.setup is not None:
        case.setup()
    watch = work / case.unchanged if case.unchanged is not None else None
    before = tree_state(watch) if watch else None
    t0 = time.perf_counter()
    r = case.run()
    seconds = time.perf_counter() - t0
    text = " ".join((r.stderr + r.stdout).split())
    checks = {"message names it": case.needle in text and not any(s in text for s in case.secret),
              "no traceback": "Traceback" not in text and "Warning:" not in text and len(r.stderr + r.stdout) < 20_000,
              "nothing created or changed": tree_state(watch) == before if watch else case.after()}
    clean = all(checks.values()) and r.returncode == case.code and seconds < case.seconds
    return {"input": case.name, "exit": r.returncode, **checks, "seconds": round(seconds, 1), "clean": clean,
            "message": text[:300]}


def bad_inputs(bed: Bed) -> list[Case]:
    """Row 8 of issue 21: every bad input a careless user gave, each refused cleanly."""
    import diffstore as ds

    work, store, new = bed.work, str(bed.store), str(bed.new)
    extract = ["extract", "--split", "test", "--t", "10", "--blocks", "2", "--pools", "1", "--limit", "64", "-q"]
    images, all_bad = work / "images", work / "all-bad"
    (work / "exists.png").write_bytes(b"not a folder")
    nan_spec, shape_spec = plugin(work / "plugins", "emits_nan"), plugin(work / "plugins", "batch_shape")
    pickled = pickled_model(work / "pickled", work / MARKER)
    no_network = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_EC2_METADATA_DISABLED": "true",
                  "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}

    def c(name, needle, *args, env=None, code=2, secret=()):
        return Case(name, lambda: cli(*args, env=env), needle, code, secret=secret)

    def a(name, needle, call):
        return Case(name, lambda: api(call), needle)

    import torch

    no_gpu = [] if torch.cuda.is_available() else [
        c("extract --device cuda (no GPU)", "no CUDA device", *extract, "--store", new, "--device", "cuda"),
        c("probe --device cuda (no GPU)", "no CUDA device", "probe", "--store", store, *LIMIT, "--device", "cuda",
          "-q")]
    cases = no_gpu + [
        c("extract --device banana", "not a device", *extract, "--store", new, "--device", "banana"),
        c("repair --device banana", "not a device", "repair", "--store", store, "--device", "banana", "-q"),
        c("probe --plot EXISTING_FILE", "a file is there", "probe", "--store", store, *LIMIT, "--plot",
          work / "exists.png", "-q"),
        c("plugin: block shape depends on the batch size (new store)", "depends on the batch size",
          *extract, "--store", new, "--model", shape_spec, "--blocks", "mid", "--pools", "full"),
        c("plugin: block shape depends on the batch size (existing store)", "depends on the batch size",
          *extract, "--store", store, "--model", shape_spec, "--blocks", "mid", "--pools", "full"),
        c("plugin emitting NaN", "outputs NaN", *extract, "--store", new, "--model", nan_spec, "--blocks", "mid"),
        c("probe --limit 1", "classes", "probe", "--store", store, "--limit", "1", "-q"),
        c("corrupt PNG into an existing store", "bad4.png", "extract", "--store", store, "--dataset", "imagefolder",
          "--data-root", images, "--split", "test", "--t", "10", "--blocks", "2", "--pools", "1", "-q"),
        c("--skip-bad with every image bad", "unreadable; nothing to extract", "extract", "--store", new, "--dataset",
          "imagefolder", "--data-root", all_bad, "--split", "test", "--skip-bad", "--t", "10", "--blocks", "2",
          "--pools", "1", "-q"),
        c("--model-name a/b", "not allowed", *extract, "--store", new, "--model-name", "a/b"),
        c("--model-name ../x", "not allowed", *extract, "--store", new, "--model-name", "../x"),
        c("--model-name x.random-init-sabc", "reserved", *extract, "--store", new, "--model-name",
          "x.random-init-sabc"),
        c("--model-name 'm[/x]'", "not allowed", *extract, "--store", store, "--model-name", "m[/x]"),
        c("info ../../etc/passwd", "not a path inside a store", "info", "--store", store, "../../etc/passwd"),
        c("info features/../../../etc", "not a path inside a store", "info", "--store", store,
          "features/../../../etc"),
        c("rm ../x --yes", "not a path inside a store", "rm", "--store", store, "../x", "--yes"),
        c("info model=../x (selector)", "not allowed", "info", "--store", store, "model=../x"),
        c("rm 'dataset=a/../b' (selector)", "cannot read '..'", "rm", "--store", store, "dataset=a/../b", "--yes"),
        c("pickled .bin checkpoint", "for safety", *extract, "--store", new, "--model", pickled),
        c("--noise-seed -1 (existing store)", "--noise-seed must be >= 0", *extract, "--store", store,
          "--noise-seed", "-1"),
        c("--noise-seed 1e30 (existing store)", "Invalid value for '--noise-seed'", *extract, "--store", store,
          "--noise-seed", "1e30"),
        c("--micro-batch 8 on stored keys", "pass the stored value", *extract, "--store", store, "--micro-batch", "8"),
        c("--store ''", "a store is a path", "ls", "--store", ""),
        c("extract --store ''", "a store is a path", *extract, "--store", ""),
        c("cka --sigma-frac -1", "--sigma-frac must be >", "cka", "--store", store, "--by", "block",
          "--kernel", "rbf", "--method", "minibatch", "--sigma-frac", "-1", "-q"),
        c("repfusion train --epochs -1", "--epochs must be >= 1", "repfusion", "train", "--store", store,
          "--epochs", "-1", "-q"),
        c("ls --store 'foo[/x].zarr'", "foo[/x].zarr", "ls", "--store", work / "foo[/x].zarr"),
        c("s3://KEY:SECRET@bucket (secret redacted)", "s3://***@bucket", "ls", "--store",
          "s3://AKIAKEY:SECRETSECRET@bucket/x.zarr", env=no_network, secret=("SECRETSECRET",)),
        a("ds.open(123)", "a store is a path", lambda: ds.open(123)),
        a("ds.open(None)", "a store is a path", lambda: ds.open(None)),
        a("features(t='abc')", "t= takes integers", lambda: ds.open(store).features(t="abc")),
        a("features('../../etc/passwd')", "not a feature path", lambda: ds.open(store).features("../../etc/passwd")),
        a("ds.probe(S, nonsense_kw=1)", "unknown option nonsense_kw", lambda: ds.probe(store, nonsense_kw=1)),
    ]
    image_folder(images, good=4, bad=1)
    image_folder(all_bad, good=0, bad=3)
    return cases


def crafted(bed: Bed, attribute_mb: int = 100) -> list[Case]:
    """Rows 6 and 7 of issue 21: attributes and links a hostile colleague crafted, each in its own copy of the store.
    A command that can go on (ls) warns and lists the rest; one that needs the node refuses; none writes or deletes
    outside the store, or before it knows it can rebuild."""
    work, outside = bed.work, bed.work / "outside"
    huge, shape, nan, link_c, link_parent, link_array = (work / f"{n}.zarr" for n in (
        "huge", "shape", "nan", "link-c", "link-parent", "link-array"))

    def huge_attribute():
        bed.copy(huge.name)
        edit_attrs(huge / ARRAY, lambda attrs: attrs.update(note="x" * attribute_mb * 10**6))

    def done_shape():
        bed.copy(shape.name)
        meta_file = shape / ARRAY / "done" / "zarr.json"
        meta = json.loads(meta_file.read_text())
        meta["shape"] = [10**15]
        meta_file.write_text(json.dumps(meta))

    def nan_rows():
        bed.copy(nan.name)
        edit_attrs(nan / ARRAY, lambda attrs: attrs["layout"].update(n_rows=float("nan")))

    def moved_outside(store: Path, inside: str, name: str) -> None:
        """Move a folder of the store outside it and leave a symbolic link in its place."""
        outside.mkdir(exist_ok=True)
        shutil.move(store / inside, outside / name)
        (store / inside).symlink_to(outside / name, target_is_directory=True)

    def shards_linked():
        bed.copy(link_c.name)
        (link_c / ARRAY / "done" / "c" / "1").unlink()  # verify says repair: shard 1 is to be rewritten
        moved_outside(link_c, f"{ARRAY}/x/c", "c")

    def parent_linked():
        bed.copy(link_parent.name)
        moved_outside(link_parent, "features/digits/test/digits-ddpm", "model")

    def array_linked():
        bed.copy(link_array.name)
        moved_outside(link_array, ARRAY, "array")

    def c(name, needle, setup, *args, code=2, unchanged="", seconds=60.0, after=None):
        return Case(name, lambda: cli(*args), needle, code, setup, unchanged, after, seconds)

    def verifies(store: Path) -> Callable[[], bool]:
        return lambda: cli("verify", "--store", store).returncode == 0

    limited = "attributes are limited"
    return [
        c(f"{attribute_mb} MB string attribute: ls", limited, huge_attribute, "ls", "--store", huge, code=0,
          seconds=10),
        c(f"{attribute_mb} MB string attribute: info", limited, None, "info", "--store", huge, ARRAY, seconds=10),
        c(f"{attribute_mb} MB string attribute: verify", limited, None, "verify", "--store", huge, "--json", code=1,
          seconds=10),
        c(f"{attribute_mb} MB string attribute: repair", limited, None, "repair", "--store", huge, "-q", seconds=30),
        c("done-flag shape 1e15: ls", "done has 1000000000000000 flags", done_shape, "ls", "--store", shape, code=0),
        c("done-flag shape 1e15: info", "done has 1000000000000000 flags", None, "info", "--store", shape, ARRAY),
        c("done-flag shape 1e15: verify", "done has 1000000000000000 flags", None, "verify", "--store", shape,
          "--json", code=1),
        c("done-flag shape 1e15: repair (rebuilt from the layout)", "metadata", None, "repair", "--store", shape,
          "-q", "--json", code=0, unchanged=None, after=verifies(shape)),
        c("NaN layout.n_rows: ls", "layout.n_rows", nan_rows, "ls", "--store", nan, code=0),
        c("NaN layout.n_rows: repair", "layout.n_rows", None, "repair", "--store", nan, "-q"),
        c("x/c linked outside: repair", "symbolic link", shards_linked, "repair", "--store", link_c, "-q"),
        c("parent folder linked outside: rm", "symbolic link", parent_linked, "rm", "--store", link_parent, ARRAY,
          "--yes"),
        c("array folder is a link: rm", "removed", array_linked, "rm", "--store", link_array, ARRAY, "--yes",
          code=0, unchanged="outside"),
    ]
