"""Scale-out on dask.distributed: a LocalCluster of 2 worker processes (1 thread each) against one shared store."""

import os
import pickle

import numpy as np
import pytest
from distributed.diagnostics.plugin import WorkerPlugin

from conftest import digests, forkserver, subset
from diffstore.datasets import load_split
from diffstore.errors import DiffstoreError
from diffstore.extract import ExtractOptions, extract_features, plan_extraction
from diffstore.store import Store

T, BLOCKS, POOLS = "10,300", "mid", "1,full"  # tasks (t, shards) of 2 arrays each


@pytest.fixture(scope="module")
def cluster(s3_env):
    """Worker processes forked from conftest's forkserver (torch imported once: a worker restarted after a kill is up
    in a fraction of a second), with the S3 endpoint and credentials in their environment."""
    import dask
    from distributed import LocalCluster

    forkserver()
    aws = {k: v for k, v in s3_env.items() if k.startswith("AWS_")}
    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, env=aws) as c:
        yield c


@pytest.fixture(scope="module")
def digits48():
    return subset(load_split("digits", "test"), 48)


@pytest.fixture(scope="module")
def reference(model, digits48, tmp_path_factory) -> dict:
    """The same extraction in this process (the single-machine path)."""
    store = Store.open(str(tmp_path_factory.mktemp("ref") / "ref.zarr"))
    extract_features(plan_extraction(store, model, digits48, t=T, blocks=BLOCKS, pools=POOLS, shard_rows=16),
                     batch_size=16, show_progress=False)
    return digests(store)


def extract_on(cluster, plan, url, model_dir, **kw) -> dict:
    """Extract a plan made in this process (the driver) on the cluster; workers load the model and data themselves."""
    from diffstore.extract.distributed import extract_distributed

    options = ExtractOptions.build(store=url, model=str(model_dir), split="test", batch_size=16,
                                   scheduler=cluster.scheduler_address, show_progress=False)
    return extract_distributed(plan, options, **kw)


def test_cluster_extraction_into_s3_is_byte_identical_to_in_process(cluster, model, digits48, tiny_unet_dir,
                                                                    reference):
    from diffstore.extract.distributed import worker_model

    url = "s3://team/dist.zarr"
    plan = plan_extraction(Store.open(url), model, digits48, t=T, blocks=BLOCKS, pools=POOLS, shard_rows=16)
    summary = extract_on(cluster, plan, url, tiny_unet_dir, shards_per_task=2)
    assert summary["tasks_run"] == summary["tasks_total"] == 6  # 2 t x 3 shards, as tasks (t, shards 0-1) and (t, 2)
    assert sorted(tuple(r["shards"]) for r in summary["task_times"]) == [(0, 1), (0, 1), (2,), (2,)]
    store = Store.open(url, mode="r")
    assert all(a.complete for a in store.arrays())
    assert len(reference) == 4 and digests(store) == reference
    # each worker process that ran tasks loaded the model exactly once
    ran = {r["pid"] for r in summary["task_times"]}
    misses = cluster_run(cluster, lambda: (os.getpid(), worker_model.cache_info().misses))
    assert ran and all(misses[pid] == 1 for pid in ran)
    # a second run finds every shard done and submits nothing
    again = extract_on(cluster, plan, url, tiny_unet_dir)
    assert again["tasks_run"] == 0 and "task_times" not in again


def cluster_run(cluster, fn) -> dict:
    from distributed import Client

    with Client(cluster) as client:
        return dict(client.run(fn).values())


class DieAfterFirstWrite(WorkerPlugin):
    """Worker plugin: the first shard write on the cluster is followed by the death of its worker process
    (os._exit: no cleanup, like a kill -9 or the OOM killer), before the task's other arrays are written."""

    name = "die-after-first-write"

    def __init__(self, marker: str):
        self.marker = marker

    def setup(self, worker):
        from diffstore.store import ShardedArray

        self.original = original = ShardedArray.write_shard
        marker = self.marker

        def write_then_die(array, i, data):
            original(array, i, data)
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))  # only the first writer on the cluster dies
            except FileExistsError:
                return
            os._exit(1)

        ShardedArray.write_shard = write_then_die

    def teardown(self, worker):
        from diffstore.store import ShardedArray

        ShardedArray.write_shard = self.original


def test_worker_killed_mid_task_gives_identical_arrays(cluster, model, digits48, tiny_unet_dir, reference, tmp_path):
    from distributed import Client

    marker = tmp_path / "a-worker-died"
    with Client(cluster) as client:
        client.register_plugin(DieAfterFirstWrite(str(marker)))
        try:
            url = "s3://team/killed.zarr"  # as README says: a killed worker on a moto S3 store
            plan = plan_extraction(Store.open(url), model, digits48, t=T, blocks=BLOCKS, pools=POOLS, shard_rows=16)
            summary = extract_on(cluster, plan, url, tiny_unet_dir)
        finally:
            client.unregister_worker_plugin(DieAfterFirstWrite.name)
    assert marker.exists()  # a worker did die, with the first array of its shard written and the rest not
    assert summary["tasks_run"] == 6 and len(summary["task_times"]) == 6
    store = Store.open(url, mode="r")
    assert all(a.complete for a in store.arrays()) and digests(store) == reference


def test_worker_with_other_weights_refuses_and_writes_nothing(cluster, model, digits48, tiny_unet_dir, tmp_path):
    from diffstore.extract.distributed import extract_distributed

    url = str(tmp_path / "other.zarr")
    plan = plan_extraction(Store.open(url), model, digits48, t="10", blocks="2", pools="1", shard_rows=16)
    with pytest.raises(DiffstoreError, match="is not the driver's"):
        # the worker is told to load other weights than the plan's
        extract_distributed(plan, ExtractOptions.build(store=url, model=str(tiny_unet_dir), random_init=1,
                                                       split="test", scheduler=cluster.scheduler_address,
                                                       show_progress=False))
    assert not any(a.done_mask().any() for a in Store.open(url, mode="r").arrays())


def test_jobs_carry_no_secrets_and_urls_with_passwords_are_refused(s3_env, model, digits48, tiny_unet_dir, tmp_path):
    from diffstore.extract.distributed import extract_job
    from diffstore.scale import worker_url

    plan = plan_extraction(Store.open(str(tmp_path / "job.zarr")), model, digits48, t=T, blocks=BLOCKS, pools=POOLS,
                           shard_rows=16)
    job = pickle.dumps(extract_job(plan, ExtractOptions.build(store="s3://team/job.zarr", model=str(tiny_unet_dir),
                                                              split="test")))
    assert s3_env["AWS_SECRET_ACCESS_KEY"].encode() not in job and b"s3://team/job.zarr" in job
    with pytest.raises(DiffstoreError, match="environment"):
        worker_url("s3://key:secret@team/job.zarr")


@pytest.fixture(scope="module")
def probe_store(model, tmp_path_factory):
    """digits train (64) and test (48) features at t=10 for blocks 1, 2 and mid, pool 1, extracted in-process."""
    url = str(tmp_path_factory.mktemp("probe") / "probe.zarr")
    for split, n in (("train", 64), ("test", 48)):
        plan = plan_extraction(Store.open(url), model, subset(load_split("digits", split), n), t="10",
                               blocks="1,2,mid", pools="1")
        extract_features(plan, batch_size=32, show_progress=False)
    return Store.open(url, mode="r")


def test_probe_sweep_on_cluster_matches_in_process(cluster, probe_store):
    from diffstore.probe.distributed import probe_distributed
    from diffstore.probe.heads import HeadSpec
    from diffstore.probe.recipe import ProbeRecipe
    from diffstore.probe.results import run_probes
    from diffstore.probe.sources import key_source, select_keys

    sources = [key_source(probe_store, k) for k in select_keys(probe_store)]
    specs = [HeadSpec("linear"), HeadSpec("mlp", hidden=(32,))]
    recipe = ProbeRecipe(epochs=3, batch_size=16, seed=3, steps=30, min_steps=10, eval_every=10)
    local = run_probes(probe_store, sources, specs, recipe, retrain=True, show_progress=False)
    remote = probe_distributed(probe_store, sources, specs, recipe, retrain=True, scheduler=cluster.scheduler_address,
                               show_progress=False)
    assert len(remote) == 6 and [r["name"] for r in remote] == [r["name"] for r in local]
    assert [(r["top1"], r["val_top1"]) for r in remote] == [(r["top1"], r["val_top1"]) for r in local]
    # stored next to the features as in-process results are, so a second sweep reuses them without a cluster
    again = probe_distributed(probe_store, sources, specs, recipe, scheduler="tcp://127.0.0.1:9", show_progress=False)
    assert all(r["cached"] for r in again) and [r["top1"] for r in again] == [r["top1"] for r in local]


def test_cka_tiles_on_cluster_match_in_process_matrix(cluster, probe_store):
    from diffstore.cka import CKAConfig, cka_matrix
    from diffstore.cka.distributed import cka_distributed

    keys = [k for k in probe_store.feature_keys() if k.split == "train"]
    assert len(keys) == 3
    for cfg in (CKAConfig(method="exact"), CKAConfig(method="minibatch", batch_size=16, block_rows=16)):
        local = cka_matrix([probe_store.features(k).x for k in keys], cfg=cfg)
        # tile 2 over 3 arrays: a diagonal tile, an off-diagonal one (mirrored) and a 1x1 diagonal one
        remote = cka_distributed([(probe_store.url, k) for k in keys], cfg=cfg, tile=2,
                                 scheduler=cluster.scheduler_address, show_progress=False)
        assert remote.method == local.method and remote.n_used == local.n_used
        np.testing.assert_allclose(remote.matrix, local.matrix, rtol=1e-12, atol=1e-12)
        assert not np.allclose(remote.matrix, 1.0)  # three different blocks: not a trivial all-ones matrix
