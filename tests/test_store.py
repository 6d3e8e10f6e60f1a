"""The key and the store: fingerprints, refusals, resume bookkeeping, verify, ls/info."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import feature_array
from diffstore.datasets import load_split
from diffstore.errors import DiffstoreError
from diffstore.extract import extract_features, plan_extraction
from diffstore.key import FeatureKey, Recipe, canonical_json, fingerprint, model_fingerprint, select, sha256_files
from diffstore.preprocess import Preprocess
from diffstore.store import Store
from diffstore.store.verify import verify_store

KEY = FeatureKey("digits", "train", "m", "noised", 90, 5, "2")
RECIPE = Recipe("mfp", "dfp", 0, 1, "float32", "float16")


def make_array(store, key=KEY, recipe=RECIPE, n=40, shard_rows=16, rows=None):
    return feature_array(store, key, recipe, (3, 2, 2), n, shard_rows, rows=rows)


def test_same_inputs_give_same_fingerprint():
    assert RECIPE.fingerprint(KEY) == Recipe("mfp", "dfp", 0, 1, "float32", "float16").fingerprint(KEY)
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})


def test_every_recipe_field_changes_the_fingerprint():
    base = RECIPE.fingerprint(KEY)
    for change in [dict(model_fingerprint="x"), dict(dataset_fingerprint="x"), dict(noise_seed=1), dict(noise_draws=2),
                   dict(compute_dtype="bfloat16"), dict(storage_dtype="float32"), dict(extractor_version="0")]:
        assert Recipe(**{**RECIPE.to_dict(), **change}).fingerprint(KEY) != base, change


@pytest.mark.parametrize("batch_size, shard_rows", [(7, 16), (64, 48), (100, None)])
def test_batch_size_and_shard_size_change_neither_key_nor_values(tmp_path, model, digits100, batch_size, shard_rows):
    """Against batch 16 / shard 32: the same names and fingerprints, bit-identical values (100 rows, so the
    last micro-batch is padded and shards end mid-batch)."""
    def extract(name, batch_size, shard_rows):
        store = Store.open(str(tmp_path / name))
        plan = plan_extraction(store, model, digits100, t="10,300", blocks="2,mid", pools="1,full",
                               shard_rows=shard_rows)
        extract_features(plan, batch_size=batch_size, show_progress=False)
        return {a.path: (a.attrs["fingerprint"], a.shard_rows, a.read()) for a in store.arrays()}

    base, other = extract("base.zarr", 16, 32), extract("other.zarr", batch_size, shard_rows)
    assert base.keys() == other.keys() and len(base) == 8
    for path, (fp, rows, x) in base.items():
        assert other[path][0] == fp and other[path][1] == (shard_rows or other[path][1]) != rows
        np.testing.assert_array_equal(other[path][2], x, err_msg=path)


def test_changed_weight_bytes_change_model_fingerprint(tmp_path):
    w = tmp_path / "w.safetensors"
    w.write_bytes(b"weights-v1")
    a = model_fingerprint(sha256_files([w]), {"arch": 1})
    w.write_bytes(b"weights-v2")
    assert model_fingerprint(sha256_files([w]), {"arch": 1}) != a
    assert model_fingerprint(sha256_files([w]), {"arch": 2}) != model_fingerprint(sha256_files([w]), {"arch": 1})


def test_fingerprint_refuses_non_json_values():
    with pytest.raises(TypeError):
        canonical_json({"x": object()})
    with pytest.raises(TypeError):
        canonical_json({"x": np.float32(1.0)})


def test_dataset_fingerprint_depends_on_preprocessing_and_order():
    split = load_split("digits", "test")
    a = split.fingerprint(Preprocess(16, 1))
    assert a == load_split("digits", "test").fingerprint(Preprocess(16, 1))
    assert a != split.fingerprint(Preprocess(16, 3)) != split.fingerprint(Preprocess(16, 1, flip=True))
    split.ids = split.ids[::-1].copy()
    assert split.fingerprint(Preprocess(16, 1)) != a


def test_key_path_round_trip_and_selector():
    assert FeatureKey.from_path(KEY.path) == KEY
    other = FeatureKey("digits", "train", "m", "noised", 10, 5, "2")
    assert select([KEY, other], "t=90/b=5") == [KEY]
    assert select([KEY, other], "b=5/p=2") == [KEY, other]
    with pytest.raises(ValueError):
        select([KEY], "time=90")


def test_other_fingerprint_is_refused_and_store_untouched(tmp_path):
    store = Store.open(str(tmp_path / "s.zarr"))
    a = make_array(store)
    a.write_shard(0, np.ones((16, 3, 2, 2)))
    before = a.read(slice(0, 16))
    with pytest.raises(DiffstoreError, match="noise_seed: stored 0, requested 1"):
        make_array(store, recipe=Recipe("mfp", "dfp", 1, 1, "float32", "float16"))
    with pytest.raises(DiffstoreError, match="another fingerprint"):
        make_array(store, recipe=Recipe("other-weights", "dfp", 0, 1, "float32", "float16"))
    again = store.features(KEY)
    np.testing.assert_array_equal(again.read(slice(0, 16)), before)
    assert again.done_mask().tolist() == [True, False, False]


def test_same_fingerprint_reopens_for_resume(tmp_path):
    store = Store.open(str(tmp_path / "s.zarr"))
    make_array(store).write_shard(1, np.full((16, 3, 2, 2), 2.0))
    a = make_array(store)  # same key and recipe: reopened, not recreated
    assert a.missing() == [0, 2] and not a.complete
    assert a.shard_slice(2) == slice(32, 40)
    assert a.write_shard(1, np.zeros((16, 3, 2, 2))) is False  # done (e.g. by another writer): skipped, kept
    a.write_shard(0, np.zeros((16, 3, 2, 2)))
    a.write_shard(2, np.zeros((8, 3, 2, 2)))
    assert a.complete and float(a.read()[16:32].mean()) == 2.0


def test_non_store_paths_are_refused(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hi")
    with pytest.raises(DiffstoreError, match="non-empty directory"):
        Store.open(str(tmp_path / "notes"))
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(DiffstoreError, match="not a diffstore store"):
        Store.open(str(tmp_path / "plain.zarr"))
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(DiffstoreError, match="is a file"):
        Store.open(str(tmp_path / "file.zarr"))
    with pytest.raises(DiffstoreError, match="no diffstore store"):
        Store.open(str(tmp_path / "missing.zarr"), mode="r")
    assert (tmp_path / "notes" / "a.txt").read_text() == "hi"


def test_missing_filesystem_library_is_named(monkeypatch):
    import fsspec  # noqa: F401  (loads fsspec.registry, whose module `fsspec.registry` the package attribute shadows)

    with pytest.raises(DiffstoreError, match="pip install"):
        Store.open("nosuchproto://bucket/x.zarr")
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if s3fs were not installed: importing it fails
    # the class, cached once imported
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "s3", raising=False)
    with pytest.raises(DiffstoreError, match=r"s3://.*pip install s3fs"):
        Store.open("s3://bucket/x.zarr")


def test_split_ids_stored_once_and_other_ids_refused(tmp_path):
    store = Store.open(str(tmp_path / "s.zarr"))
    split = load_split("digits", "test")
    rec = store.put_split(split)
    assert rec.labels.tolist() == split.labels.tolist() and rec.class_names == split.class_names
    split.ids = split.ids + 1
    with pytest.raises(DiffstoreError, match="other sample ids"):
        store.put_split(split)


def test_verify_catches_a_flipped_byte(tmp_path):
    store = Store.open(str(tmp_path / "s.zarr"))
    a = make_array(store)
    rng = np.random.default_rng(0)
    for i in range(3):
        sl = a.shard_slice(i)
        a.write_shard(i, rng.normal(size=(sl.stop - sl.start, 3, 2, 2)))
    assert verify_store(store) == ([], 1)
    shard_file = Path(tmp_path / "s.zarr" / KEY.path / "x" / "c" / "1" / "0" / "0" / "0")
    raw = bytearray(shard_file.read_bytes())
    raw[10] ^= 0xFF
    shard_file.write_bytes(bytes(raw))
    problems, _ = verify_store(Store.open(str(tmp_path / "s.zarr"), mode="r"))
    assert len(problems) == 1 and problems[0]["kind"] == "corrupt" and problems[0]["shards"] == [1]
    assert "checksum" in problems[0]["problem"] and "diffstore repair" in problems[0]["problem"]


def test_verify_accepts_a_partly_filled_array_and_reports_a_half_written_shard(tmp_path):
    store = Store.open(str(tmp_path / "s.zarr"))
    a = make_array(store)
    a.write_shard(0, np.zeros((16, 3, 2, 2)))  # shards 1 and 2 not extracted yet: a normal state (--limit 16)
    assert verify_store(store)[0] == []
    a.x[a.shard_slice(1)] = np.zeros((16, 3, 2, 2), np.float16)  # data written, done flag not: a killed writer
    problems, _ = verify_store(store)
    assert len(problems) == 1 and problems[0]["kind"] == "incomplete" and problems[0]["shards"] == [1]
    assert "shards [1] hold data but no done flag" in problems[0]["problem"]


def test_verify_reports_nan_rows_in_a_done_shard(tmp_path):
    store = Store.open(str(tmp_path / "s.zarr"))
    a = make_array(store, rows=np.zeros((40, 3, 2, 2)))
    assert verify_store(store) == ([], 1)
    a.x[20] = np.nan  # a row lost after its shard was marked done: checksums are valid, the values are not
    problems, checked = verify_store(Store.open(str(tmp_path / "s.zarr"), mode="r"))
    assert checked == 1 and [(p["array"], p["shards"]) for p in problems] == [(KEY.path, [1])]
    assert "shard 1 is marked done but holds NaN rows" in problems[0]["problem"]


def test_results_are_stored_next_to_features(tmp_path):
    store = Store.open(str(tmp_path / "s.zarr"))
    store.put_result("probe", "r1", {"acc": 0.5})
    store.put_result("probe", "r1", {"acc": 0.75})
    assert Store.open(str(tmp_path / "s.zarr"), mode="r").results("probe") == [{"acc": 0.75}]


def test_layout_is_readable_without_diffstore(tmp_path):
    store = Store.open(str(tmp_path / "s.zarr"))
    a = make_array(store)
    for i in range(3):
        a.write_shard(i, np.ones((len(range(40)[a.shard_slice(i)]), 3, 2, 2)))
    x = zarr.open_array(str(tmp_path / "s.zarr"), path=KEY.path + "/x", mode="r")
    assert x.shape == (40, 3, 2, 2) and float(x[0, 0, 0, 0]) == 1.0
    assert json.loads((tmp_path / "s.zarr" / KEY.path / "zarr.json").read_text())["attributes"]["key"]["t"] == 90
    assert a.to_dask().sum().compute() == 40 * 12
