"""Faults the store survives (issue 12), measured on the shipped model and the digits test split.

The CLI runs in this process (diffstore.cli.main with its argv: the same code, exit code and stderr, without paying
the torch start-up per call); killed or racing writers are `diffstore extract` processes (real processes, real
kill -9; started fresh, since torch's thread pools do not survive a fork).

    python bench/bench_faults.py [--kills 20] [--races 5] [--seed 0] [--only bad|corrupt|race|kill ...]

Prints, against a clean reference run of the same extraction (4 arrays x 23 shards):
- kill -9 at random instants of `diffstore extract` while it writes (uniform over the time from the store's
  creation to the exit of a clean run), then a re-run: how many resumed bit-identical and verified;
- 2 writers at once on the same keys, repeated: exit codes and identity with the reference;
- each corruption (flipped byte, truncated shard, deleted shard with done=1, done flag cleared, unreadable
  zarr.json, wrong shape in zarr.json): caught by `verify`, refused by a reader (`cka`), restored by `repair`;
- every bad input: exit code, message, no traceback, nothing created or changed (sha256 + mtime of every file):
  issue 12's, then issue 21's hostile table (tests/hostile.py: every bad input its audit's row 8 names and more,
  crafted attributes, symbolic links inside a store);
- disk full and read-only file system on a real tmpfs (needs root to mount; skipped otherwise).
Progress goes to stderr; the figures to stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # test-only fault injection
from hostile import Bed, Case, attempt, bad_inputs, cli, crafted, image_folder  # noqa: E402

from conftest import tree_state  # noqa: E402
from faults import CORRUPTIONS, done_flag_cleared  # noqa: E402

EXTRACT = ["extract", "--split", "test", "--t", "10", "--blocks", "2,mid", "--pools", "1,2", "--shard-rows", "16",
           "--batch-size", "16", "-q"]
X = "features/digits/test/digits-ddpm/noised/t10/b2/p1"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def writer(url: Path) -> subprocess.Popen:
    """`diffstore extract` on `url` in its own process: what a user (or a colleague's machine) runs."""
    main = "import sys; from diffstore.cli import main; sys.argv[0] = 'diffstore'; main()"
    return subprocess.Popen([sys.executable, "-c", main, *EXTRACT, "--store", str(url)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def created(url: Path, proc: subprocess.Popen) -> float:
    """Wait until the writer has created the store (or exited); the time it took."""
    t0 = time.perf_counter()
    while not (url / "zarr.json").exists() and proc.poll() is None:
        time.sleep(0.005)
    return time.perf_counter() - t0


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
    """A clean writer process: seconds from the store's creation to its exit."""
    proc = writer(url)
    created(url, proc)
    t0 = time.perf_counter()
    assert proc.wait() == 0
    return time.perf_counter() - t0


def rerun(url: Path) -> str | None:
    """The extraction again, in this process (what the CLI runs, without paying its start-up 20 times)."""
    from diffstore.datasets import load_split
    from diffstore.errors import DiffstoreError
    from diffstore.extract import extract_features, plan_extraction
    from diffstore.models import load_model
    from diffstore.store import Store

    global MODEL
    MODEL = MODEL or load_model("default")  # loaded once for every re-run
    try:
        plan = plan_extraction(Store.open(str(url)), MODEL, load_split("digits", "test"), t="10", blocks="2,mid",
                               pools="1,2", shard_rows=16)
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
        proc = writer(url)
        created(url, proc)
        time.sleep(at)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
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
        procs = [writer(url) for _ in range(2)]
        rows.append({"exits": [p.wait() for p in procs], "identical": hashes(url) == reference,
                     "verified": verified(url)})
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
        fixes = ("diffstore repair", "diffstore extract")  # (extract completes an incomplete array)
        refused = reader.returncode == 2 and X in reader.stderr and any(f in reader.stderr for f in fixes) \
            and "Traceback" not in reader.stderr
        fix = cli("repair", "--store", str(url), "-q")  # the shipped model wrote it: the default --model
        restored = fix.returncode == 0 and hashes(url) == reference and verified(url)
        rows.append({"corruption": corrupt.__name__, "caught by verify": caught, "refused by cka": refused,
                     "repaired bit-identical": restored})
        log(f"{rows[-1]}" + ("" if refused else f" cka: {reader.returncode} {reader.stderr[-300:]}")
            + ("" if restored else f" repair: {fix.stderr[-300:]}"))
        shutil.rmtree(url, ignore_errors=True)
    return rows


def bad_inputs_table(work: Path, clean: Path) -> list[dict]:
    """Issue 12's bad inputs on a copy of the reference store, then issue 21's hostile table (tests/hostile.py: every
    bad input of its audit's row 8, crafted attributes and symbolic links), then the file-system faults; one row each,
    `clean` when it was refused (or, where a command may go on, warned about) as it must be."""
    existing = work / "existing.zarr"
    shutil.copytree(clean, existing)
    new = str(work / "new.zarr")
    folder = image_folder(work / "images", good=4, bad=1, kind="jpg")
    no_aws = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {
        "AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_CONFIG_FILE": "/nonexistent"}

    def c(name, args, env, needle):
        return Case(name, lambda: cli(*args, env=env), needle)

    cases = [
        c("--batch-size 0 (new store)", [*EXTRACT, "--store", new, "--batch-size", "0"], None, "batch"),
        c("--batch-size -5 (new store)", [*EXTRACT, "--store", new, "--batch-size", "-5"], None, "batch"),
        c("--shard-rows -16 (new store)", [*EXTRACT, "--store", new, "--shard-rows", "-16"], None, "shard-rows"),
        c("--shard-rows 7 (new store)", [*EXTRACT, "--store", new, "--shard-rows", "7"], None, "shard-rows"),
        c("--t abc (new store)", [*EXTRACT, "--store", new, "--t", "abc"], None, "--t"),
        c("corrupt JPEG (new store)", ["extract", "--store", new, "--dataset", "imagefolder", "--data-root", folder,
                                       "--split", "test", "--t", "10", "--blocks", "2", "--pools", "1", "-q"], None,
          "bad4.jpg"),
        c("s3:// without credentials", ["ls", "--store", "s3://bucket/x.zarr"], no_aws, "no credentials"),
        c("--shard-rows 7 (existing key)", [*EXTRACT, "--store", existing, "--shard-rows", "7"], None, "shard-rows"),
        c("--shard-rows 32 (existing key)", [*EXTRACT, "--store", existing, "--shard-rows", "32"], None,
          "16 rows per shard"),
        c("--batch-size 0 (existing store)", [*EXTRACT, "--store", existing, "--batch-size", "0"], None, "batch"),
        c("--noise-seed 1 (other fingerprint)", [*EXTRACT, "--store", existing, "--noise-seed", "1"], None,
          "noise_seed"),
        c("info t=nope", ["info", "--store", existing, "t=nope"], None, "t takes an integer"),
        c("rm without --yes (not a TTY)", ["rm", "--store", existing, "b=2"], None, "--yes"),
    ]
    bed = Bed.build(work / "hostile")  # a small store (train and test) of its own, and the files its cases misuse
    rows = []
    hostile = [(case, bed.work) for case in bad_inputs(bed) + crafted(bed)]
    for case, watch in [(case, work) for case in cases] + hostile:
        rows.append(attempt(case, watch))
        log(f"{rows[-1]}")
    rows += filesystem_faults(work, clean)
    return rows


def mount_tmpfs(mnt: Path, size_kb: int) -> bool:
    mnt.mkdir(exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)], capture_output=True)
    return done.returncode == 0


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
        rows.append(fault_row(f"disk full ({max(64, store_kb // 2)} KB tmpfs, store {store_kb} KB)", r, "disk is full",
                              f"consistent: verify {sorted({f.kind for f in findings}) or 'ok'}"))
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
    if not mount_tmpfs(mnt, 4 * store_kb + 256):
        return rows
    try:
        shutil.copytree(clean, mnt / "ro.zarr")
        done_flag_cleared(mnt / "ro.zarr", X, 5)  # one shard to redo: extract must write
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        before = tree_state(mnt / "ro.zarr")
        r = cli(*EXTRACT, "--store", str(mnt / "ro.zarr"))
        rows.append(fault_row("read-only file system", r, "read-only", tree_state(mnt / "ro.zarr") == before))
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
    return rows


def fault_row(name: str, r, needle: str, unchanged) -> dict:
    """A file-system fault's row, as hostile.attempt makes them (`unchanged`: True, False or what verify says)."""
    row = {"input": name, "exit": r.returncode, "message names it": needle in r.stderr,
           "no traceback": "Traceback" not in r.stderr, "nothing created or changed": unchanged, "seconds": "-"}
    row["clean"] = r.returncode != 0 and row["message names it"] and row["no traceback"] and unchanged is not False
    log(f"{row} {' '.join(r.stderr.split())[:200]}")
    return row


def table(rows: list[dict]) -> str:
    cols = [c for c in rows[0] if c != "message"]  # (the messages are in the log, on stderr)
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
        writers = not args.only or {"race", "kill"} & set(args.only)
        if writers:  # (the in-process sections need no writer process, nor its timing)
            seconds = reference_run(work / "timed.zarr")
        timing = f"; a clean writer process writes for {seconds:.1f} s" if writers else ""
        log(f"reference: {len(reference)} arrays{timing}")
        print(f"reference extraction: diffstore {' '.join(EXTRACT)}\n  -> {len(reference)} arrays x 23 shards"
              f"{timing}\n")
        window = (0.0, seconds if writers else 0.0)
        sections = [("bad", lambda: bad_inputs_table(work, clean)),
                    ("corrupt", lambda: corruptions(work, clean, reference)),
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
        return (f"bad inputs: {sum(r['clean'] for r in rows)}/{len(rows)} clean: refused with a message naming the "
                "problem (or, for ls with one array broken, a warning), the expected exit code, no traceback, nothing "
                "created or changed (sha256 + mtime of every file before/after) and nothing outside a store touched:")
    if name == "corrupt":
        ok = sum(r["caught by verify"] and r["refused by cka"] and r["repaired bit-identical"] for r in rows)
        return (f"corruptions of shard 5 of {X}: {ok}/{len(rows)} caught by verify, refused by a reader, "
                "repaired bit-identical:")
    if name == "race":
        exits = [c for r in rows for c in r["exits"]]
        return (f"2 writers x same keys x {len(rows)}: {exits.count(0)}/{len(exits)} exits 0, "
                f"{sum(r['identical'] and r['verified'] for r in rows)}/{len(rows)} stores identical to "
                "the reference and verified:")
    good = sum(r["identical"] and r["verified"] for r in rows)
    return (f"kill -9 of a writer process at {len(rows)} random instants (uniform in {window[0]:.1f}-{window[1]:.1f} s "
            "after it created the store: a clean run's writing time), then a re-run: "
            f"{good}/{len(rows)} resumed bit-identical and verified:")

if __name__ == "__main__":
    main()
