"""The extractor: block tables, key invariance, determinism, resume after kill -9 or Ctrl-C, early exit, bad input."""

import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import Command, build_tiny_unet, digests, tree_state
from diffstore.cli import app
from diffstore.datasets import load_split
from diffstore.errors import DiffstoreError
from diffstore.extract import extract_features, forward_blocks, plan_extraction
from diffstore.models import load_model
from diffstore.noise import noise
from diffstore.store import Store


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
    """Every block's module, hooked: the order they fire in one full forward is the table's order."""
    fired = []
    handles = [model.module.get_submodule(b.module).register_forward_hook(lambda *_, b=b.index: fired.append(b))
               for b in model.blocks]
    try:
        with torch.no_grad():
            model.run(torch.zeros(2, 1, 16, 16), torch.tensor([10, 10]), None)
    finally:
        for h in handles:
            h.remove()
    table = model.blocks
    assert fired == [b.index for b in table] == list(range(1, 16))
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


def test_same_key_gives_identical_features_across_runs(tmp_path, model, digits100):
    a, _, _ = extract(tmp_path, model, digits100, "a.zarr")
    b, _, _ = extract(tmp_path, model, digits100, "b.zarr")
    assert_same(a, b)
    assert a[(10, 2, "2")].dtype == np.float16 and a[(10, 2, "full")].shape == (100, 16, 16, 16)


def test_rerun_is_a_noop(tmp_path, model, digits100):
    _, first, store = extract(tmp_path, model, digits100)
    _, second, _ = extract(tmp_path, model, digits100)
    assert first["tasks_run"] == first["tasks_total"] > 0 and second["tasks_run"] == 0


def test_pools_are_averages_of_the_full_map(tmp_path, model, digits100):
    a, _, _ = extract(tmp_path, model, digits100, dtype="float32")
    full = a[(300, 2, "full")]
    np.testing.assert_allclose(a[(300, 2, "1")][:, :, 0, 0], full.mean(axis=(2, 3)), rtol=1e-4, atol=1e-5)


def test_settings_that_change_values_change_features(tmp_path, model, digits100):
    base, _, _ = extract(tmp_path, model, digits100, "base.zarr", t="300", blocks="mid", pools="1")
    for i, kw in enumerate([dict(noise_seed=1), dict(noise_draws=2), dict(input="clean"),
                            dict(compute_dtype="bfloat16")]):
        other, _, _ = extract(tmp_path, model, digits100, f"o{i}.zarr", t="300", blocks="mid", pools="1", **kw)
        assert not np.array_equal(base[(300, model.blocks.mid, "1")], other[(300, model.blocks.mid, "1")]), kw


def test_t0_noised_equals_clean_input(tmp_path, model, digits100):
    a, _, _ = extract(tmp_path, model, digits100, "a.zarr", t="0", input="noised")
    b, _, _ = extract(tmp_path, model, digits100, "b.zarr", t="0", input="clean")
    assert_same(a, b)


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
    (dict(input="latent"), "input= must be one of noised, clean"),
    (dict(dtype="int8"), "dtype= must be one of float16, float32"),
    (dict(t="20", shard_rows=7), r"shard_rows= must be a positive multiple of the micro-batch \(16\), got 7"),
    (dict(t="20", shard_rows=-16), r"shard_rows= must be >= 1, got -16"),
])
def test_bad_input_is_refused_and_store_untouched(tmp_path, model, digits100, kw, match):
    _, _, store = extract(tmp_path, model, digits100, blocks="mid", pools="1", t="10")
    before = tree_state(tmp_path / "s.zarr")
    with pytest.raises(DiffstoreError, match=match):
        plan_extraction(store, model, digits100, **(dict(t="10", blocks="mid", pools="1") | kw))
    assert tree_state(tmp_path / "s.zarr") == before  # same files, same bytes, not even rewritten


def test_model_that_does_not_load_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffstoreError, match="config.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text('{"_class_name": "UNet2DModel", "block_out_channels": "bad"}')
    with pytest.raises(DiffstoreError):
        load_model(str(tmp_path / "empty"))


def test_unadaptable_channels_are_refused(tmp_path, digits100):
    build_tiny_unet(channels=2).save_pretrained(tmp_path / "two")
    with pytest.raises(DiffstoreError, match="2-channel input"):
        plan_extraction(Store.open(str(tmp_path / "s.zarr")), load_model(str(tmp_path / "two")), digits100, t="10",
                        blocks="mid", pools="1")
    assert not (tmp_path / "s.zarr" / "features").exists()


RESUME = dict(t="10,150,500", blocks="2,mid", pools="1,full")
LIMIT = 160  # 10 shards of 16 rows per array


@pytest.fixture(scope="module")
def uninterrupted(model, tmp_path_factory) -> dict:
    """The digits test rows [0, 160) extracted in this process, uninterrupted: what a resumed run must equal."""
    store = Store.open(str(tmp_path_factory.mktemp("ref") / "full.zarr"))
    extract_features(plan_extraction(store, model, load_split("digits", "test"), **RESUME, shard_rows=16,
                                     limit=str(LIMIT)), show_progress=False)
    return digests(store)


def done_shard_files(url: str) -> dict:
    """Shard file -> mtime_ns for every shard marked done."""
    store = Store.open(url, mode="r")
    return {f: Path(f).stat().st_mtime_ns for a in store.arrays() for i in np.flatnonzero(a.done_mask())
            for f in [f"{url}/{a.path}/x/c/{i}/0/0/0"]}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path, tiny_unet_dir, uninterrupted, sig):
    url = str(tmp_path / "killed.zarr")
    args = ["extract", "--store", url, "--model", str(tiny_unet_dir), "--split", "test", "--limit", str(LIMIT),
            "--shard-rows", "16", "-q", *(a for k, v in RESUME.items() for a in (f"--{k.replace('_', '-')}", v))]
    proc = Command(args)  # its own process (forked from one with torch imported), killed for real
    deadline = time.time() + 120
    # signalled once 2 of the 10 shards of each of the 12 arrays are done, so the re-run starts mid-way through
    # its work list (a resume that only works from the first shard fails)
    while len(list(Path(url).rglob("done/c/*"))) < 2 * 12 and proc.process.is_alive() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    proc.wait()
    if sig == signal.SIGINT:  # Ctrl-C: the shell's interrupt status, no traceback
        assert proc.returncode == 130 and "Traceback" not in proc.stderr and proc.stdout == "", proc.stderr
    else:
        assert proc.returncode == -signal.SIGKILL
    masks = [a.done_mask() for a in Store.open(url, mode="r").arrays()]
    assert any(m.any() for m in masks) and not all(m.all() for m in masks), "the signal must land mid-extraction"
    before = done_shard_files(url)
    resumed = CliRunner().invoke(app, args)  # the same command again (in this process: no second start-up)
    assert resumed.exit_code == 0, resumed.output
    assert {f: m for f, m in done_shard_files(url).items() if f in before} == before, "done shards are never rewritten"
    store = Store.open(url, mode="r")
    assert len(uninterrupted) == 12 and all(a.done_prefix() == LIMIT for a in store.arrays())
    assert digests(store) == uninterrupted
