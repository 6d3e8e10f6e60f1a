"""The extractor: block tables, key invariance, determinism, resume after SIGKILL, early exit, bad input."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import subset
from diffstore.datasets import load_split
from diffstore.errors import DiffstoreError
from diffstore.extract import extract_features, forward_blocks, plan_extraction
from diffstore.models import load_model
from diffstore.noise import noise
from diffstore.store import Store

DS = [str(Path(sys.executable).parent / "diffstore")]


@pytest.fixture(scope="module")
def model(tiny_unet_dir):
    return load_model(str(tiny_unet_dir))


@pytest.fixture(scope="module")
def digits100():
    return subset(load_split("digits", "train"), 48)


def extract(tmp_path, model, split, name="s.zarr", batch_size=64, **kw):
    store = Store.open(str(tmp_path / name))
    args = dict(t="10,300", blocks="2,mid,9", pools="1,2,full") | kw
    plan = plan_extraction(store, model, split, **args)
    summary = extract_features(plan, batch_size=batch_size, show_progress=False)
    return {k: a.read() for k, a in plan.arrays.items()}, summary, store


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))


def test_block_table_is_forward_ordered_with_mid(model):
    table = model.blocks
    assert [b.index for b in table] == list(range(1, len(table) + 1))
    assert table[1].module == "conv_in" and table[table.mid].module == "mid_block"
    assert table.resolve("mid,1") == [1, table.mid]
    assert table[table.mid].height == 4 and table[len(table)].height == 16


def test_unknown_block_lists_valid_ones(model):
    with pytest.raises(DiffstoreError, match=r"valid blocks are 1\.\.15.*mid"):
        model.blocks.resolve("3,nope")
    with pytest.raises(DiffstoreError, match="out of range"):
        model.blocks[99]


def test_noise_is_independent_of_batch_composition():
    a = noise(0, [3, 5, 8], 90, 0, (1, 4, 4))
    np.testing.assert_array_equal(a[1], noise(0, [5], 90, 0, (1, 4, 4))[0])
    assert not torch.equal(a[0], noise(1, [3], 90, 0, (1, 4, 4))[0])
    assert not torch.equal(a[0], noise(0, [3], 91, 0, (1, 4, 4))[0])
    assert not torch.equal(a[0], noise(0, [3], 90, 1, (1, 4, 4))[0])


def test_batch_size_7_and_64_give_identical_arrays(tmp_path, model, digits100):
    a, _, _ = extract(tmp_path, model, digits100, "a.zarr", batch_size=7)
    b, _, _ = extract(tmp_path, model, digits100, "b.zarr", batch_size=64)
    assert_same(a, b)


def test_same_key_gives_identical_features_across_runs(tmp_path, model, digits100):
    a, _, _ = extract(tmp_path, model, digits100, "a.zarr")
    b, _, _ = extract(tmp_path, model, digits100, "b.zarr")
    assert_same(a, b)
    assert a[(10, 2, "2")].dtype == np.float16 and a[(10, 2, "full")].shape == (48, 16, 16, 16)


def test_rerun_is_a_noop(tmp_path, model, digits100):
    _, first, store = extract(tmp_path, model, digits100)
    _, second, _ = extract(tmp_path, model, digits100)
    assert first["tasks_run"] == first["tasks_total"] > 0 and second["tasks_run"] == 0


def test_pools_are_averages_of_the_full_map(tmp_path, model, digits100):
    a, _, _ = extract(tmp_path, model, digits100, storage_dtype="float32")
    full = a[(300, 2, "full")]
    np.testing.assert_allclose(a[(300, 2, "1")][:, :, 0, 0], full.mean(axis=(2, 3)), rtol=1e-4, atol=1e-5)


def test_settings_that_change_values_change_features(tmp_path, model, digits100):
    base, _, _ = extract(tmp_path, model, digits100, "base.zarr", t="300", blocks="mid", pools="1")
    for i, kw in enumerate([dict(noise_seed=1), dict(noise_draws=2), dict(input_mode="clean"), dict(compute_dtype="bfloat16")]):
        other, _, _ = extract(tmp_path, model, digits100, f"o{i}.zarr", t="300", blocks="mid", pools="1", **kw)
        assert not np.array_equal(base[(300, model.blocks.mid, "1")], other[(300, model.blocks.mid, "1")]), kw


def test_t0_noised_equals_clean_input(tmp_path, model, digits100):
    a, _, _ = extract(tmp_path, model, digits100, "a.zarr", t="0", input_mode="noised")
    b, _, _ = extract(tmp_path, model, digits100, "b.zarr", t="0", input_mode="clean")
    assert_same(a, b)


def test_random_init_gives_a_different_model_key(tiny_unet_dir, model, tmp_path, digits100):
    rnd = load_model(str(tiny_unet_dir), random_init=0)
    assert "random-init" in rnd.name and rnd.name != model.name
    assert rnd.fingerprint != model.fingerprint
    assert rnd.fingerprint == load_model(str(tiny_unet_dir), random_init=0).fingerprint
    assert load_model(str(tiny_unet_dir), random_init=1).fingerprint != rnd.fingerprint


def test_early_exit_skips_later_modules(model):
    fired = []
    handle = model.module.get_submodule("up_blocks.0").register_forward_hook(lambda *a: fired.append(1))
    try:
        x0 = torch.zeros(4, 1, 16, 16)
        forward_blocks(model, x0, 10, np.arange(4), None, 0, 1, "noised", [model.blocks.mid], ["1"])
        assert fired == []
        forward_blocks(model, x0, 10, np.arange(4), None, 0, 1, "noised", [len(model.blocks)], ["1"])
        assert fired
    finally:
        handle.remove()


@pytest.mark.parametrize("kw, match", [
    (dict(t="1000"), r"t must be in \[0, 999\]"),
    (dict(blocks="2,down9.9"), "unknown block"),
    (dict(pools="8"), "larger than block"),
    (dict(pools="two"), "positive integers"),
    (dict(input_mode="latent"), "--input"),
    (dict(dtype="int8"), "--dtype"),
])
def test_bad_input_is_refused_and_store_untouched(tmp_path, model, digits100, kw, match):
    _, _, store = extract(tmp_path, model, digits100, blocks="mid", pools="1", t="10")
    before = sorted(str(p) for p in (tmp_path / "s.zarr").rglob("*"))
    args = dict(t="10", blocks="mid", pools="1") | {k: v for k, v in kw.items() if k != "dtype"}
    with pytest.raises(DiffstoreError, match=match):
        plan_extraction(store, model, digits100, storage_dtype=kw.get("dtype", "float16"), **args)
    assert sorted(str(p) for p in (tmp_path / "s.zarr").rglob("*")) == before


def test_model_that_does_not_load_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffstoreError, match="config.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text('{"_class_name": "UNet2DModel", "block_out_channels": "bad"}')
    with pytest.raises(DiffstoreError):
        load_model(str(tmp_path / "empty"))


def test_unadaptable_channels_are_refused(tmp_path, digits100):
    from conftest import build_tiny_unet

    build_tiny_unet(channels=2).save_pretrained(tmp_path / "two")
    with pytest.raises(DiffstoreError, match="2-channel input"):
        plan_extraction(Store.open(str(tmp_path / "s.zarr")), load_model(str(tmp_path / "two")), digits100, "10", "mid", "1")
    assert not (tmp_path / "s.zarr" / "features").exists()


def shard_mtimes(store_dir: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in store_dir.rglob("x/c/*/0/0/0")}


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, tiny_unet_dir, model):
    args = ["extract", "--store", str(tmp_path / "killed.zarr"), "--model", str(tiny_unet_dir), "--split", "test",
            "--t", "10,150,500", "--blocks", "2,mid", "--pools", "1,full", "--shard-rows", "16", "-q"]
    proc = subprocess.Popen(DS + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done_dir = tmp_path / "killed.zarr" / "features"
    deadline = time.time() + 120
    while not list(done_dir.rglob("done/c/*")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = Store.open(str(tmp_path / "killed.zarr"), mode="r")
    masks = [store.features(k).done_mask() for k in store.feature_keys()]
    assert any(m.any() for m in masks) and not all(m.all() for m in masks), "the kill must land mid-extraction"
    before = shard_mtimes(done_dir)
    done_files = {p for p in before if store.open_array(p.split(str(tmp_path / "killed.zarr") + "/")[1].split("/x/")[0]).done_mask()[int(p.split("/x/c/")[1].split("/")[0])]}
    resumed = subprocess.run(DS + args, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    after = shard_mtimes(done_dir)
    assert all(after[p] == before[p] for p in done_files), "done shards must not be rewritten"
    full = subprocess.run(DS + [a if a != str(tmp_path / "killed.zarr") else str(tmp_path / "full.zarr") for a in args],
                          capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    a, b = Store.open(str(tmp_path / "killed.zarr"), mode="r"), Store.open(str(tmp_path / "full.zarr"), mode="r")
    assert a.feature_keys() == b.feature_keys() and len(a.feature_keys()) == 12
    for k in a.feature_keys():
        assert a.features(k).complete
        np.testing.assert_array_equal(a.features(k).read(), b.features(k).read(), err_msg=k.path)
