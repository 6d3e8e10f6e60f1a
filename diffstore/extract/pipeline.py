"""Run a plan as an overlapped pipeline: loader workers -> device forward -> background writer.

    loader workers (processes)   decode + preprocess a batch of rows, draw its noise (a pure function of
                                 (seed, sample id, t, draw)) and add it (x_t; SD latents are noised on the
                                 device after encoding), hand it over in shared (pinned on CUDA) memory,
                                 PREFETCH batches ahead of the device
    main thread                  copy to the device, one truncated forward per (micro-batch, t), pool every
                                 (block, pool) there, cast to the storage dtype, one device-to-host copy per batch
    writer thread                compress + write each finished shard, then mark it done (bounded queue)

The unit of work is one shard and a group of its pending t (sized so its buffers stay under SHARD_BYTES): the
images of a shard are decoded once for all of its t, not once per t. Values do not depend on the number of
workers, the batch size or the order of work: every forward sees the same fixed micro-batches of rows.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DiffstoreError
from ..noise import add_noise, noise, noised
from ..progress import progress
from ..store.arrays import done_masks
from .forward import encode_images, forward_blocks, prepare_model
from .plan import SHARD_BYTES, Plan

PREFETCH = 4  # batches each loader worker prepares ahead of the device
WRITE_QUEUE = 2  # finished shards waiting for the writer (each up to SHARD_BYTES)


@dataclass
class Unit:
    """One shard's rows at a group of t: what the writer receives when its last batch is through."""

    shard: int
    rows: np.ndarray  # row positions in the split
    ts: list[int]
    arrays: dict  # (t, block, pool) -> ShardedArray still missing this shard
    blocks: list[int]
    pools: list[str]


def make_units(plan: Plan, todo: dict) -> list[Unit]:
    """todo: shard -> {(t, block, pool): array}. t are grouped per shard so that the group's buffers fit SHARD_BYTES."""
    units = []
    for shard, arrays in sorted(todo.items()):
        rows = np.arange(len(plan.split))[next(iter(arrays.values())).shard_slice(shard)]
        group: list[int] = []
        for t in sorted({t for t, _, _ in arrays}):
            t_bytes = sum(a.x.nbytes // a.n_rows for (tt, _, _), a in arrays.items() if tt == t) * len(rows)
            if group and (len(group) + 1) * t_bytes > SHARD_BYTES:
                units.append(unit_of(shard, rows, group, arrays))
                group = []
            group.append(t)
        units.append(unit_of(shard, rows, group, arrays))
    return units


def unit_of(shard: int, rows: np.ndarray, ts: list[int], arrays: dict) -> Unit:
    mine = {k: arrays[k] for t in ts for k in sorted(arrays, key=str) if k[0] == t}  # t-major: the copy's column order
    return Unit(shard, rows, ts, mine, sorted({b for _, b, _ in mine}), sorted({p for _, _, p in mine}, key=str))


class Batches(Dataset):
    """Item i: batch i of the work list, loaded, preprocessed and with its noise drawn (runs in a loader worker)."""

    def __init__(self, plan: Plan, units: list[Unit], batch_size: int, x0_shape: tuple):
        self.plan, self.units, self.x0_shape = plan, units, x0_shape
        self.items = [(u, start) for u, unit in enumerate(units) for start in range(0, len(unit.rows), batch_size)]
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        try:
            return self.load(i)
        except DiffstoreError as e:  # e.g. a corrupt image: its message, not a worker's traceback, reaches the user
            return {"error": str(e)}

    def load(self, i: int) -> dict:
        u, start = self.items[i]
        unit, plan, r = self.units[u], self.plan, self.plan.recipe
        rows = unit.rows[start:start + self.batch_size]
        ids = plan.split.ids[rows]
        images = plan.preprocess(plan.split.load(rows))
        noised_ts = [t for t in unit.ts if plan.input_mode == "noised" and t > 0]
        item = {"unit": u, "start": start, "n": len(rows), "images": images, "eps": {}, "inputs": {}}
        if plan.model.encode is None:  # x_0 = the images: noise them here, off the device's critical path
            item["inputs"] = {t: [noised(images, r.noise_seed, ids, t, d, float(plan.model.alphas_cumprod[t]))
                                  for d in range(r.noise_draws)] for t in noised_ts}
            if len(noised_ts) == len(unit.ts):  # every t noised: the clean images need not cross to the main process
                item["images"] = None
        else:  # SD: noise goes on the latents, after the encoder has run on the device
            item["eps"] = {t: [noise(r.noise_seed, ids, t, d, self.x0_shape) for d in range(r.noise_draws)]
                           for t in noised_ts}
        return item


class ShardWriter:
    """Writes finished shards on a background thread (zarr compresses there too) while the device computes the
    next ones. The queue is bounded, so the device waits only when the disk is the bottleneck. Every array's
    shard is written whole and then marked done (ShardedArray.write_shard): a kill leaves only whole done shards.
    The first write error stops further writes and is raised in the caller's thread."""

    def __init__(self, depth: int = WRITE_QUEUE):
        self.queue: queue.Queue = queue.Queue(depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.run, name="diffstore-writer", daemon=True)
        self.thread.start()

    def run(self) -> None:
        while (job := self.queue.get()) is not None:
            shard, items = job
            try:
                if self.error is None:
                    for array, data in items:
                        array.write_shard(shard, data)
            except BaseException as e:  # handed to the caller by put/close
                self.error = e

    def put(self, shard: int, items: list) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((shard, items))

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.queue.put(None)  # queued shards are whole: they are still written
        self.thread.join()
        if exc_type is None and self.error is not None:
            raise self.error


def checked(out: torch.Tensor, array, plan: Plan, t: int, block: int, dtype: str) -> torch.Tensor:
    """One (block, pool) output, flat in the storage dtype, refused before anything of it is written when its shape
    is not the array's (a network whose map size depends on the batch size) or it holds NaN or inf: a stored NaN row
    would read as missing data, and a reader could not tell a broken model from a broken disk."""
    info = plan.model.blocks[block]
    if tuple(out.shape[1:]) != tuple(array.shape[1:]):
        raise DiffstoreError(f"model {plan.model.name} block {block} ({info.name}) gives maps of shape "
                             f"{tuple(out.shape[1:])} in a batch of {plan.recipe.micro_batch}, "
                             f"but {tuple(array.shape[1:])}"
                             " when traced on one image: its output shape depends on the batch size. diffstore "
                             "stores one shape per block; fix the network (or its plugin's run function)")
    x = out.flatten(1).to(getattr(torch, dtype))
    if not bool(torch.isfinite(x).all()):
        what = "NaN" if bool(torch.isnan(x).any()) else "values that overflow " + dtype
        hint = " (pass --dtype float32)" if what != "NaN" and dtype == "float16" else ""
        raise DiffstoreError(f"model {plan.model.name} block {block} ({info.name}) outputs {what} at t={t}{hint}; "
                             "nothing of it was stored. Check the model (its weights, its run/encode functions)")
    return x


def default_workers() -> int:
    """Loader processes: every core but the one that drives the device (at most 8)."""
    return max(0, min(8, len(os.sched_getaffinity(0)) - 1))


def share_by_file(_worker_id: int) -> None:
    """Loader workers hand batches over by shared-memory file name rather than by passing descriptors through a
    helper thread: that thread prints a traceback when Ctrl-C stops the run in the middle of a handover."""
    torch.multiprocessing.set_sharing_strategy("file_system")


def run_units(plan: Plan, units: list[Unit], batch_size: int, workers: int, on_batch=None) -> None:
    """Compute every unit and hand its shards to the writer. on_batch(n, k) after each batch: n images through
    the forward at each of the unit's k time steps."""
    model, r = plan.model, plan.recipe
    device = next(model.module.parameters()).device
    prepare_model(model, r)
    mb = r.micro_batch
    batch_size = -(-batch_size // mb) * mb  # every batch starts on the micro-batch partition
    first = plan.preprocess(plan.split.load(units[0].rows[:1]))  # also fills lazy loader caches before the fork
    x0_shape = tuple(encode_images(model, first, mb).shape[1:])
    data = Batches(plan, units, batch_size, x0_shape)
    workers = min(workers, len(data) - 1) if len(data) > 1 else 0
    loader = DataLoader(data, batch_size=None, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda",
                        prefetch_factor=PREFETCH if workers else None,
                        multiprocessing_context="fork" if workers else None,
                        worker_init_fn=share_by_file if workers else None)
    storage = getattr(torch, r.storage_dtype)
    buffers: list = [None] * len(units)  # a unit's buffers exist from its first batch until the writer has them
    left = [len(u.rows) for u in units]

    def finish(item, host, event, writer):
        """Scatter one batch's copy into its unit's buffers; a unit whose rows are all in goes to the writer."""
        if event is not None:
            event.synchronize()
        u, start, unit = item["unit"], item["start"], units[item["unit"]]
        if buffers[u] is None:
            buffers[u] = {k: np.empty((len(unit.rows), *a.shape[1:]), dtype=a.x.dtype) for k, a in unit.arrays.items()}
        flat, col = host.numpy(), 0
        for k in unit.arrays:
            size = int(np.prod(buffers[u][k].shape[1:]))
            values = flat[:, col:col + size].reshape(len(flat), *buffers[u][k].shape[1:])
            buffers[u][k][start:start + len(flat)] = values
            col += size
        left[u] -= len(flat)
        if left[u] == 0:
            writer.put(unit.shard, [(unit.arrays[k], buffers[u][k]) for k in unit.arrays])
            buffers[u] = None

    with ShardWriter() as writer:
        waiting = None  # the previous batch, its copy to the host still in flight (CUDA)
        for item in loader:
            if "error" in item:
                raise DiffstoreError(item["error"])
            unit = units[item["unit"]]
            rows = unit.rows[item["start"]:item["start"] + item["n"]]
            if item["images"] is None:
                x0 = next(iter(item["inputs"].values()))[0]  # stands in for x_0's shape only: every t has its x_t
            else:
                x0 = encode_images(model, item["images"], mb)  # SD latents (on the CPU again), else the images
            pieces = []
            for t in unit.ts:
                inputs = item["inputs"].get(t) or [add_noise(x0, e, float(model.alphas_cumprod[t]))
                                                   for e in item["eps"].get(t, [])]
                out = forward_blocks(model, x0, t, plan.split.ids[rows], plan.split.labels[rows], r.noise_seed,
                                     r.noise_draws, plan.input_mode, unit.blocks, unit.pools, r.compute_dtype, mb,
                                     inputs=inputs or None)
                pieces += [checked(out[(b, p)], unit.arrays[(t, b, p)], plan, t, b, r.storage_dtype)
                           for (tt, b, p) in unit.arrays if tt == t]
            flat = torch.cat(pieces, dim=1)  # cast as write_shard would, bit for bit
            if device.type == "cuda":  # one device-to-host copy per batch, overlapped with the next batch's forward
                host, event = torch.empty(flat.shape, dtype=storage, pin_memory=True), torch.cuda.Event()
                host.copy_(flat, non_blocking=True)
                event.record()
            else:
                host, event = flat.cpu(), None  # a no-op on the CPU
            if waiting is not None:
                finish(*waiting, writer)
            waiting = (item, host, event)
            if on_batch:
                on_batch(len(rows), len(unit.ts))
        if waiting is not None:
            finish(*waiting, writer)


def run_task(plan: Plan, t: int, shard: int, batch_size: int, on_batch=None) -> None:
    """Compute shard `shard` at time step t for every array still missing it, then write those shards
    (in this process: dask workers call it, one task at a time)."""
    todo = {(tt, b, p): a for (tt, b, p), a in plan.arrays.items() if tt == t and not a.is_done(shard)}
    if todo:
        run_units(plan, make_units(plan, {shard: todo}), batch_size, workers=0,
                  on_batch=(lambda n, _k: on_batch(n)) if on_batch else None)


def extract_features(plan: Plan, batch_size: int = 64, show_progress: bool = True, workers: int | None = None) -> dict:
    """Run every pending (t, shard); returns a summary. Re-running a finished plan does nothing (and reads only
    one listing of the store's done flags). workers: loader processes (None: default_workers())."""
    masks = done_masks(plan.arrays)
    shards = plan.shards()
    todo: dict = {}
    for k, a in plan.arrays.items():
        for shard in shards:
            if not masks[k][shard]:
                todo.setdefault(shard, {})[k] = a
    tasks = {(t, shard) for shard, arrays in todo.items() for t, _, _ in arrays}
    summary = {"arrays": len(plan.arrays), "tasks_total": len(plan.ts) * len(shards), "tasks_run": len(tasks),
               "shard_rows": plan.shard_rows, "micro_batch": plan.recipe.micro_batch}
    if not tasks:
        return summary
    units = make_units(plan, todo)
    ts = sorted({t for u in units for t in u.ts})
    whole = all(u.ts == ts for u in units)  # each image runs at every t in one go: count images, else (image, t)
    with progress("img" if whole else "img x t", disable=not show_progress) as bar:
        what = f"extract {plan.split.name}/{plan.split.split} {plan.model.name} t={','.join(map(str, ts))}"
        task = bar.add_task(what, total=sum(len(u.rows) * (1 if whole else len(u.ts)) for u in units))
        run_units(plan, units, batch_size, default_workers() if workers is None else workers,
                  on_batch=lambda n, k: bar.advance(task, n if whole else n * k))
    return summary
