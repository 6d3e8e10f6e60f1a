"""Start-up cost of the CLI: what a user waits for before `diffstore` does anything.

Each command runs as a fresh process (as typed in a shell), best of --repeats (wall and CPU seconds: CPU time
is what load on a shared machine does not inflate), side by side in one run with
two references: the bare interpreter (`python -c pass`, the floor) and `python -c "import torch"` (what every
command paid before imports were lazy). `ls`, `info` and `verify` read a small store made here (one array).
Also prints which heavy modules each command imported (must be none for --help, ls, info, verify).

Also a no-op `diffstore extract` (everything requested already stored: answered from the identity cache, without
torch; goal <= 1.5 s) and `extract --dry-run`: of the same (answered the same way) and with t=50 added (it loads the
model to time one micro-batch), on a store of the shipped model made here.

Usage: python bench/bench_startup.py [--repeats 5] [--json]        targets: `--help` < 0.5 s, no-op extract <= 1.5 s
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "matplotlib", "sklearn", "diffusers", "distributed", "scipy")
PROBE = ("import sys, runpy; sys.argv = ['diffstore', *{argv!r}];\n"
         "try:\n    runpy.run_module('diffstore.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
         "print('HEAVY', [m for m in {heavy!r} if m in sys.modules], file=sys.stderr)")


def make_store(url: str) -> None:
    """One tiny feature array written through the store API (no model: this benchmark is about start-up)."""
    import numpy as np

    from diffstore.datasets import Split
    from diffstore.key import FeatureKey, Recipe
    from diffstore.store import Store

    store = Store.open(url, mode="a")
    split = Split("toy", "test", np.arange(64), np.zeros(64, dtype=np.int64), ["a"], {"kind": "synthetic"})
    store.put_split(split)
    key = FeatureKey("toy", "test", "m", "noised", 10, 1, "2")
    recipe = Recipe("m" * 64, split.ids_sha256(), 0, 1, "float32", "float16")
    attrs = {"key": key.to_dict(), "recipe": recipe.to_dict(),
             "block": {"index": 1, "name": "in", "module": "conv_in", "channels": 4, "height": 8, "width": 8}}
    arr = store.create(key.path, recipe.fingerprint(key), attrs, (4, 2, 2), 64, 64)
    arr.write_shard(0, np.zeros((64, 4, 2, 2), dtype=np.float32))


def best_time(cmd: list[str], repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the fastest of `repeats` runs. CPU time (user + sys of the child) barely moves
    with other jobs on the machine; wall time is what a user waits."""
    walls, cpus = [], []
    for _ in range(repeats):
        before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        walls.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if done.returncode not in (0, 1):
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return min(walls), min(cpus)


def heavy_imports(argv: list[str]) -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv, heavy=HEAVY)], capture_output=True, text=True)
    line = [ln for ln in done.stderr.splitlines() if ln.startswith("HEAVY")]
    return eval(line[-1][6:]) if line else ["?"]  # our own print of a list of names


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ds = str(Path(sys.executable).with_name("diffstore"))
    with tempfile.TemporaryDirectory() as tmp:
        url = f"{tmp}/s.zarr"
        make_store(url)
        os.environ["DIFFSTORE_CACHE"] = tmp  # this run's identity cache, inherited by every command below
        extract = [ds, "extract", "--store", f"{tmp}/d.zarr", "--t", "10", "--blocks", "mid", "--pools", "2",
                   "--limit", "64", "-q"]
        subprocess.run(extract, check=True, capture_output=True)  # the real run; what follows has nothing to do
        commands = {
            "python -c pass (floor)": ([sys.executable, "-c", "pass"], None),
            "python -c 'import torch'": ([sys.executable, "-c", "import torch"], None),
            "diffstore --help": ([ds, "--help"], ["--help"]),
            "diffstore --version": ([ds, "--version"], ["--version"]),
            "diffstore ls": ([ds, "ls", "--store", url], ["ls", "--store", url]),
            "diffstore info": ([ds, "info", "--store", url, "t=10"], ["info", "--store", url, "t=10"]),
            "diffstore verify": ([ds, "verify", "--store", url], ["verify", "--store", url]),
            "diffstore extract (no-op)": (extract, extract[1:]),
            "extract --dry-run, stored": ([*extract, "--dry-run"], [*extract[1:], "--dry-run"]),
            "extract --dry-run, t=50 new": ([*extract, "--t", "10,50", "--dry-run"], None),
        }
        rows = []
        for name, (cmd, argv) in commands.items():
            wall, cpu = best_time(cmd, args.repeats)
            rows.append({"command": name, "seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
                         "heavy_imports": heavy_imports(argv) if argv else None})
    torch_s = rows[1]["seconds"]
    for r in rows:
        r["vs_import_torch"] = round(r["seconds"] / torch_s, 2)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"best of {args.repeats} fresh processes each (machine load: {open('/proc/loadavg').read().split()[0]})")
    print(f"{'command':28s} {'wall s':>8s} {'CPU s':>7s} {'wall / import torch':>20s}  heavy modules imported")
    for r in rows:
        heavy = "-" if r["heavy_imports"] is None else (", ".join(r["heavy_imports"]) or "none")
        print(f"{r['command']:28s} {r['seconds']:8.3f} {r['cpu_seconds']:7.3f} {r['vs_import_torch']:20.2f}  {heavy}")
    help_s, help_cpu = rows[2]["seconds"], rows[2]["cpu_seconds"]
    print(f"\ndiffstore --help: {help_s:.3f} s wall, {help_cpu:.3f} s CPU "
          f"({'meets' if help_s < 0.5 else 'misses'} the 0.5 s target in wall time on this run)")
    noop = next(r for r in rows if r["command"] == "diffstore extract (no-op)")
    print(f"no-op extract: {noop['seconds']:.3f} s wall, {noop['cpu_seconds']:.3f} s CPU "
          f"({'meets' if noop['seconds'] <= 1.5 else 'misses'} the 1.5 s goal in wall time on this run), "
          f"{noop['vs_import_torch']:.2f}x the time of importing torch alone")


if __name__ == "__main__":
    main()
