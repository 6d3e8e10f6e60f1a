"""A store a team grows together (issue 22), measured against a moto S3 server started on 127.0.0.1.

    python bench/bench_team.py [--store /tmp/tc.zarr] [--kills 10] [--repeats 3] [--arrays 1000]
                               [--baseline 5d5a2d8] [--only a b c d e]

(a) `extract --limit 256`, then the same extraction without a limit, on one store (fresh processes): the shards the
    second run computes (of the total), and every data object (chunks, done flags, split ids and labels: all but the
    zarr.json metadata, which holds each run's provenance) equal to a fresh full run's.
(b) two `extract` processes at once on one store, `--rows 0:N/2` and `--rows N/2:N` of each split: exit codes, and
    every data object equal to the full run's.
(e) `extract --dry-run --json` on an empty store vs the real extraction: its bytes vs the data objects written, its
    estimated seconds vs the extraction's own time (in this process, the model loaded before the clock starts).
    (a), (b) and (e) extract the shipped model on digits at --t 10 --blocks 2,mid --pools 1,2 (4 arrays per split).
(c) `diffstore copy` of a default store (built with `diffstore extract --store STORE` when absent) to the S3 server
    and back: both copies bit-identical to the source (sha256 of every object); kill -9 at random instants of the
    copy, then a re-run: bit-identical each time; throughput of `copy` vs a raw fsspec copy of the same objects
    (s3fs put / get of the file list, its own concurrency), each timed in a fresh process without its imports,
    best of --repeats, side by side.
(d) `diffstore ls` (and `ls` with a selector, `du`) of a store of --arrays arrays on the S3 server, in fresh processes:
    this checkout vs the --baseline commit's ls (one sequential read per array), exported with `git archive`.
Progress goes to stderr; the figures to stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(tempfile.gettempdir()) / "bench-team"
TIMED_COPY = ("import sys, time\nfrom diffstore.store.copy import copy\nt = time.perf_counter()\n"
              "copy(sys.argv[1], sys.argv[2], show_progress=False)\nprint(time.perf_counter() - t)\n")
RAW_LS = """
import sys, fsspec
s3 = fsspec.filesystem("s3")
keys = s3.find(sys.argv[1] + "/features")
groups = [k for k in keys if k.count("/") == 10 and k.endswith("/zarr.json")]  # bench/many.zarr/features/d/s/m/i/t/b/p
s3.cat(groups + [k for k in keys if k.endswith(("/x/zarr.json", "/done/zarr.json"))])
"""
TIMED_RAW = """
import sys, time
from pathlib import Path
import fsspec
src, dst = sys.argv[1], sys.argv[2]
s3 = fsspec.filesystem("s3")
t = time.perf_counter()
if src.startswith("s3://"):  # every object of the store, listed and fetched by s3fs
    base = src.removeprefix("s3://")
    keys = s3.find(base)
    s3.get(keys, [f"{dst}/{k.removeprefix(base + '/')}" for k in keys])
else:
    files = [p for p in Path(src).rglob("*") if p.is_file()]
    s3.put([str(p) for p in files], [f"{dst}/{p.relative_to(src)}" for p in files])
print(time.perf_counter() - t)
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(env: dict) -> subprocess.Popen:
    """moto's S3 server in its own process (so its CPU is not shared with the timed client), bucket 'bench'."""
    port = int(env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
    return server


def python(code: str, *args, env: dict, pythonpath: Path = ROOT, timeout: float = 1800) -> str:
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], env={**env, "PYTHONPATH": str(pythonpath)},
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{code[:60]!r} {args} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def diffstore(*args, env: dict, pythonpath: Path = ROOT, timeout: float = 1800) -> tuple[float, str]:
    """(wall seconds, stdout) of `diffstore ARGS` in a fresh process with `pythonpath`'s code."""
    t0 = time.perf_counter()
    out = python("from diffstore.cli import main\nmain()", *args, env=env, pythonpath=pythonpath, timeout=timeout)
    return time.perf_counter() - t0, out


def local_objects(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file() and not p.name.endswith(".partial")}


def s3_objects(url: str) -> dict:
    import fsspec

    s3 = fsspec.filesystem("s3", skip_instance_cache=True)
    base = url.removeprefix("s3://")
    blobs = s3.cat(s3.find(base))
    return {k.removeprefix(base + "/"): hashlib.sha256(v).hexdigest() for k, v in blobs.items()}


KEYS = ("--t", "10", "--blocks", "2,mid", "--pools", "1,2", "-q")


def data_objects(root: Path) -> dict:
    """Every object but the metadata documents (zarr.json: each run's provenance and times differ)."""
    return {k: v for k, v in local_objects(root).items() if not k.endswith("zarr.json")}


def part_a(env: dict) -> list[str]:
    small, full = WORK / "grown.zarr", WORK / "full.zarr"
    for old in (small, full):
        shutil.rmtree(old, ignore_errors=True)
    t_full, _ = diffstore("extract", "--store", full, *KEYS, env=env)
    t_small, _ = diffstore("extract", "--store", small, "--limit", 256, *KEYS, env=env)
    t_grow, out = diffstore("extract", "--store", small, *KEYS, "--json", env=env)
    rows = json.loads(out)
    run, total = sum(r["shards_run"] for r in rows), sum(r["shards_total"] for r in rows)
    same = data_objects(small) == data_objects(full)
    log(f"(a) limit 256 then full: {run}/{total} shards computed by the second run, identical to a full run: {same}")
    return [f"(a) `extract --limit 256` ({t_small:.1f} s), then the full extraction on the same store ({t_grow:.1f} s, "
            f"exit 0): it computed {run} of {total} shards (the rest held the first 256 rows); every data object "
            f"{'equal to' if same else 'DIFFERS from'} a fresh full run's ({len(data_objects(full))} objects; the full "
            f"run took {t_full:.1f} s)"]


def part_b(env: dict) -> list[str]:
    from diffstore.datasets import load_split

    halves = WORK / "halves.zarr"
    shutil.rmtree(halves, ignore_errors=True)
    sizes = {s: len(load_split("digits", s)) for s in ("train", "test")}
    ranges = [",".join(f"{s}={a}:{b}" for s, (a, b) in zip(sizes, spans)) for spans in
              ([(0, n // 2) for n in sizes.values()], [(n // 2, n) for n in sizes.values()])]
    main = "from diffstore.cli import main\nmain()"
    procs = [subprocess.Popen([sys.executable, "-c", main, "extract", "--store", str(halves), "--rows", r, *KEYS],
                              env={**env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for r in ranges]
    exits = [p.wait() for p in procs]
    same = data_objects(halves) == data_objects(WORK / "full.zarr")
    log(f"(b) --rows halves at once: exits {exits}, identical to a full run: {same}")
    return [f"(b) two processes at once, `--rows {ranges[0]}` and `--rows {ranges[1]}`: exits {exits}; the store "
            f"they filled together {'equals' if same else 'DIFFERS from'} a full run's, object for object"]


def part_e(env: dict) -> list[str]:
    from diffstore.datasets import load_split
    from diffstore.extract import extract_features, plan_extraction
    from diffstore.models import load_model
    from diffstore.store import Store

    fresh = WORK / "estimated.zarr"
    shutil.rmtree(fresh, ignore_errors=True)
    _, out = diffstore("extract", "--store", fresh, "--dry-run", "--json", *KEYS, env=env)
    plans = json.loads(out)
    assert not fresh.exists(), "--dry-run wrote the store"
    model, seconds = load_model("default"), 0.0
    for split in ("train", "test"):
        plan = plan_extraction(Store.open(str(fresh)), model, load_split("digits", split), t=[10], blocks=["2", "mid"],
                               pools=["1", "2"])
        t0 = time.perf_counter()
        extract_features(plan, show_progress=False)
        seconds += time.perf_counter() - t0
    chunks = sum(p.stat().st_size for p in fresh.rglob("*") if p.is_file() and "/x/c/" in str(p))
    guess_bytes, guess_s = sum(p["bytes"] for p in plans), sum(p["seconds"] for p in plans)
    log(f"(e) dry-run {guess_bytes} B / {guess_s:.1f} s vs {chunks} B / {seconds:.1f} s")
    return [f"(e) `--dry-run`: {guess_bytes / 1e6:.2f} MB and {guess_s:.1f} s estimated; the extraction wrote "
            f"{chunks / 1e6:.2f} MB of feature chunks (estimate / real {guess_bytes / chunks:.2f}; goal within 10%) "
            f"in {seconds:.1f} s (estimate / real {guess_s / seconds:.2f}; goal within 2x)"]


def part_c(store: Path, env: dict, kills: int, repeats: int, rng: random.Random) -> list[str]:
    want = local_objects(store)
    nbytes = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    log(f"(c) {store}: {len(want)} objects, {nbytes / 1e6:.1f} MB")
    times = {k: [] for k in ("copy up", "raw up", "copy down", "raw down")}
    for r in range(repeats):  # alternated, so both see the same machine load
        times["copy up"].append(float(python(TIMED_COPY, store, f"s3://bench/up{r}.zarr", env=env)))
        times["raw up"].append(float(python(TIMED_RAW, store, f"s3://bench/raw{r}.zarr", env=env)))
        times["copy down"].append(float(python(TIMED_COPY, f"s3://bench/up{r}.zarr", WORK / f"down{r}.zarr", env=env)))
        times["raw down"].append(float(python(TIMED_RAW, f"s3://bench/raw{r}.zarr", WORK / f"rawdown{r}.zarr",
                                              env=env)))
        log(f"(c) repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    up_same = s3_objects("s3://bench/up0.zarr") == want
    down_same = all(local_objects(WORK / f"down{r}.zarr") == want for r in range(repeats))
    wall, _ = diffstore("copy", store, "s3://bench/cli.zarr", "-q", env=env)
    best = {k: min(v) for k, v in times.items()}
    lines = [f"(c) copy of {store} ({len(want)} objects, {nbytes / 1e6:.1f} MB) to moto S3 and back, "
             f"best of {repeats}:",
             f"    {'direction':<10} {'diffstore copy':>16} {'raw fsspec':>16} {'ratio (raw time / copy time)':>30}"]
    for d in ("up", "down"):
        c, r = best[f"copy {d}"], best[f"raw {d}"]
        lines.append(f"    {d:<10} {c:>8.2f}s {nbytes / 1e6 / c:>5.1f}MB/s {r:>8.2f}s {nbytes / 1e6 / r:>5.1f}MB/s "
                     f"{r / c:>30.2f}")
    lines.append(f"    bit-identical: local -> S3 {up_same}, S3 -> local {down_same} ({repeats}/{repeats} runs); "
                 f"`diffstore copy` CLI wall time (with start-up) {wall:.2f}s")
    survived, landed = 0, 0
    for k in range(kills):
        target = f"s3://bench/kill{k}.zarr"
        at = rng.uniform(0.1, 0.9) * wall
        proc = subprocess.Popen([sys.executable, "-c", "from diffstore.cli import main\nmain()", "copy", str(store),
                                 target, "-q"], env={**env, "PYTHONPATH": str(ROOT)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(at)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        held = len(s3_objects(target)) if proc.returncode == -signal.SIGKILL else len(want)
        landed += 0 < held < len(want)
        diffstore("copy", store, target, "-q", env=env)
        same = s3_objects(target) == want
        survived += same
        log(f"(c) kill {k + 1}/{kills} at {at:.2f}s: {held}/{len(want)} objects in DST at the kill; "
            f"re-run identical: {same}")
    lines.append(f"    kill -9 at {kills} random instants of the copy ({landed} with DST partly written), re-run: "
                 f"{survived}/{kills} bit-identical")
    return lines


def many_arrays(n: int) -> Path:
    """A local store of n small feature arrays (10 models x t x blocks, 40 rows in 3 shards), built once."""
    path = WORK / f"many{n}.zarr"
    if path.exists():
        return path
    import numpy as np

    from diffstore.key import FeatureKey, Recipe
    from diffstore.store import Store

    store, rows = Store.open(str(path)), np.ones((40, 4, 1, 1), dtype=np.float16)
    for i in range(n):
        key = FeatureKey("digits", "test", f"m{i % 10}", "noised", 10 * (i // 10 % 10 + 1), i // 100 + 1, "1")
        recipe = Recipe("mfp", "dfp", 0, 1, "float32", "float16")
        attrs = {"key": key.to_dict(), "recipe": recipe.to_dict(), "block": {"name": f"block{key.block}"}}
        array = store.create(key.path, recipe.fingerprint(key), attrs, (4, 1, 1), 40, 16)
        for s in range(array.n_shards):
            array.write_shard(s, rows[array.shard_slice(s)])
    return path


def part_d(n: int, env: dict, baseline: str) -> list[str]:
    local = many_arrays(n)
    import fsspec

    files = [p for p in local.rglob("*") if p.is_file()]
    fsspec.filesystem("s3").put([str(p) for p in files], [f"bench/many.zarr/{p.relative_to(local)}" for p in files])
    old = WORK / f"baseline-{baseline}"
    if not old.exists():
        old.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", baseline, "diffstore"], capture_output=True,
                                 check=True)
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    url = "s3://bench/many.zarr"
    lines = [f"(d) a store of {n} arrays ({len(files)} objects) on moto S3, fresh processes (start-up included):",
             f"    {'command':<24} {'this checkout':>14} {f'baseline {baseline}':>18} {'speed-up':>9}"]
    t0 = time.perf_counter()
    python(RAW_LS, "bench/many.zarr", env=env)
    floor = time.perf_counter() - t0
    lines.append(f"    {'raw fsspec (floor)':<24} {floor:>13.1f}s {'':>28}  (a fresh process: the listing, then the "
                 f"{3 * n} zarr.json ls reads, by s3fs's concurrent cat)")
    for args in (["ls", "--json"], ["ls", "t=10", "--json"], ["du", "--json"]):
        now, out = diffstore(*args, "--store", url, env=env)
        count, before, speedup = len(json.loads(out)), "-", "-"
        if args == ["ls", "--json"]:  # the baseline's ls takes no selector, and it has no du
            then, out_then = diffstore(*args, "--store", url, env=env, pythonpath=old, timeout=3600)
            assert len(json.loads(out_then)) == count
            before, speedup = f"{then:.1f}s", f"{then / now:.1f}x"
        lines.append(f"    {' '.join(args[:-1]) + f' ({count} rows)':<24} {now:>13.1f}s {before:>18} {speedup:>9}")
        log(lines[-1])
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="/tmp/tc.zarr", help="Default store to copy (extracted when absent).")
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--arrays", type=int, default=1000)
    ap.add_argument("--baseline", default="5d5a2d8", help="Commit whose ls is timed beside this checkout's.")
    ap.add_argument("--only", nargs="*", default=["a", "b", "c", "d", "e"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    WORK.mkdir(exist_ok=True)
    for old in WORK.glob("*down*.zarr"):
        shutil.rmtree(old)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    os.environ.update(env)
    store = Path(args.store)
    if "c" in args.only and not store.exists():
        log(f"extracting the default store into {store} (minutes)")
        diffstore("extract", "--store", store, "-q", env=env)
    lines = []
    for name, part in (("a", part_a), ("b", part_b), ("e", part_e)):
        if name in args.only:
            lines += part(env)
    server = start_moto(env)
    try:
        if "c" in args.only:
            lines += part_c(store, env, args.kills, args.repeats, random.Random(args.seed))
        if "d" in args.only:
            lines += part_d(args.arrays, env, args.baseline)
    finally:
        server.terminate()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
