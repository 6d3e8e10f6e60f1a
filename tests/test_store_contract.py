"""The store's contract, one suite run on every backend (a local folder, fsspec's in-memory filesystem and an S3
server), as zarr-python runs one StoreTests class per store: create, write a shard, done flags, resume, checked
reads, verify, corruption refused, splits and results."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from conftest import feature_array
from diffstore.datasets import Split
from diffstore.errors import DiffstoreError
from diffstore.key import FeatureKey, Recipe
from diffstore.store import Store
from diffstore.store.verify import verify_findings

KEY = FeatureKey("toy", "test", "m", "noised", 10, 2, "1")
RECIPE = Recipe("mfp", "dfp", 0, 1, "float32", "float16")
ROWS = np.random.default_rng(0).normal(size=(40, 3, 2, 2)).astype(np.float16)
counter = itertools.count()


@pytest.fixture(params=["local", "memory", "s3"])
def url(request, tmp_path):
    """A fresh store URL on each backend."""
    n = next(counter)
    if request.param == "local":
        return str(tmp_path / "s.zarr")
    if request.param == "memory":
        return f"memory://contract-{n}.zarr"
    request.getfixturevalue("s3_env")
    return f"s3://team/contract-{n}.zarr"


def put(store: Store, key: str, data: bytes) -> None:
    sync(store.zs.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def test_a_written_shard_reads_back_after_its_done_flag(url):
    store = Store.open(url)
    a = feature_array(store, KEY, RECIPE, n=40, shard_rows=16)
    assert a.n_shards == 3 and not a.done_mask().any()
    assert a.write_shard(1, ROWS[16:32]) and not a.write_shard(1, ROWS[16:32])  # done: never written twice
    reopened = Store.open(url, "r").features(KEY)
    assert reopened.done_mask().tolist() == [False, True, False] and reopened.done_rows() == 16
    np.testing.assert_array_equal(reopened.read(slice(16, 32)), ROWS[16:32])


def test_creating_again_resumes_and_another_fingerprint_is_refused(url):
    store = Store.open(url)
    feature_array(store, KEY, RECIPE, n=40, shard_rows=16).write_shard(0, ROWS[:16])
    again = feature_array(Store.open(url), KEY, RECIPE, n=40, shard_rows=16)
    assert again.done_mask().tolist() == [True, False, False]
    other = Recipe("mfp", "dfp", 1, 1, "float32", "float16")
    with pytest.raises(DiffstoreError, match="another fingerprint"):
        feature_array(Store.open(url), KEY, other, n=40, shard_rows=16)


def test_checked_reads_refuse_undone_shards_and_nan_rows(url):
    store = Store.open(url)
    a = feature_array(store, KEY, RECIPE, n=40, shard_rows=16)
    a.write_shard(0, ROWS[:16])
    with pytest.raises(DiffstoreError, match="shard 1 .* is not done"):
        a.read(slice(0, 20))
    nan = ROWS[16:32].copy()
    nan[3] = np.nan
    a.x[16:32] = nan  # what a lost write looks like: data missing, flag set
    a._done[1] = 1
    with pytest.raises(DiffstoreError, match="NaN rows"):
        Store.open(url, "r").features(KEY).read(slice(16, 32))


def test_verify_finds_corrupt_and_half_written_shards_and_readers_refuse_them(url):
    store = Store.open(url)
    a = feature_array(store, KEY, RECIPE, n=40, shard_rows=16, rows=ROWS)
    assert verify_findings(Store.open(url, "r"))[0] == []
    put(store, f"{KEY.path}/x/c/1/0/0/0", b"not a shard")  # corrupt bytes where shard 1 was
    a._done[2] = 0  # shard 2: its data stored, its flag lost
    findings = {f.kind: f.shards for f in verify_findings(Store.open(url, "r"))[0]}
    assert findings == {"corrupt": [1], "incomplete": [2]}
    with pytest.raises(DiffstoreError, match="shard 1 .*checksum or cannot be decoded"):
        Store.open(url, "r").features(KEY).read(slice(16, 32))


def test_splits_and_results_round_trip(url):
    store = Store.open(url)
    split = Split("toy", "test", np.arange(40) * 3, np.arange(40) % 4, list("abcd"), {"kind": "toy"})
    record = store.put_split(split)
    assert record.ids.tolist() == split.ids.tolist() and record.class_names == list("abcd")
    put(store, "datasets/toy/test/ids/c/0", b"garbage")
    with pytest.raises(DiffstoreError, match="cannot be read|do not match"):
        Store.open(url, "r").split("toy", "test")
    store.put_result("probe", "linear-abc", {"top1": 0.5})
    assert Store.open(url, "r").results("probe") == [{"top1": 0.5}]
    with pytest.raises(DiffstoreError, match="not allowed"):
        store.put_result("probe", "../escape", {})
