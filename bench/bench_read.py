"""Checked reads against a raw .npy memmap copy of the same float16 bytes; the codec table; reads from S3.

(1) codecs  the float16 arrays of each --codec-stores store (every k-th in path order, ~256 MB at most; --quick:
            32 MB; default: synthetic activations, said so) re-stored with each codec in their own layout
            (Store.create): stored/raw bytes, the codec's decode speed alone (one thread, every chunk decoded into a
            buffer), and the checked read (one thread).
(2) local   keys of 5 MB, 100 MB and 1 GB (--quick: 5 and 100 MB) at the layouts extract writes (shard rows as
            plan.default_shard_rows gives them for one key on CPU), holding synthetic activations (SiLU of scaled,
            shifted Gaussians) in float16 or, with --values-from STORE, the float16 values of STORE's arrays (path
            order, repeated), warm page cache: for each codec x decode threads, the checked read into
            float16 and into float32, each interleaved with a raw .npy memmap copy of the same bytes (best of
            --repeats). "before": the read as it was (zarr's x[:] of the zstd-1 array, then numpy's NaN check);
            "open+read": Store.open + open_array + read, what `ds.open(url).features(...).numpy()` pays.
            Goals: checked read >= 0.5 of the memmap copy at >= 100 MB, >= 0.25 at 5 MB; where one is missed, the
            decode speed of the codec alone and the crc32c's are printed: what bounds it.
(3) s3      a 100 MB key (--quick: 20 MB) on a moto server in its own process: the checked read vs a raw concurrent
            fsspec `cat` of the same shard objects (no decode, no check), interleaved, best of --repeats, per number
            of GETs in flight. Goal >= 0.8.

Usage: python bench/bench_read.py [--quick] [--sections codecs,local,s3] [--codec-stores NAME=PATH,...]
       [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import crc32c
import numpy as np
from rich.console import Console
from rich.table import Table
from timing import best_of

from diffstore.extract.plan import default_shard_rows
from diffstore.progress import stderr
from diffstore.store import Store, reader
from diffstore.store.codec import CODECS, DEFAULT, LEGACY

KEYS = {"5 MB": (10000, (64, 2, 2)), "100 MB": (12800, (256, 4, 4)), "1 GB": (16384, (512, 8, 8))}
QUICK_KEYS = ("5 MB", "100 MB")
GOALS = {"5 MB": 0.25, "100 MB": 0.5, "1 GB": 0.5}
PATH = "features/bench/test/m/noised/t1/b1/p2"
MICRO_BATCH = 16  # extract's CPU micro-batch


def activations(rng: np.random.Generator, n: int, row_shape: tuple) -> np.ndarray:
    """Synthetic U-Net activations: SiLU of per-channel scaled and shifted Gaussians, float16."""
    c = row_shape[0]
    scale = rng.lognormal(0, 0.5, (c, *[1] * (len(row_shape) - 1))).astype(np.float32)
    shift = rng.normal(0, 0.5, scale.shape).astype(np.float32)
    z = rng.standard_normal((n, *row_shape), dtype=np.float32) * scale + shift
    return (z / (1 + np.exp(-z))).astype(np.float16)


def store_rows(url: Path, rows_of, n: int, row_shape: tuple, shard_rows: int, codec: str):
    """An array at PATH of a new store holding rows_of(slice) shard by shard, with `codec`."""
    a = Store.open(str(url)).create(PATH, "bench", {}, row_shape, n, shard_rows, codec=codec)
    for i in range(a.n_shards):
        a.write_shard(i, rows_of(a.shard_slice(i)))
    return Store.open(str(url), "r").open_array(PATH)


def payloads(a) -> list[np.ndarray]:
    """Every chunk's payload (its bytes without the crc32c) of a local array, as the reader finds them."""
    rd, out = a.reader(), []
    for i in range(a.n_shards):
        raw = np.fromfile(os.path.join(rd.local, rd.key(i)), np.uint8)
        index = rd.index_of(raw[len(raw) - rd.layout.index_nbytes:].tobytes())
        out += [raw[o:o + n - 4] for o, n in index.tolist() if o != reader.EMPTY]
    return out


def parts_alone(a, repeats: int) -> dict:
    """Seconds of each part of a checked read of `a`, each alone on one thread: reading its shard files into a
    buffer, decoding every chunk into a buffer (the codec alone), crc32c of the chunks, the NaN check."""
    chunks, rd = payloads(a), a.reader()
    lay, files = rd.layout, [os.path.join(rd.local, rd.key(i)) for i in range(a.n_shards)]
    dst, buf = np.empty(lay.chunk_shape, lay.dtype), np.empty(max(os.path.getsize(f) for f in files), np.uint8)
    decode = lay.decode or (lambda src, d: d.reshape(-1).view(np.uint8).__setitem__(slice(None), src))

    def read_files():
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                fh.readinto(buf)

    def nan_checks():
        for c in chunks:
            decode(c, dst)
            reader.has_nan(dst)

    decode_s = best_of(lambda: [decode(c, dst) for c in chunks], repeats)
    return {"files": best_of(read_files, repeats), "decode": decode_s,
            "crc32c": best_of(lambda: [crc32c.crc32c(c) for c in chunks], repeats),
            "nan": max(best_of(nan_checks, repeats) - decode_s, 1e-9)}


def interleaved(runs: dict, repeats: int) -> dict:
    """Best seconds of each run, the runs taking turns (so load from other processes hits them alike)."""
    for fn in runs.values():
        fn()  # warm: page cache, pools, torch
    best = {k: float("inf") for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def old_read(a) -> np.ndarray:
    """ShardedArray.read before this change: zarr's own read of the rows, then numpy's NaN check per row."""
    a._check_done(np.arange(a.n_shards))
    data = a.x[:]
    if np.isnan(data.reshape(len(data), -1)).any(axis=1).any():
        raise AssertionError("NaN rows")
    return data


# --- (1) codecs ---------------------------------------------------------------------------------------------
def codec_sources(spec: str | None, quick: bool) -> dict[str, list]:
    """{source name: [(array name, float16 rows, shard_rows)]} from stores, or one synthetic source."""
    if not spec:
        n, shape = KEYS["5 MB"]
        x = activations(np.random.default_rng(0), n, shape)
        return {"synthetic SiLU activations": [("[10000, 64, 2, 2]", x, default_shard_rows(x[0].size * 4, 16))]}
    out = {}
    for item in spec.split(","):
        name, path = item.split("=", 1)
        out[name] = [(a.path, a.read(), a.shard_rows) for a in float16_arrays(path, (32 if quick else 256) << 20)]
    return out


def float16_arrays(path: str, cap: int) -> list:
    """The complete float16 arrays of a store, a seeded random subset of at most `cap` bytes (all when they fit)."""
    arrays = [a for a in Store.open(path, "r").arrays() if a.dtype == np.float16 and a.complete]
    chosen, total = [], 0
    for k in np.random.default_rng(0).permutation(len(arrays)):
        if total + arrays[k].x.nbytes <= cap:
            chosen.append(arrays[k])
            total += arrays[k].x.nbytes
    return sorted(chosen, key=lambda a: a.path)


class Values:
    """Float16 rows for the read keys: synthetic activations, or the values of a store's arrays (`float16_arrays`,
    flattened in path order, repeated as needed)."""

    def __init__(self, store: str | None):
        self.rng, self.at = np.random.default_rng(0), 0
        self.pool = None if store is None else np.concatenate([a.read().reshape(-1)
                                                               for a in float16_arrays(store, 256 << 20)])

    def __call__(self, n: int, shape: tuple) -> np.ndarray:
        if self.pool is None:
            return activations(self.rng, n, shape)
        take = (self.at + np.arange(n * int(np.prod(shape)))) % len(self.pool)
        self.at += len(take)
        return self.pool[take].reshape(n, *shape)


def bench_codecs(root: Path, sources: dict, codecs: list[str], repeats: int) -> list[dict]:
    rows = []
    for n_source, (source, arrays) in enumerate(sources.items()):
        raw = sum(x.nbytes for _, x, _ in arrays)
        stderr.print(f"(1) codecs on {source}: {len(arrays)} arrays, {raw / 1e6:.1f} MB")
        for codec in codecs:
            stored = dec = crc = read1 = 0.0
            for k, (_, x, shard_rows) in enumerate(arrays):
                url = root / f"codec-{n_source}-{codec}-{k}.zarr"
                a = store_rows(url, lambda sl: x[sl], len(x), x.shape[1:], shard_rows, codec)
                assert np.array_equal(a.read().view(np.uint16), x.view(np.uint16))
                stored += a.nbytes_stored()
                parts = parts_alone(a, repeats)
                reader.set_concurrency(threads=1)
                read1 += best_of(a.read, repeats)
                reader.set_concurrency(threads=reader.DEFAULT_THREADS)
                dec, crc = dec + parts["decode"], crc + parts["crc32c"]
                shutil.rmtree(url)
            rows.append({"source": source, "codec": codec, "MB": raw / 1e6, "stored_over_raw": stored / raw,
                         "decode_MB_s": raw / dec / 1e6, "crc32c_MB_s": raw / crc / 1e6,
                         "checked_read_1_thread_MB_s": raw / read1 / 1e6})
    return rows


# --- (2) local reads ----------------------------------------------------------------------------------------
def bench_local(root: Path, keys: list[str], codecs: list[str], threads: list[int], repeats: int,
                values: Values) -> list[dict]:
    rows = []
    for key in keys:
        n, shape = KEYS[key]
        shard_rows = default_shard_rows(int(np.prod(shape)) * 4, MICRO_BATCH)
        npy = root / f"{key.replace(' ', '')}.npy"
        mm = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float16, shape=(n, *shape))
        for s in range(0, n, shard_rows):
            mm[s:s + shard_rows] = values(min(shard_rows, n - s), shape)
        mm.flush()
        del mm
        nbytes = npy.stat().st_size
        copy = lambda: np.array(np.load(npy, mmap_mode="r"))  # noqa: E731 - the limit: no decode, no check
        stderr.print(f"(2) {key} key [{n}, {', '.join(map(str, shape))}], {shard_rows} rows per shard")
        for codec in dict.fromkeys([LEGACY, *codecs]):  # one store at a time (the 1 GB key's page cache)
            src, url = np.load(npy, mmap_mode="r"), root / f"{key.replace(' ', '')}-{codec}.zarr"
            a = store_rows(url, lambda sl: src[sl], n, shape, shard_rows, codec)
            assert np.array_equal(a.read().view(np.uint16), src.view(np.uint16))
            base = {"key": key, "MB": nbytes / 1e6, "shards": a.n_shards, "chunks_per_shard": a.reader().layout.chunks,
                    "goal": GOALS[key], "codec": codec, "stored_over_raw": a.nbytes_stored() / nbytes}
            if codec == LEGACY:
                before = interleaved({"memmap": copy, "read": lambda: old_read(a)}, repeats)
                rows.append({**base, "path": "before: zarr x[:] + NaN check", "threads": None,
                             **figures(before, nbytes)})
            parts = parts_alone(a, repeats)
            for t in threads if codec in codecs else ():
                reader.set_concurrency(threads=t)
                got = interleaved({"memmap": copy, "read": a.read, "read_f32": lambda: a.read(dtype=np.float32),
                                   "open_read": lambda: Store.open(str(url), "r").open_array(PATH).read()}, repeats)
                rows.append({**base, "path": "checked read", "threads": t, **figures(got, nbytes),
                             **{f"{k}_alone_MB_s": nbytes / v / 1e6 for k, v in parts.items()}})
            reader.set_concurrency(threads=reader.DEFAULT_THREADS)
            shutil.rmtree(url)
    return rows


def figures(secs: dict, nbytes: int) -> dict:
    out = {"memmap_MB_s": nbytes / secs["memmap"] / 1e6}
    for k in ("read", "read_f32", "open_read"):
        if k in secs:
            out[f"{k}_MB_s"], out[f"{k}_ratio"] = nbytes / secs[k] / 1e6, secs["memmap"] / secs[k]
    return out


# --- (3) S3 -------------------------------------------------------------------------------------------------
def moto_server() -> tuple[subprocess.Popen, dict]:
    """moto's S3 server in its own process (its own interpreter: it does not share our GIL), bucket 'team'."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    os.environ.update(env)
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    import boto3

    for _ in range(200):
        try:
            boto3.client("s3").create_bucket(Bucket="team")
            return server, env
        except Exception:  # noqa: BLE001 - the server is still starting
            time.sleep(0.1)
    server.terminate()
    raise RuntimeError("moto server did not start")


def bench_s3(mb: int, ios: list[int], repeats: int, values: Values) -> list[dict]:
    import fsspec

    server, _ = moto_server()
    try:
        shape = KEYS["100 MB"][1]
        n = mb * 2**20 // (int(np.prod(shape)) * 2)
        shard_rows = default_shard_rows(int(np.prod(shape)) * 4, MICRO_BATCH)
        x = values(n, shape)
        stderr.print(f"(3) s3: writing a {x.nbytes / 1e6:.0f} MB key [{n}, {', '.join(map(str, shape))}] to moto")
        a = store_rows("s3://team/read.zarr", lambda sl: x[sl], n, shape, shard_rows, DEFAULT)
        fs = fsspec.filesystem("s3")
        objects = [f"team/read.zarr/{a.reader().key(i)}" for i in range(a.n_shards)]
        assert np.array_equal(a.read().view(np.uint16), x.view(np.uint16))
        rows = []
        for io in ios:
            reader.set_concurrency(io=io)
            got = interleaved({"cat": lambda: fs.cat(objects), "read": a.read}, repeats)
            stored = sum(fs.size(o) for o in objects)
            rows.append({"MB": x.nbytes / 1e6, "stored_MB": stored / 1e6, "shards": a.n_shards, "gets_in_flight": io,
                         "cat_MB_s": stored / got["cat"] / 1e6, "read_MB_s": x.nbytes / got["read"] / 1e6,
                         "ratio": got["cat"] / got["read"]})
        reader.set_concurrency(io=reader.DEFAULT_IO)
        return rows
    finally:
        server.terminate()
        server.wait()


# --- output -------------------------------------------------------------------------------------------------
def show(console: Console, title: str, rows: list[dict], cols: dict) -> None:
    table = Table(title=title)
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[f(r) for f in cols.values()])
    console.print(table)


def num(key: str, fmt: str = "{:,.0f}"):
    return lambda r: "-" if r.get(key) is None else fmt.format(r[key])


def bounds(local: list[dict]) -> list[str]:
    """For every goal missed at the best thread count: what bounds the read, measured."""
    lines = []
    best: dict = {}
    for r in local:
        if r["threads"] is not None and r["read_ratio"] > best.get((r["key"], r["codec"]), {}).get("read_ratio", -1):
            best[(r["key"], r["codec"])] = r
    for (key, codec), r in best.items():
        if r["read_ratio"] < r["goal"]:
            parts = {k: r[f"{k}_alone_MB_s"] for k in ("files", "decode", "crc32c", "nan")}
            at_most = r["threads"] / sum(1 / v for v in parts.values())
            lines.append(f"{key}, {codec}: {r['read_ratio']:.2f} of the memmap copy ({r['read_MB_s']:,.0f} vs "
                         f"{r['memmap_MB_s']:,.0f} MB/s) misses {r['goal']}. Alone, on one thread: "
                         + ", ".join(f"{k} {v:,.0f} MB/s" for k, v in parts.items())
                         + f"; in sequence {r['threads']} thread(s) reach at most {at_most:,.0f} MB/s "
                         f"({at_most / r['memmap_MB_s']:.2f} of the copy) with {os.cpu_count()} cores")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 and 100 MB keys, fewer codecs, a 20 MB S3 key")
    ap.add_argument("--sections", default="codecs,local,s3")
    ap.add_argument("--codec-stores", default=None, help="NAME=PATH,... stores whose float16 arrays the codec table "
                                                         "measures (default: synthetic activations)")
    ap.add_argument("--values-from", default=None, help="a store whose float16 values fill the read keys "
                                                        "(default: synthetic activations)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    codecs = list(dict.fromkeys(["none", LEGACY, "shuffle-lz4", "bitshuffle-lz4", DEFAULT] if args.quick else CODECS))
    threads = sorted({1, reader.DEFAULT_THREADS}) if args.quick else sorted({1, 2, reader.DEFAULT_THREADS})
    values = Values(args.values_from)
    out = {"cores": os.cpu_count(), "load_average_at_start": os.getloadavg(),
           "values": f"the float16 values of {args.values_from}" if args.values_from else "synthetic activations"}
    with tempfile.TemporaryDirectory() as tmp:
        if "codecs" in sections:
            out["codecs"] = bench_codecs(Path(tmp), codec_sources(args.codec_stores, args.quick), list(CODECS),
                                         args.repeats)
        if "local" in sections:
            out["local"] = bench_local(Path(tmp), list(QUICK_KEYS if args.quick else KEYS), codecs, threads,
                                       args.repeats, values)
        if "s3" in sections:
            out["s3"] = bench_s3(20 if args.quick else 100, [4, 16, 64], args.repeats, values)
    out["load_average_at_end"] = os.getloadavg()
    out["repeats"] = args.repeats
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        render(out)


def render(out: dict) -> None:
    """The tables of a run (`--json` output renders the same: render(json.load(f)))."""
    console = Console(width=200)
    console.print(f"{out['cores']} cores; load average {out['load_average_at_start'][0]:.1f} at start, "
                  f"{out['load_average_at_end'][0]:.1f} at end (other processes share the cores); read keys hold "
                  f"{out['values']}")
    if "codecs" in out:
        show(console, "(1) codecs: stored size and decode speed of float16 activations (MB/s of raw bytes)",
             out["codecs"], {"source": lambda r: r["source"], "codec": lambda r: r["codec"],
                             "MB": num("MB", "{:.1f}"), "stored / raw": num("stored_over_raw", "{:.3f}"),
                             "decode alone, 1 thread": num("decode_MB_s"), "crc32c alone": num("crc32c_MB_s"),
                             "checked read, 1 thread": num("checked_read_1_thread_MB_s")})
    if "local" in out:
        show(console, "(2) local reads vs a raw .npy memmap copy of the same bytes (warm cache, best of "
                      f"{out['repeats']}, interleaved)", out["local"],
             {"key": lambda r: r["key"], "shards x chunks": lambda r: f"{r['shards']} x {r['chunks_per_shard']}",
              "path": lambda r: r["path"], "codec": lambda r: r["codec"], "threads": num("threads"),
              "stored / raw": num("stored_over_raw", "{:.3f}"), "memmap MB/s": num("memmap_MB_s"),
              "read MB/s": num("read_MB_s"), "read / memmap": num("read_ratio", "{:.3f}"),
              "float32 / memmap": num("read_f32_ratio", "{:.3f}"),
              "open+read / memmap": num("open_read_ratio", "{:.3f}"),
              "goal": num("goal", "{}"),
              "met": lambda r: "-" if r["threads"] is None else ("yes" if r["read_ratio"] >= r["goal"] else "no")})
        for line in bounds(out["local"]):
            console.print("bound: " + line)
    if "s3" in out:
        show(console, "(3) S3 (moto server, own process): checked read vs raw concurrent fsspec cat of the same "
                      "objects (goal >= 0.8)", out["s3"],
             {"MB": num("MB"), "shards": num("shards"), "GETs in flight": num("gets_in_flight"),
              "cat MB/s (stored bytes)": num("cat_MB_s"), "read MB/s": num("read_MB_s"),
              "read / cat": num("ratio", "{:.2f}"), "met": lambda r: "yes" if r["ratio"] >= 0.8 else "no"})


if __name__ == "__main__":
    main()
