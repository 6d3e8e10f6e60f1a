"""Sharing a store through S3: write to s3:// (a real moto server on 127.0.0.1), read it from a second process."""

import json
import subprocess
import sys

import numpy as np

from conftest import subset
from diffstore.datasets import load_split
from diffstore.extract import extract_features, plan_extraction
from diffstore.models import load_model
from diffstore.store import Store

READER = """
import hashlib, json, sys
from diffstore.store import Store
s = Store.open(sys.argv[1], mode="r")
print(json.dumps({a.path: hashlib.sha256(a.read().tobytes()).hexdigest() for a in s.arrays()}))
"""


def fill(url, model, split):
    plan = plan_extraction(Store.open(url), model, split, "10,300", "2,mid", "1,full")
    extract_features(plan, batch_size=32, show_progress=False)


def test_s3_store_round_trip_matches_local_bytes(s3_env, tiny_unet_dir, tmp_path):
    model = load_model(str(tiny_unet_dir))
    split = subset(load_split("digits", "test"), 40)
    fill("s3://team/shared.zarr", model, split)
    fill(str(tmp_path / "local.zarr"), model, split)
    remote = subprocess.run([sys.executable, "-c", READER, "s3://team/shared.zarr"], env=s3_env, capture_output=True, text=True)
    local = subprocess.run([sys.executable, "-c", READER, str(tmp_path / "local.zarr")], capture_output=True, text=True)
    assert remote.returncode == 0, remote.stderr
    remote_hashes, local_hashes = json.loads(remote.stdout), json.loads(local.stdout)
    assert len(remote_hashes) == 8 and remote_hashes == local_hashes


def test_colleague_reuses_what_is_on_s3(s3_env, tiny_unet_dir):
    model = load_model(str(tiny_unet_dir))
    split = subset(load_split("digits", "test"), 40)
    fill("s3://team/reuse.zarr", model, split)
    plan = plan_extraction(Store.open("s3://team/reuse.zarr"), model, split, "10,300", "2,mid", "1,full")
    assert extract_features(plan, show_progress=False)["tasks_run"] == 0
    ls = subprocess.run([sys.executable, "-m", "diffstore.cli", "ls", "--store", "s3://team/reuse.zarr", "--json"],
                        env=s3_env, capture_output=True, text=True)
    assert ls.returncode == 0, ls.stderr
    rows = json.loads(ls.stdout)
    assert len(rows) == 8 and all(r["shards_done"] == r["shards"] for r in rows)
    np.testing.assert_equal(Store.open("s3://team/reuse.zarr", mode="r").split("digits", "test").ids, split.ids)
