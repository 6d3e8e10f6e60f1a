"""Scale-out on dask.distributed, as a layer the stages use: the cluster, running a list of calls on it with
progress, and what may travel to workers. It imports no stage (each stage's dask code lives in its own package:
extract/distributed.py, probe/distributed.py, cka/distributed.py).

Nothing home-made: no queue, no heartbeat, no retry loop of our own. A task that raises is resubmitted RETRIES
times; a worker that dies mid-task (killed, out of memory) is dask's business (allowed-failures, default 3).

What reaches workers: store URLs, option dataclasses and specs, all plain values. Never credentials: a URL
holding a password is refused. Workers read credentials from their own environment, as fsspec/s3fs do
everywhere: set AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (or AWS_PROFILE / an instance role) and AWS_ENDPOINT_URL
for an S3-compatible server in the environment that starts `dask worker` (LocalCluster workers inherit the
driver's). Paths must name the same files on every worker (a shared filesystem); local paths are made absolute.
GPUs: one worker process per GPU (`dask cuda worker` from dask-cuda, or CUDA_VISIBLE_DEVICES per `dask worker`);
device "auto" then picks the worker's GPU. On your own `dask worker`s, unset the nanny's MALLOC_TRIM_THRESHOLD_
(config distributed.nanny.pre-spawn-environ, see cluster_client): it costs torch ~30% CPU.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from .errors import DiffstoreError, require
from .progress import progress

RETRIES = 2  # resubmissions of a task that raised (a flaky object store); worker deaths are the scheduler's


@contextmanager
def maybe_cluster(workers: int | None, scheduler: str | None):
    """A dask client when workers/scheduler is given, else None (everything in-process)."""
    if not (workers or scheduler):
        yield None
        return
    require("distributed", "dask")
    with cluster_client(workers, scheduler) as client:
        yield client


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
