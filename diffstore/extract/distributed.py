"""Extraction on a dask cluster (`--workers N` or `--scheduler tcp://HOST:8786`) against one shared store.

The driver plans as in-process (plan_extraction validates and creates every pre-sized array), then submits tasks
(t, shard range); dask schedules them. Every pending (t, shard) is in exactly one task, so one writer owns a shard;
done shards are skipped (plan.pending) and run_task skips the arrays a task already finished. Noise is a function
of (seed, id, t, draw) and forwards have fixed shapes, so the result is bit-identical to a single-process run (a
worker declared dead while still running can only write the same bytes as its retry).

A job carries the extraction's options (ExtractOptions: plain values, local paths made absolute, the URL checked
free of secrets), the split and the driver's recipe. A worker process loads the model once (worker_model) and
rebuilds the plan once per job (worker_plan): it reopens the store by URL, loads the split and takes the store's
sample ids out of it, and re-runs plan_extraction, which checks every fingerprint against the driver's arrays.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

from ..device import pick_device
from ..errors import DiffstoreError
from ..key import Recipe
from ..scale import absolute, cluster_client, run_all, worker_url
from ..store import Store
from .options import ExtractOptions
from .pipeline import run_task
from .plan import Plan, pending, plan_extraction


@dataclass(frozen=True)
class ExtractJob:
    """What a worker needs to rebuild the driver's plan: plain values only, no live objects, no secrets."""

    options: ExtractOptions  # paths absolute, forward fields and shard rows fixed to the driver's
    split: str
    recipe: Recipe  # the driver's; the worker's rebuilt plan must have the same
    torch_threads: int


@lru_cache(maxsize=1)
def worker_model(model_spec: tuple, device: str):
    """The model, loaded once per worker process (and kept while jobs use the same spec)."""
    from ..models import load_model

    spec = dict(model_spec)
    return load_model(spec.pop("spec"), **spec).to(pick_device(device))


@lru_cache(maxsize=1)
def worker_plan(job: ExtractJob) -> Plan:
    """The driver's plan, rebuilt on a worker from the store and the options; fingerprints checked against it."""
    from ..datasets import load_split

    o = job.options
    model = worker_model(tuple(sorted(o.model_spec().items())), o.device)
    if model.fingerprint != job.recipe.model_fingerprint:
        raise DiffstoreError(f"model {o.model} on worker {socket.gethostname()} is not the driver's (its weights or "
                             "config differ); every worker needs the same model files")
    store = Store.open(o.store, "a")
    data = load_split(o.dataset, job.split, o.data_root, skip_bad=o.skip_bad, as_name=o.stored_dataset())
    if o.views:  # the driver's (sample, view) rows
        from ..preprocess import Preprocess
        from ..views import view_split

        data = view_split(data, o.views, o.view_seed, Preprocess(model.image_size, model.image_channels))
    data = data.take(store.split(data.name, data.split).ids, f"give worker {socket.gethostname()} the same data as "
                     "the driver (the same --data-root on a shared filesystem)")
    plan = plan_extraction(store, model, data, o)
    if plan.recipe != job.recipe:
        raise DiffstoreError(f"the {data.name}/{data.split} data on worker {socket.gethostname()} differs from the "
                             "driver's (dataset fingerprint); give every worker the same data and preprocessing")
    return plan


# Hooks go on the shared model during a forward, so a worker process computes one task at a time even when
# it runs several threads.
_compute = threading.Lock()


def extract_task(job: ExtractJob, t: int, shards: tuple[int, ...]) -> dict:
    """On a worker: compute and write shards `shards` at time step t (what is done already is skipped)."""
    import torch

    with _compute:
        torch.set_num_threads(job.torch_threads)
        start = time.perf_counter()
        plan = worker_plan(job)
        ready, cpu = time.perf_counter(), time.process_time()
        for shard in shards:
            run_task(plan, t, shard, job.options.batch_size)
        # cpu_s next to compute_s tells a slow task on a busy host (wall >> CPU) from a costly one
        return {"t": t, "shards": list(shards), "pid": os.getpid(), "setup_s": ready - start,
                "compute_s": time.perf_counter() - ready, "cpu_s": time.process_time() - cpu}


def group_tasks(tasks: list[tuple[int, int]], shards_per_task: int) -> list[tuple[int, tuple[int, ...]]]:
    """(t, shard) pairs -> (t, shard range) tasks of up to `shards_per_task` consecutive shards each."""
    out: list = []
    for t, shard in tasks:
        last = out[-1] if out else None
        if last and last[0] == t and len(last[1]) < shards_per_task and last[1][-1] == shard - 1:
            out[-1] = (t, (*last[1], shard))
        else:
            out.append((t, (shard,)))
    return out


def extract_job(plan: Plan, options: ExtractOptions, torch_threads: int = 1) -> ExtractJob:
    """The job every extraction task carries (pickled into the graph: plain values, checked free of secrets)."""
    r, base = plan.recipe, plan.split.source.get("base_split", plan.split.split)
    o = options.replace(store=worker_url(options.store), model=absolute(options.model),
                        data_root=absolute(options.data_root), shard_rows=plan.shard_rows, micro_batch=r.micro_batch,
                        attention=r.attention, compile=r.compile, t=plan.ts, blocks=[str(b) for b in plan.blocks],
                        pools=plan.pools, input=plan.input_mode, split=[base])
    return ExtractJob(o, base, r, torch_threads)


def extract_distributed(plan: Plan, options: ExtractOptions, shards_per_task: int = 1, torch_threads: int = 1,
                        client=None) -> dict:
    """Run every pending task of a plan (made by plan_extraction on options.store) on a dask cluster: `client`,
    else options.scheduler, else a LocalCluster of options.workers. Each worker loads the model and the split
    itself, from the options. Returns extract_features' summary, plus the wall time and each task's timings."""
    tasks = pending(plan)
    summary = {"arrays": len(plan.arrays), "tasks_total": len(plan.ts) * len(plan.shards()),
               "tasks_run": len(tasks), "shard_rows": plan.shard_rows}
    if not tasks:
        return summary
    job = extract_job(plan, options, torch_threads)
    groups = group_tasks(tasks, shards_per_task)
    n, size = len(plan.split), plan.shard_rows
    rows = [sum(min((i + 1) * size, n) - i * size for i in shards) for _, shards in groups]
    names = [f"t={t} shards {shards[0]}-{shards[-1]}" for t, shards in groups]
    start = time.perf_counter()
    with cluster_client(options.workers, options.scheduler, client) as client:
        what = f"extract {plan.split.name}/{plan.split.split} {plan.model.name} t={','.join(map(str, plan.ts))}"
        done = run_all(client, extract_task, [(job, t, shards) for t, shards in groups], names, what, "img", rows,
                       options.show_progress)
    return {**summary, "wall_s": time.perf_counter() - start, "task_times": done}
