"""Sharing a store through S3: write to s3:// (a real moto server on 127.0.0.1), read it from a second process."""

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import digests, subset
from diffstore.cli import app
from diffstore.datasets import load_split
from diffstore.extract import extract_features, plan_extraction
from diffstore.store import Store

URL = "s3://team/shared.zarr"
READER = """
import hashlib, json, sys
from diffstore.store import Store
s = Store.open(sys.argv[1], mode="r")
print(json.dumps({a.path: hashlib.sha256(a.read().tobytes()).hexdigest() for a in s.arrays()}))
"""


def fill(url, model, split) -> dict:
    plan = plan_extraction(Store.open(url), model, split, "10,300", "2,mid", "1,full")
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
    remote = subprocess.run([sys.executable, "-c", READER, s3_store], env=s3_env, capture_output=True, text=True)
    assert remote.returncode == 0, remote.stderr
    local = digests(Store.open(str(tmp_path / "local.zarr"), mode="r"))
    assert len(local) == 8 and json.loads(remote.stdout) == local


def test_colleague_reuses_what_is_on_s3(s3_store, model, split):
    assert fill(s3_store, model, split)["tasks_run"] == 0
    ls = CliRunner().invoke(app, ["ls", "--store", s3_store, "--json"])
    assert ls.exit_code == 0, ls.output
    rows = json.loads(ls.stdout)
    assert len(rows) == 8 and all(r["shards_done"] == r["shards"] for r in rows)
    np.testing.assert_equal(Store.open(s3_store, mode="r").split("digits", "test").ids, split.ids)
