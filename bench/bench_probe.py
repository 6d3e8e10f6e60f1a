"""Probe throughput: what reading cached features costs, and what caching saves over recomputing them.

(a) read   one float16 feature array [N, C, p, p] (random normal, the layout extract writes: row chunks, shards,
           zstd + crc32c) read shard by shard from a local store, vs the same bytes read from a raw .npy memmap
           (the limit: no decode, no checksum). Warm page cache for both; best of --repeats passes. Also one
           shuffled epoch through feed.Feed in streaming mode (decode + float32 cast + shuffle), as a head sees it.
(b) recipe the 28-epoch linear recipe (probe.train_many) on digits at (t, block, pool) from the store, vs the same
           recipe with rows that run the U-Net (extract.forward_blocks) every time they are read, i.e. every epoch
           and for the test pass, as the paper's code trains. The store side is timed with and without the one-off
           extraction. Model: the shipped default (models.load_model("default")); a tiny seeded U-Net when the
           default is not there yet (said in the output).

Usage: python bench/bench_probe.py [--n 20000] [--epochs 28] [--t 90] [--block mid] [--pool 2] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from timing import best_of

from diffstore.datasets import load_split
from diffstore.errors import DiffstoreError
from diffstore.extract import extract_features, forward_blocks, plan_extraction
from diffstore.models import load_model
from diffstore.preprocess import Preprocess
from diffstore.probe.feed import Feed, Rows
from diffstore.probe.heads import HeadSpec
from diffstore.probe.recipe import ProbeRecipe
from diffstore.probe.sources import key_source
from diffstore.probe.train import Job, train_many
from diffstore.progress import stderr
from diffstore.store import Store


def bench_read(root: Path, n: int, row_shape: tuple, shard_rows: int, repeats: int) -> list[dict]:
    store = Store.open(str(root / "read.zarr"), "a")
    arr = store.create("bench/x", "bench", {}, row_shape, n, shard_rows, "float16")
    mm = np.lib.format.open_memmap(root / "x.npy", mode="w+", dtype=np.float16, shape=(n, *row_shape))
    rng = np.random.default_rng(0)
    for i in range(arr.n_shards):
        sl = arr.shard_slice(i)
        x = rng.standard_normal((sl.stop - sl.start, *row_shape), dtype=np.float32).astype(np.float16)
        arr.write_shard(i, x)
        mm[sl] = x
    mm.flush()
    mm = np.load(root / "x.npy", mmap_mode="r")
    nbytes = n * int(np.prod(row_shape)) * 2
    slices = [arr.shard_slice(i) for i in range(arr.n_shards)]
    feed = Feed([Rows.of(arr)], np.zeros(n, np.int64), np.arange(n), 128, torch.device("cpu"), budget=0)
    runs = {"store (shard by shard)": lambda: [arr.read(sl) for sl in slices],
            "raw .npy memmap (limit)": lambda: [np.array(mm[sl]) for sl in slices],
            "store via Feed (streamed, shuffled, float32)":
                lambda: sum(1 for _ in feed.batches(np.random.default_rng(0)))}
    for fn in runs.values():
        fn()  # warm the page cache
    secs = {name: best_of(fn, repeats) for name, fn in runs.items()}
    limit = secs["raw .npy memmap (limit)"]
    return [{"path": name, "rows": n, "row_shape": list(row_shape), "seconds": s, "images_per_s": n / s,
             "MB_per_s": nbytes / s / 1e6, "fraction_of_limit": limit / s} for name, s in secs.items()]


def tiny_model(root: Path):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
                norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")).save_pretrained(root / "tiny")
    return load_model(str(root / "tiny"), name="tiny-untrained")


def unet_rows(model, split, t: int, block: int, pool: str, row_shape: tuple, chunk_rows: int = 512) -> Rows:
    """Rows computed by the U-Net on every read: what training without a cache does each epoch."""
    x0 = Preprocess(model.image_size, model.image_channels)(split.load(np.arange(len(split))))

    def read(sl):
        ids = split.ids[sl]
        out = forward_blocks(model, x0[sl], t, ids, split.labels[sl], 0, 1, "noised", [block], [pool])
        return out[(block, pool)].numpy()

    return Rows(len(split), row_shape, chunk_rows, read)


def bench_recipe(root: Path, args) -> tuple[list[dict], str]:
    try:
        model, note = load_model("default"), "default model"
    except DiffstoreError as e:
        model, note = tiny_model(root), "tiny untrained U-Net (no default model shipped)"
        stderr.print(f"default model unavailable ({e}); using a tiny untrained U-Net")
    block = model.blocks.resolve(args.block)[0]
    store = Store.open(str(root / "recipe.zarr"), "a")
    splits = {s: load_split("digits", s) for s in ("train", "test")}
    t0 = time.perf_counter()
    for split in splits.values():
        plan = plan_extraction(store, model, split, t=str(args.t), blocks=str(block), pools=args.pool)
        extract_features(plan, batch_size=512, show_progress=False)
    extract_s = time.perf_counter() - t0
    key = next(k for k in store.feature_keys() if k.split == "train")
    source = key_source(store, key)
    recipe = ProbeRecipe("paper", epochs=args.epochs)
    labels = (splits["train"].labels, splits["test"].labels)
    stderr.print(f"(b) linear recipe, {args.epochs} epochs, {note}, t={args.t} block={block} pool={args.pool}")
    note += f", t={args.t} block={block} pool={args.pool}"
    t0 = time.perf_counter()
    cached = train_many([Job(source.train, source.test, HeadSpec())], *labels, 10, recipe)[0]
    cached_s = time.perf_counter() - t0
    live = [unet_rows(model, splits[s], args.t, block, args.pool, source.train.row_shape) for s in ("train", "test")]
    t0 = time.perf_counter()
    recomputed = train_many([Job(*live, HeadSpec())], *labels, 10, recipe, budget=0)[0]
    recompute_s = time.perf_counter() - t0
    rows = [{"path": "store: extract once", "seconds": extract_s, "top1": None},
            {"path": f"store: {args.epochs}-epoch recipe on cached rows", "seconds": cached_s, "top1": cached["top1"]},
            {"path": "store: extract + recipe", "seconds": extract_s + cached_s, "top1": cached["top1"]},
            {"path": "U-Net recomputed every epoch", "seconds": recompute_s, "top1": recomputed["top1"]}]
    for r in rows:
        r["recompute_over_this"] = recompute_s / r["seconds"]
    return rows, note


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="rows of the read benchmark's array")
    ap.add_argument("--row-shape", default="64,4,4")
    ap.add_argument("--shard-rows", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=28)
    ap.add_argument("--t", type=int, default=90)
    ap.add_argument("--block", default="mid")
    ap.add_argument("--pool", default="2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        read = bench_read(Path(tmp), args.n, tuple(int(s) for s in args.row_shape.split(",")), args.shard_rows,
                          args.repeats)
        recipe, note = bench_recipe(Path(tmp), args)
    if args.json:
        print(json.dumps({"read": read, "recipe": recipe, "model": note, "threads": args.threads}, indent=1))
        return
    console = Console(width=160)
    table = Table(title=f"(a) reading {args.n} rows of [{args.row_shape}] float16 ({args.threads} thread(s))")
    for col in ("path", "seconds", "images/s", "MB/s", "fraction of memmap limit"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for r in read:
        table.add_row(r["path"], f"{r['seconds']:.3f}", f"{r['images_per_s']:,.0f}", f"{r['MB_per_s']:,.0f}",
                      f"{r['fraction_of_limit']:.2f}")
    console.print(table)
    table = Table(title=f"(b) {args.epochs}-epoch linear recipe on digits: {note}")
    for col in ("path", "seconds", "test top-1", "recompute time / this"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for r in recipe:
        table.add_row(r["path"], f"{r['seconds']:.1f}", "-" if r["top1"] is None else f"{100 * r['top1']:.1f}",
                      f"{r['recompute_over_this']:.1f}x")
    console.print(table)


if __name__ == "__main__":
    main()
