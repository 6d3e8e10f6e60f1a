"""Sharing a store through S3: write to s3:// (a real moto server on 127.0.0.1), read it from a second process."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import Command, digests, subset
from diffstore.cli import app
from diffstore.datasets import load_split
from diffstore.extract import extract_features, plan_extraction
from diffstore.models import load_model
from diffstore.store import Store
from diffstore.store.verify import verify_findings

URL = "s3://team/shared.zarr"
READER = """
import json, sys
from conftest import digests
from diffstore.store import Store
print(json.dumps(digests(Store.open(sys.argv[1], mode="r"))))
"""


def fill(url, model, split) -> dict:
    plan = plan_extraction(Store.open(url), model, split, t="10,300", blocks="2", pools="1,full")
    return extract_features(plan, batch_size=32, show_progress=False)


@pytest.fixture(scope="module")
def split():
    return subset(load_split("digits", "test"), 40)


@pytest.fixture(scope="module")
def s3_store(s3_env, model, split) -> str:
    """One store on S3, written once for this module by this process."""
    assert fill(URL, model, split)["tasks_run"] == 2  # 2 t x 1 shard
    return URL


def test_s3_store_round_trip_matches_local_bytes(s3_env, s3_store, model, split, tmp_path):
    fill(str(tmp_path / "local.zarr"), model, split)
    remote = subprocess.run([sys.executable, "-c", READER, s3_store], env=s3_env, capture_output=True, text=True,
                            cwd=Path(__file__).parent)  # conftest.digests: done flags and done shards hashed
    assert remote.returncode == 0, remote.stderr
    local = digests(Store.open(str(tmp_path / "local.zarr"), mode="r"))
    assert len(local) == 4 and json.loads(remote.stdout) == local


def test_colleague_reuses_what_is_on_s3(s3_store, model, split):
    assert fill(s3_store, model, split)["tasks_run"] == 0
    ls = CliRunner().invoke(app, ["ls", "--store", s3_store, "--json"])
    assert ls.exit_code == 0, ls.output
    rows = json.loads(ls.stdout)
    assert len(rows) == 4 and all(r["shards_done"] == r["shards"] for r in rows)
    np.testing.assert_equal(Store.open(s3_store, mode="r").split("digits", "test").ids, split.ids)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_outage_mid_extraction_resumes_bit_identical(s3_env, tiny_unet_dir, tmp_path):
    """The S3 server stops while `extract` writes: the writer exits 2 naming the server, nothing half-done is
    marked done; the server comes back, a re-run completes the store, bit-identical to a local run."""
    import time

    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    env = {**s3_env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "2"}
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()  # moto keeps its buckets in this process: a restarted server serves the same objects
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket="outage")
    args = ["extract", "--model", str(tiny_unet_dir), "--split", "test", "--limit", "160", "--t", "10",
            "--blocks", "2,mid", "--pools", "1", "--shard-rows", "16", "--batch-size", "16", "-q"]
    writer = Command(args + ["--store", "s3://outage/s.zarr"], env=env)  # its own process, forked (conftest)
    done = []
    while writer.process.is_alive() and not done:  # stop the server at the first done shard (10 are to come)
        listing = s3.list_objects_v2(Bucket="outage", Prefix="s.zarr/features/")
        done = [o["Key"] for o in listing.get("Contents", []) if "/done/c/" in o["Key"]]
        time.sleep(0.05)
    server.stop()
    writer.wait(timeout=300)
    err = writer.stderr
    assert writer.returncode == 2 and "cannot reach the server" in err and "Traceback" not in err, err
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:  # resume in-process (the same code the CLI runs) and compare with a clean local run
        model, split = load_model(str(tiny_unet_dir)), load_split("digits", "test")
        options = {"client_kwargs": {"endpoint_url": env["AWS_ENDPOINT_URL"]}}
        remote = Store.open("s3://outage/s.zarr", storage_options=options)
        assert 0 < sum(a.done_mask().sum() for a in remote.arrays()) < 2 * 10
        for store in (remote, Store.open(str(tmp_path / "local.zarr"))):
            plan = plan_extraction(store, model, split, t="10", blocks="2,mid", pools="1", shard_rows=16, limit="160")
            extract_features(plan, batch_size=16, show_progress=False)
        hashes = [digests(store) for store in (remote, Store.open(str(tmp_path / "local.zarr"), "r"))]
        assert len(hashes[0]) == 2 and hashes[0] == hashes[1]
        assert verify_findings(remote) == ([], 2)
    finally:
        server.stop()
