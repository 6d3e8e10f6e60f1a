"""Scale-out on dask.distributed: extraction, probe sweeps and CKA on many workers against one shared store.

    diffstore extract ... --store s3://team/imagenet.zarr --scheduler tcp://HOST:8786    # or --workers 4

The driver plans as in-process (plan_extraction validates and creates every pre-sized array), then submits
tasks; dask schedules them. Nothing home-made: no queue, no heartbeat, no retry loop of our own.

Extraction tasks are (t, shard range). Every pending (t, shard) is in exactly one task, so one writer owns a
shard; done shards are skipped (extract.pending) and run_task skips the arrays a task already finished. A task
that raises is resubmitted RETRIES times; a worker that dies mid-task (killed, out of memory) leaves its
shards unmarked and the scheduler reruns the task on another worker (dask's allowed-failures, default 3).
Noise is a function of (seed, id, t, draw) and forwards have fixed shapes, so the result is bit-identical to a
single-process run (a worker declared dead while still running, e.g. cut off by the network, can only write the
same bytes as its retry). A worker process loads the model once (worker_model) and rebuilds the plan once per job
(worker_plan): it reopens the store by URL, loads the split from the data spec and takes the store's sample ids
out of it, and re-runs plan_extraction, which checks every fingerprint against the arrays the driver created.

What reaches workers: the store URL, the model and data specs (load_model / load_split arguments) and the
recipe, all plain values. Never credentials: a URL holding a password is refused, and storage options are not
accepted here. Workers read credentials from their own environment, as fsspec/s3fs do everywhere: set
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (or AWS_PROFILE / an instance role) and AWS_ENDPOINT_URL for an
S3-compatible server in the environment that starts `dask worker` (LocalCluster workers inherit the driver's).
Paths in specs must name the same files on every worker (a shared filesystem); local paths are made absolute.
GPUs: one worker process per GPU (`dask cuda worker` from dask-cuda, or CUDA_VISIBLE_DEVICES per `dask worker`);
device "auto" then picks the worker's GPU. Torch runs 1 CPU thread per worker unless torch_threads says more.
On your own `dask worker`s, unset the nanny's MALLOC_TRIM_THRESHOLD_ (config distributed.nanny.pre-spawn-environ,
see cluster_client): it costs torch ~30% CPU.

Probe sweeps distribute (source, head) trainings, each one probe.stage.run_probes call on a worker that stores
its result; CKA distributes tiles of the matrix, each one cka.cka_matrix call. Both gather into the same rows
and matrices as the single-machine path.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from .errors import DiffstoreError
from .extract import Plan, pending, pick_device, plan_extraction, run_task
from .probe.feed import DEFAULT_BUDGET
from .key import FeatureKey, Recipe
from .progress import progress
from .store import Store

RETRIES = 2  # resubmissions of a task that raised (a flaky object store); worker deaths are the scheduler's

# --- the cluster -----------------------------------------------------------------------------------------


@contextmanager
def cluster_client(workers: int | None = None, scheduler: str | None = None, client=None):
    """A Client on `scheduler`, or on a LocalCluster of `workers` single-threaded processes, closed after; or the
    caller's `client`, left open (one cluster, and the models its workers loaded, kept across calls)."""
    import dask
    from distributed import Client, LocalCluster

    if client is not None:
        yield client
        return
    if workers and scheduler:
        raise DiffstoreError("pass --workers (a local cluster) or --scheduler (an existing one), not both")
    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except OSError as e:
            raise DiffstoreError(f"cannot reach the dask scheduler at {scheduler} ({e}); start one with "
                                 f"`dask scheduler` and workers with `dask worker {scheduler}`, or pass --workers N"
                                 ) from None
        with client:
            yield client
        return
    if not workers or workers < 1:
        raise DiffstoreError(f"--workers must be >= 1, got {workers}")
    # Nannies set MALLOC_TRIM_THRESHOLD_=64 KiB in workers by default; that also fixes glibc's mmap threshold, so
    # torch's large per-batch buffers are mmapped and page-faulted anew every batch (~30% more CPU here). None
    # unsets it. silence_logs: at close the nanny warns when it kills a worker slow to exit (torch's teardown).
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}), \
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                         silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        yield client


def run_all(client, fn, calls: list[tuple], names: list[str], what: str, unit: str, sizes: list[int],
            show_progress: bool) -> list:
    """fn(*args) for every args in `calls` on the cluster; results in call order, progress as tasks finish."""
    from distributed import KilledWorker, as_completed

    futures = [client.submit(fn, *args, retries=RETRIES, pure=False) for args in calls]
    index = {f.key: i for i, f in enumerate(futures)}
    results = [None] * len(futures)
    with progress(unit, disable=not show_progress) as bar:
        task = bar.add_task(f"{what} on {len(client.nthreads())} workers", total=sum(sizes))
        for future in as_completed(futures):
            i = index[future.key]
            try:
                results[i] = future.result()
            except KilledWorker:
                raise DiffstoreError(f"{what} {names[i]} killed every worker that ran it (out of memory?). Finished "
                                     "work is kept: lower --batch-size (or --shard-rows for new arrays) and re-run; "
                                     "done shards and stored results are skipped") from None
            bar.advance(task, sizes[i])
    return results


def absolute(path_or_url: str | None) -> str | None:
    """Local paths made absolute (workers do not share the driver's working directory); URLs unchanged."""
    if path_or_url is None or "://" in path_or_url or not Path(path_or_url).expanduser().exists():
        return path_or_url
    return str(Path(path_or_url).expanduser().resolve())


def worker_url(url: str) -> str:
    """The store URL as workers get it; refused when it embeds a secret (it would travel in every task)."""
    if urlsplit(url).password:
        raise DiffstoreError(f"the store URL embeds credentials ({urlsplit(url).scheme}://USER:PASSWORD@...); they "
                             "would be pickled into every task. Give workers credentials through their environment "
                             "(e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and pass the URL without them")
    return absolute(url)


# --- extraction ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtractJob:
    """What a worker needs to rebuild the driver's plan: plain values only, no live objects, no secrets."""

    store_url: str
    model_spec: tuple  # sorted (argument, value) pairs for models.load_model
    data_spec: tuple  # sorted (argument, value) pairs for datasets.load_split
    recipe: Recipe  # the driver's; the worker's rebuilt plan must have the same
    t: str
    blocks: str
    pools: str
    input_mode: str
    shard_rows: int
    batch_size: int
    device: str
    torch_threads: int


@lru_cache(maxsize=1)
def worker_model(model_spec: tuple, device: str):
    """The model, loaded once per worker process (and kept while jobs use the same spec)."""
    from .models import load_model

    return load_model(**dict(model_spec)).to(pick_device(device))


@lru_cache(maxsize=1)
def worker_plan(job: ExtractJob) -> Plan:
    """The driver's plan, rebuilt on a worker from the store and the specs; fingerprints checked against it."""
    from .datasets import load_split

    model = worker_model(job.model_spec, job.device)
    if model.fingerprint != job.recipe.model_fingerprint:
        raise DiffstoreError(f"model {dict(job.model_spec)['spec']} on worker {socket.gethostname()} is not the "
                             "driver's (its weights or config differ); every worker needs the same model files")
    store = Store.open(job.store_url, "a")
    data = load_split(**dict(job.data_spec))
    data = data.take(store.split(data.name, data.split).ids, f"give worker {socket.gethostname()} the same data as the driver (the same --data-root on a shared filesystem)")
    r = job.recipe
    plan = plan_extraction(store, model, data, job.t, job.blocks, job.pools, job.input_mode, r.noise_seed,
                           r.noise_draws, r.compute_dtype, r.storage_dtype, job.shard_rows, r.micro_batch, r.attention,
                           r.compile)
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
            run_task(plan, t, shard, job.batch_size)
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


def extract_job(plan: Plan, store_url: str, model_spec: dict, data_spec: dict, batch_size: int = 64,
                device: str = "auto", torch_threads: int = 1) -> ExtractJob:
    """The job every extraction task carries (pickled into the graph: plain values, checked free of secrets)."""
    model_spec = {**model_spec, "spec": absolute(model_spec.get("spec", "default"))}
    data_spec = {**data_spec, "root": absolute(data_spec.get("root"))}
    return ExtractJob(worker_url(store_url), tuple(sorted(model_spec.items())), tuple(sorted(data_spec.items())),
                      plan.recipe, ",".join(map(str, plan.ts)), ",".join(map(str, plan.blocks)), ",".join(plan.pools),
                      plan.input_mode, plan.shard_rows, batch_size, device, torch_threads)


def extract_distributed(plan: Plan, store_url: str, model_spec: dict, data_spec: dict, batch_size: int = 64,
                        device: str = "auto", workers: int | None = None, scheduler: str | None = None,
                        shards_per_task: int = 1, torch_threads: int = 1, show_progress: bool = True,
                        client=None) -> dict:
    """Run every pending task of a plan (made by plan_extraction on `store_url`) on a dask cluster.

    model_spec / data_spec: the load_model / load_split arguments that gave the plan's model and split; each
    worker loads them itself. The cluster: `client`, else `scheduler`, else a LocalCluster of `workers`.
    Returns extract_features' summary, plus the wall time and each task's timings.
    """
    tasks = pending(plan)
    summary = {"arrays": len(plan.arrays), "tasks_total": len(plan.ts) * math.ceil(len(plan.split) / plan.shard_rows),
               "tasks_run": len(tasks), "shard_rows": plan.shard_rows}
    if not tasks:
        return summary
    job = extract_job(plan, store_url, model_spec, data_spec, batch_size, device, torch_threads)
    groups = group_tasks(tasks, shards_per_task)
    n, size = len(plan.split), plan.shard_rows
    rows = [sum(min((i + 1) * size, n) - i * size for i in shards) for _, shards in groups]
    names = [f"t={t} shards {shards[0]}-{shards[-1]}" for t, shards in groups]
    start = time.perf_counter()
    with cluster_client(workers, scheduler, client) as client:
        done = run_all(client, extract_task, [(job, t, shards) for t, shards in groups], names, "extract", "img", rows,
                       show_progress)
    return {**summary, "wall_s": time.perf_counter() - start, "task_times": done}


# --- probe sweeps ------------------------------------------------------------------------------------------


def probe_task(store_url: str, kind: str, keys: list[dict], spec, recipe, device, budget: int,
               torch_threads: int) -> dict:
    """On a worker: train one head on one source (a key, or fused keys) and store its result, as run_probes does."""
    import torch

    from .probe.stage import fuse_source, key_source, run_probes

    torch.set_num_threads(torch_threads)
    store = Store.open(store_url, "r")
    sources = [key_source(store, FeatureKey(**k)) for k in keys]
    source = fuse_source(sources) if kind == "fuse" else sources[0]
    return run_probes(store, [source], [spec], recipe, retrain=True, device=device, budget=budget,
                      show_progress=False)[0]


def probe_distributed(store: Store, sources: list, specs: list, recipe, retrain: bool = False,
                      device: str | None = None, budget: int = DEFAULT_BUDGET, show_progress: bool = True,
                      workers: int | None = None, scheduler: str | None = None, torch_threads: int = 1,
                      client=None) -> list[dict]:
    """probe.stage.run_probes on a cluster: one task per (source, head) not already stored; the same result rows,
    in the same order. Pixel baselines (rows held in this process, not in the store) train here."""
    from .probe.stage import result_name, run_probes

    items = [(source, spec) for source in sources for spec in specs]
    cached = {} if retrain else {r["name"]: r for r in store.results("probe")}
    results: list = [None] * len(items)
    remote = []
    for i, (source, spec) in enumerate(items):
        name = result_name(source, spec, recipe)
        if name in cached:
            results[i] = {**cached[name], "cached": True}
        elif source.kind == "pixels":
            results[i] = run_probes(store, [source], [spec], recipe, True, device, budget, show_progress)[0]
        else:
            remote.append(i)
    if remote:
        url = worker_url(store.url)
        calls = [(url, items[i][0].kind, [k.to_dict() for k in items[i][0].keys], items[i][1], recipe, device, budget,
                  torch_threads) for i in remote]
        names = [f"{items[i][1].kind} head on {'+'.join(k.short() for k in items[i][0].keys)}" for i in remote]
        with cluster_client(workers, scheduler, client) as client:
            for i, r in zip(remote, run_all(client, probe_task, calls, names, "probe", "head", [1] * len(calls),
                                            show_progress)):
                results[i] = r
    return results


# --- CKA ------------------------------------------------------------------------------------------------------


def cka_tile(rows: list[tuple[str, FeatureKey]], cols: list[tuple[str, FeatureKey]] | None, cfg):
    """On a worker: cka_matrix over one tile; an array named twice is opened (and read) once."""
    from .cka import cka_matrix

    stores, arrays = {}, {}

    def x(url: str, key: FeatureKey):
        if url not in stores:
            stores[url] = Store.open(url, "r")
        if (url, key) not in arrays:
            arrays[(url, key)] = stores[url].features(key)  # checked reads
        return arrays[(url, key)]

    return cka_matrix([x(*r) for r in rows], None if cols is None else [x(*c) for c in cols], cfg)


def resolve_method(rows: list, cols: list, cfg):
    """'auto' resolved over the whole matrix, as cka_matrix would in-process, so every tile runs one estimator."""
    from .cka.math import exact_gib

    if cfg.method != "auto":
        return cfg
    names = list(dict.fromkeys([*rows, *cols]))
    stores = {url: Store.open(url, "r") for url, _ in names}
    arrays = [stores[url].features(key) for url, key in names]
    pairs = sorted({tuple(sorted((names.index(r), names.index(c)))) for r in rows for c in cols})
    fits = cfg.kernel == "linear" and exact_gib(arrays, pairs, cfg.chunk_rows) <= cfg.max_gram_gib
    return replace(cfg, method="exact" if fits else "minibatch")


def cka_distributed(rows: list[tuple[str, FeatureKey]], cols: list[tuple[str, FeatureKey]] | None = None, cfg=None,
                    workers: int | None = None, scheduler: str | None = None, tile: int | None = None,
                    show_progress: bool = True, client=None):
    """cka.cka_matrix over arrays named by (store URL, key), split into tiles of the matrix computed on a cluster.

    cols=None (or cols == rows): the symmetric matrix, only tiles on and above the diagonal. A tile reads its
    arrays once; tile (rows per side) defaults to giving every worker thread at least one tile.
    """
    from .cka import CKAConfig, CKAResult

    symmetric = cols is None or cols == rows
    rows = [(worker_url(url), key) for url, key in rows]
    cols = rows if symmetric else [(worker_url(url), key) for url, key in cols]
    cfg = resolve_method(rows, cols, cfg or CKAConfig())
    with cluster_client(workers, scheduler, client) as client:
        threads = sum(client.nthreads().values())
        k = 1
        while (k * (k + 1) // 2 if symmetric else k * k) < threads and k < max(len(rows), len(cols)):
            k += 1
        size = tile or math.ceil(max(len(rows), len(cols)) / k)
        r_parts = [range(a, min(a + size, len(rows))) for a in range(0, len(rows), size)]
        c_parts = [range(a, min(a + size, len(cols))) for a in range(0, len(cols), size)]
        tiles = [(i, j) for i in range(len(r_parts)) for j in range(len(c_parts)) if not (symmetric and j < i)]
        calls = [([rows[a] for a in r_parts[i]], None if symmetric and i == j else [cols[b] for b in c_parts[j]], cfg)
                 for i, j in tiles]
        names = [f"tile rows {r_parts[i][0]}-{r_parts[i][-1]} x cols {c_parts[j][0]}-{c_parts[j][-1]}"
                 for i, j in tiles]
        done = run_all(client, cka_tile, calls, names, "CKA", "tile", [1] * len(calls), show_progress)
    out = np.empty((len(rows), len(cols)))
    for (i, j), result in zip(tiles, done):
        out[np.ix_(r_parts[i], c_parts[j])] = result.matrix
        if symmetric:
            out[np.ix_(c_parts[j], r_parts[i])] = result.matrix.T
    return CKAResult(out, done[0].method, done[0].n_used)
