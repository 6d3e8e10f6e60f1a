"""Faults the store survives (issue 12), measured on the shipped model and the digits test split.

The CLI runs in this process (diffstore.cli.main with its argv: the same code, exit code and stderr, without paying
the torch start-up per call), and killed or racing writers are forked from it (real processes, real kill -9).

    python bench/bench_faults.py [--kills 20] [--races 5] [--seed 0] [--only bad|corrupt|race|kill ...]

Prints, against a clean reference run of the same extraction (4 arrays x 23 shards):
- kill -9 at random instants of `diffstore extract`, then a re-run: how many resumed bit-identical and verified;
- 2 writers at once on the same keys, repeated: exit codes and identity with the reference;
- each corruption (flipped byte, truncated shard, deleted shard with done=1, done flag cleared, unreadable
  zarr.json, wrong shape in zarr.json): caught by `verify`, refused by a reader (`cka`), restored by `repair`;
- every bad input: exit code, message, no traceback, nothing created or changed (sha256 + mtime of every file);
- disk full and read-only file system on a real tmpfs (needs root to mount; skipped otherwise).
Progress goes to stderr; the figures to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # test-only fault injection
from faults import CORRUPTIONS, done_flag_cleared  # noqa: E402

EXTRACT = ["extract", "--split", "test", "--t", "10", "--blocks", "2,mid", "--pools", "1,2", "--shard-rows", "16",
           "--batch-size", "16", "-q"]
X = "features/digits/test/digits-ddpm/noised/t10/b2/p1"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`diffstore ARGS` in this process: exit code, stdout, stderr (a traceback that escapes is kept in stderr)."""
    from diffstore import cli as diffstore_cli

    out, err, saved = io.StringIO(), io.StringIO(), dict(os.environ)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    argv, sys.argv = sys.argv, ["diffstore", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                diffstore_cli.main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except Exception:  # noqa: BLE001 - a traceback reaching the user is what this bench looks for
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def fork(url: Path) -> int:
    """A writer process running the extraction on `url` (forked: the CLI's code with torch already imported)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if rerun(url) is None else 2
        finally:
            os._exit(code)
    return pid


def exit_code(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def tree(root: Path) -> dict:
    """Every file under root: sha256 and mtime (so 'unchanged' means bytes and times)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def hashes(url) -> dict:
    from diffstore.store import Store

    store = Store.open(str(url), mode="r")
    return {p: hashlib.sha256(store.open_array(p).read().tobytes()).hexdigest() for p in store.array_paths()}


def verified(url) -> bool:
    from diffstore.store import Store
    from diffstore.store.verify import verify_findings

    return verify_findings(Store.open(str(url), mode="r"))[0] == []


def state(url: Path) -> str:
    """Where a kill landed: no store yet, or how many shards were done."""
    if not (url / "zarr.json").exists():
        return "no store yet"
    done = sum(1 for _ in url.glob("features/**/done/c/*"))
    return f"{done}/92 shards done"


def reference_run(url: Path) -> float:
    """A clean forked run: seconds until it exits."""
    t0 = time.perf_counter()
    assert exit_code(fork(url)) == 0
    return time.perf_counter() - t0


def rerun(url: Path) -> str | None:
    """The extraction again, in this process (what the CLI runs, without paying its start-up 20 times)."""
    from diffstore.datasets import load_split
    from diffstore.errors import DiffstoreError
    from diffstore.extract import extract_features, plan_extraction
    from diffstore.models import load_model
    from diffstore.store import Store

    global MODEL
    MODEL = MODEL or load_model("default")  # loaded once, before the writers are forked
    try:
        plan = plan_extraction(Store.open(str(url)), MODEL, load_split("digits", "test"), t="10", blocks="2,mid", pools="1,2",
                               shard_rows=16)
        extract_features(plan, batch_size=16, show_progress=False)
    except DiffstoreError as e:
        return f"refused: {e}"
    return None


MODEL = None


def kills(work: Path, n: int, reference: dict, window: tuple[float, float], rng: random.Random) -> list[dict]:
    rows = []
    for i in range(n):
        url = work / f"kill{i}.zarr"
        at = rng.uniform(*window)
        pid = fork(url)
        time.sleep(at)
        os.kill(pid, signal.SIGKILL)
        exit_code(pid)
        landed = state(url)
        error = rerun(url)
        same = error is None and hashes(url) == reference
        rows.append({"kill at s": round(at, 1), "landed": landed, "rerun": error or "ok",
                     "identical": same, "verified": error is None and verified(url)})
        log(f"kill {i + 1}/{n}: {rows[-1]}")
        shutil.rmtree(url, ignore_errors=True)
    return rows


def races(work: Path, n: int, reference: dict) -> list[dict]:
    rows = []
    for i in range(n):
        url = work / f"race{i}.zarr"
        pids = [fork(url) for _ in range(2)]
        rows.append({"exits": [exit_code(p) for p in pids], "identical": hashes(url) == reference, "verified": verified(url)})
        log(f"race {i + 1}/{n}: {rows[-1]}")
        shutil.rmtree(url, ignore_errors=True)
    return rows


def corruptions(work: Path, clean: Path, reference: dict) -> list[dict]:
    rows = []
    for corrupt in CORRUPTIONS:
        url = work / f"{corrupt.__name__}.zarr"
        shutil.copytree(clean, url)
        corrupt(url, X, 5)
        v = cli("verify", "--store", str(url), "--json")
        caught = v.returncode == 1 and X in v.stdout
        reader = cli("cka", "--store", str(url), "--by", "block", "--t", "10", "--pool", "1", "--split", "test", "-q")
        refused = reader.returncode == 2 and X in reader.stderr and "diffstore repair" in reader.stderr \
            and "Traceback" not in reader.stderr
        fix = cli("repair", "--store", str(url), "-q")  # the shipped model wrote it: the default --model
        restored = fix.returncode == 0 and hashes(url) == reference and verified(url)
        rows.append({"corruption": corrupt.__name__, "caught by verify": caught, "refused by cka": refused,
                     "repaired bit-identical": restored})
        log(f"{rows[-1]}" + ("" if refused else f" cka: {reader.returncode} {reader.stderr[-300:]}")
            + ("" if restored else f" repair: {fix.stderr[-300:]}"))
        shutil.rmtree(url, ignore_errors=True)
    return rows


def image_folder(root: Path) -> Path:
    """test/{a,b}/: four readable PNGs and one truncated JPEG."""
    import numpy as np
    from PIL import Image

    for c in ("a", "b"):
        (root / "test" / c).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / "test" / "ab"[i % 2] / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / "test/b/bad.jpg")
    (root / "test/b/bad.jpg").write_bytes((root / "test/b/bad.jpg").read_bytes()[:200])
    return root


def bad_inputs(work: Path, clean: Path) -> list[dict]:
    existing = work / "existing.zarr"
    shutil.copytree(clean, existing)
    new = str(work / "new.zarr")
    folder = image_folder(work / "images")
    no_aws = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {
        "AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_CONFIG_FILE": "/nonexistent"}
    cases = [
        ("--batch-size 0 (new store)", [*EXTRACT, "--store", new, "--batch-size", "0"], None, "batch"),
        ("--batch-size -5 (new store)", [*EXTRACT, "--store", new, "--batch-size", "-5"], None, "batch"),
        ("--shard-rows -16 (new store)", [*EXTRACT, "--store", new, "--shard-rows", "-16"], None, "shard-rows"),
        ("--shard-rows 7 (new store)", [*EXTRACT, "--store", new, "--shard-rows", "7"], None, "shard-rows"),
        ("--t abc (new store)", [*EXTRACT, "--store", new, "--t", "abc"], None, "--t"),
        ("corrupt JPEG (new store)", ["extract", "--store", new, "--dataset", "imagefolder", "--data-root", str(folder),
                                      "--split", "test", "--t", "10", "--blocks", "2", "--pools", "1", "-q"], None, "bad.jpg"),
        ("s3:// without credentials", ["ls", "--store", "s3://bucket/x.zarr"], no_aws, "no credentials"),
        ("--shard-rows 7 (existing key)", [*EXTRACT, "--store", str(existing), "--shard-rows", "7"], None, "shard-rows"),
        ("--shard-rows 32 (existing key)", [*EXTRACT, "--store", str(existing), "--shard-rows", "32"], None, "16 rows per shard"),
        ("--batch-size 0 (existing store)", [*EXTRACT, "--store", str(existing), "--batch-size", "0"], None, "batch"),
        ("--noise-seed 1 (other fingerprint)", [*EXTRACT, "--store", str(existing), "--noise-seed", "1"], None, "noise_seed"),
        ("info t=nope", ["info", "--store", str(existing), "t=nope"], None, "t takes an integer"),
        ("rm without --yes (not a TTY)", ["rm", "--store", str(existing), "b=2"], None, "--yes"),
    ]
    rows = []
    for name, args, env, needle in cases:
        before = (tree(existing), sorted(p.name for p in work.iterdir()))
        r = cli(*args, env=env)
        after = (tree(existing), sorted(p.name for p in work.iterdir()))
        rows.append({"input": name, "exit": r.returncode, "message names it": needle in " ".join(r.stderr.split()),
                     "no traceback": "Traceback" not in r.stderr, "nothing created or changed": before == after})
        log(f"{rows[-1]} {' '.join(r.stderr.split())[:200]}")
    rows += filesystem_faults(work, clean)
    return rows


def mount_tmpfs(mnt: Path, size_kb: int) -> bool:
    mnt.mkdir(exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)], capture_output=True).returncode == 0


def filesystem_faults(work: Path, clean: Path) -> list[dict]:
    """Disk full and read-only on a real tmpfs (root only)."""
    from diffstore.store import Store
    from diffstore.store.verify import verify_findings

    store_kb = sum(p.stat().st_size for p in clean.rglob("*") if p.is_file()) // 1024
    mnt, rows = work / "mnt", []
    if not mount_tmpfs(mnt, max(64, store_kb // 2)):  # half the store fits
        log("cannot mount a tmpfs (not root?): disk-full and read-only cases skipped")
        return []
    try:
        r = cli(*EXTRACT, "--store", str(mnt / "full.zarr"))
        findings = verify_findings(Store.open(str(mnt / "full.zarr"), "r"))[0] if (mnt / "full.zarr").exists() else []
        rows.append({"input": f"disk full ({max(64, store_kb // 2)} KB tmpfs, store {store_kb} KB)", "exit": r.returncode,
                     "message names it": "disk is full" in r.stderr, "no traceback": "Traceback" not in r.stderr,
                     "nothing created or changed": f"consistent: verify {sorted({f.kind for f in findings}) or 'ok'}"})
        log(f"{rows[-1]} {' '.join(r.stderr.split())[:200]}")
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
    if not mount_tmpfs(mnt, 4 * store_kb + 256):
        return rows
    try:
        shutil.copytree(clean, mnt / "ro.zarr")
        done_flag_cleared(mnt / "ro.zarr", X, 5)  # one shard to redo: extract must write
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        before = tree(mnt / "ro.zarr")
        r = cli(*EXTRACT, "--store", str(mnt / "ro.zarr"))
        rows.append({"input": "read-only file system", "exit": r.returncode, "message names it": "read-only" in r.stderr,
                     "no traceback": "Traceback" not in r.stderr, "nothing created or changed": tree(mnt / "ro.zarr") == before})
        log(f"{rows[-1]} {' '.join(r.stderr.split())[:200]}")
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
    return rows


def table(rows: list[dict]) -> str:
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--races", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["bad", "corrupt", "race", "kill"], action="append",
                    help="Run only these sections (repeatable; default: all).")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_faults_") as tmp:
        work = Path(tmp)
        clean = work / "clean.zarr"
        r = cli(*EXTRACT, "--store", str(clean))
        assert r.returncode == 0, r.stderr
        reference = hashes(clean)
        assert rerun(work / "warm.zarr") is None  # loads the model here, before any fork
        seconds = reference_run(work / "timed.zarr")
        log(f"reference: {len(reference)} arrays; a forked clean run takes {seconds:.1f} s")
        print(f"reference extraction: diffstore {' '.join(EXTRACT)}\n  -> {len(reference)} arrays x 23 shards; "
              f"a forked clean run takes {seconds:.1f} s\n")
        window = (0.0, seconds)
        sections = [("bad", lambda: bad_inputs(work, clean)), ("corrupt", lambda: corruptions(work, clean, reference)),
                    ("race", lambda: races(work, args.races, reference)),
                    ("kill", lambda: kills(work, args.kills, reference, window, random.Random(args.seed)))]
        for name, run in sections:
            if args.only and name not in args.only:
                continue
            try:
                rows = run()
            except Exception as e:  # noqa: BLE001 - report and go on with the other sections
                print(f"{name}: the benchmark itself failed: {type(e).__name__}: {e}\n", flush=True)
                continue
            print(summary(name, rows, window))
            print((table(rows) if rows else "(nothing run)") + "\n", flush=True)


def summary(name: str, rows: list[dict], window: tuple[float, float]) -> str:
    if name == "bad":
        ok = sum(r["exit"] != 0 and r["message names it"] and r["no traceback"] and r["nothing created or changed"]
                 is not False for r in rows)
        return (f"bad inputs: {ok}/{len(rows)} refused with a clear message, non-zero exit, no traceback, nothing "
                "created or changed (sha256 + mtime of every file before/after):")
    if name == "corrupt":
        ok = sum(r["caught by verify"] and r["refused by cka"] and r["repaired bit-identical"] for r in rows)
        return f"corruptions of shard 5 of {X}: {ok}/{len(rows)} caught by verify, refused by a reader, repaired bit-identical:"
    if name == "race":
        exits = [c for r in rows for c in r["exits"]]
        return (f"2 writers x same keys x {len(rows)}: {exits.count(0)}/{len(exits)} exits 0, "
                f"{sum(r['identical'] and r['verified'] for r in rows)}/{len(rows)} stores identical to the reference and verified:")
    good = sum(r["identical"] and r["verified"] for r in rows)
    return (f"kill -9 of a forked writer at {len(rows)} random instants (uniform in {window[0]:.1f}-{window[1]:.1f} s, "
            f"the length of a clean run), then a re-run: {good}/{len(rows)} resumed bit-identical and verified:")

if __name__ == "__main__":
    main()
