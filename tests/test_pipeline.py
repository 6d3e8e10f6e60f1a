"""The extraction pipeline: loader workers and the background writer give the bits of a plain serial forward; the
micro-batch (and attention, compile) are recipe fields that leave older stores' fingerprints alone; a finished
extraction is recognised from one listing; a failed write never marks a shard done."""

import numpy as np
import pytest
import torch

from conftest import subset
from diffstore.datasets import load_split
from diffstore.errors import DiffstoreError
from diffstore.extract import done_masks, extract_features, forward_blocks, plan_extraction, run_task
from diffstore.key import LEGACY_FORWARD, FeatureKey, Recipe, fingerprint
from diffstore.models import load_model
from diffstore.noise import add_noise, noise, noised
from diffstore.preprocess import Preprocess
from diffstore.store import ShardedArray, Store

ARGS = dict(t="10,300", blocks="2,mid", pools="1,full")


@pytest.fixture(scope="module")
def model(tiny_unet_dir):
    return load_model(str(tiny_unet_dir))


@pytest.fixture(scope="module")
def digits():
    return subset(load_split("digits", "test"), 56)  # not a multiple of 16: the last micro-batch is padded


def run(tmp_path, model, split, name, workers=0, batch_size=64, **kw):
    plan = plan_extraction(Store.open(str(tmp_path / name)), model, split, **(ARGS | dict(shard_rows=32) | kw))
    summary = extract_features(plan, batch_size=batch_size, show_progress=False, workers=workers)
    return {k: a.read() for k, a in plan.arrays.items()}, summary, plan


def serial_forward(model, split, micro_batch=16) -> dict:
    """What the store must hold: forward_blocks over the whole split in this process (noise drawn here),
    cast by numpy."""
    x0 = Preprocess(model.image_size, model.image_channels)(split.load(np.arange(len(split))))
    blocks = model.blocks.resolve(ARGS["blocks"])
    out = {}
    for t in (10, 300):
        f = forward_blocks(model, x0, t, split.ids, split.labels, 0, 1, "noised", blocks, ["1", "full"],
                           micro_batch=micro_batch)
        out.update({(t, b, p): v.numpy().astype(np.float16) for (b, p), v in f.items()})
    return out


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))


def test_loader_workers_and_batch_sizes_give_the_bits_of_a_serial_forward(tmp_path, model, digits):
    reference = serial_forward(model, digits)
    in_process, _, _ = run(tmp_path, model, digits, "w0.zarr", workers=0, batch_size=16)
    two_workers, _, _ = run(tmp_path, model, digits, "w2.zarr", workers=2, batch_size=48)
    assert_same(in_process, reference)
    assert_same(two_workers, reference)


def test_rgb_images_through_workers_give_the_bits_of_the_per_image_pil_path(tmp_path, cifar_bin_root):
    from conftest import build_tiny_unet

    build_tiny_unet(size=32, channels=3).save_pretrained(tmp_path / "rgb")
    model = load_model(str(tmp_path / "rgb"))
    split = load_split("cifar10", "test", str(cifar_bin_root))
    stored, _, plan = run(tmp_path, model, split, "rgb.zarr", workers=1, t="300", blocks="2", pools="1")
    images = split.load(np.arange(len(split)))  # preprocessed image by image through PIL, as diffstore always did
    x0 = torch.from_numpy(np.stack([plan.preprocess.one(im) for im in images]))
    direct = forward_blocks(model, x0, 300, split.ids, split.labels, 0, 1, "noised", [2], ["1"])[(2, "1")]
    np.testing.assert_array_equal(stored[(300, 2, "1")], direct.numpy().astype(np.float16))


def test_micro_batch_is_a_recipe_field_and_batch_size_still_does_not_matter(tmp_path, model, digits):
    a, summary, plan = run(tmp_path, model, digits, "a.zarr", micro_batch=8, batch_size=8)
    b, _, _ = run(tmp_path, model, digits, "b.zarr", micro_batch=8, batch_size=40, workers=1)
    assert summary["micro_batch"] == plan.recipe.micro_batch == 8
    assert_same(a, b)
    assert_same(a, serial_forward(model, digits, micro_batch=8))
    key = plan.key(10, plan.blocks[0], "1")
    arr = plan.arrays[(10, plan.blocks[0], "1")]
    assert arr.attrs["recipe"]["micro_batch"] == 8
    assert arr.attrs["fingerprint"] != Recipe.from_dict({**arr.attrs["recipe"], "micro_batch": 16}).fingerprint(key)


def test_recipe_at_legacy_forward_values_keeps_the_fingerprint_of_older_stores():
    key = FeatureKey("digits", "test", "m", "noised", 10, 2, "1")
    before = {"model_fingerprint": "mfp", "dataset_fingerprint": "dfp", "noise_seed": 0, "noise_draws": 1,
              "compute_dtype": "float32", "storage_dtype": "float16", "extractor_version": "1"}  # the fields stores had
    recipe = Recipe.from_dict(before)
    assert recipe.micro_batch == 16 and recipe.attention == "eager" and recipe.compile is False
    assert recipe.fingerprint(key) == fingerprint({"key": key.to_dict(), "recipe": before})
    for change in (dict(micro_batch=32), dict(attention="sdpa"), dict(compile=True)):
        assert Recipe(**{**recipe.to_dict(), **change}).fingerprint(key) != recipe.fingerprint(key), change


def test_store_written_before_the_forward_fields_resumes_bit_identical(tmp_path, model, digits):
    url = str(tmp_path / "old.zarr")
    plan = plan_extraction(Store.open(url), model, digits, **ARGS, shard_rows=16)
    for t in plan.ts:
        run_task(plan, t, 0, batch_size=16)
    for a in plan.arrays.values():  # as diffstore wrote attrs before micro_batch/attention/compile existed
        a.group.attrs["recipe"] = {k: v for k, v in a.attrs["recipe"].items() if k not in LEGACY_FORWARD}
    with pytest.raises(DiffstoreError, match="micro_batch: stored None, requested 8"):
        plan_extraction(Store.open(url), model, digits, **ARGS, micro_batch=8)
    resumed = plan_extraction(Store.open(url), model, digits, **ARGS)  # no forward options: what the store holds
    assert resumed.recipe.micro_batch == 16 and resumed.shard_rows == 16
    summary = extract_features(resumed, show_progress=False, workers=1)
    assert summary["tasks_run"] == summary["tasks_total"] - len(plan.ts)
    assert_same({k: a.read() for k, a in resumed.arrays.items()}, serial_forward(model, digits))


def test_shard_rows_off_the_micro_batch_partition_are_refused_before_writing(tmp_path, model, digits):
    with pytest.raises(DiffstoreError, match=r"positive multiple of the micro-batch \(32\)"):
        plan_extraction(Store.open(str(tmp_path / "s.zarr")), model, digits, **ARGS, micro_batch=32, shard_rows=48)
    assert not (tmp_path / "s.zarr" / "features").exists()


def test_finished_extraction_is_recognised_without_reading_a_done_flag(tmp_path, model, digits, monkeypatch):
    url = str(tmp_path / "s.zarr")
    plan = plan_extraction(Store.open(url), model, digits, **ARGS, shard_rows=16)
    run_task(plan, 300, 1, batch_size=16)
    assert {k: list(m) for k, m in done_masks(plan.arrays).items()} == {k: list(a.done_mask())
                                                                        for k, a in plan.arrays.items()}
    extract_features(plan, show_progress=False, workers=0)

    def forbidden(*_a, **_k):
        raise AssertionError("a no-op re-run read a done flag chunk")

    monkeypatch.setattr(ShardedArray, "done_mask", forbidden)
    monkeypatch.setattr(ShardedArray, "is_done", forbidden)
    again = plan_extraction(Store.open(url), model, digits, **ARGS)
    assert extract_features(again, show_progress=False)["tasks_run"] == 0


def test_failed_write_is_raised_and_never_marks_its_shard_done(tmp_path, model, digits, monkeypatch):
    url = str(tmp_path / "s.zarr")
    plan = plan_extraction(Store.open(url), model, digits, **ARGS, shard_rows=16)
    victim = plan.arrays[(300, plan.blocks[-1], "full")]
    write = ShardedArray.write_shard

    def disk_full(self, i, data):
        if self.path == victim.path and i == 2:
            raise OSError(28, "No space left on device")
        write(self, i, data)

    monkeypatch.setattr(ShardedArray, "write_shard", disk_full)
    with pytest.raises(OSError, match="No space left"):
        extract_features(plan, show_progress=False, workers=1)
    assert not victim.done_mask()[2]
    monkeypatch.setattr(ShardedArray, "write_shard", write)
    resumed = plan_extraction(Store.open(url), model, digits, **ARGS)
    extract_features(resumed, show_progress=False)
    assert_same({k: a.read() for k, a in resumed.arrays.items()}, serial_forward(model, digits))


def test_noise_added_in_the_loader_equals_add_noise_of_noise():
    x0 = torch.randn(5, 3, 8, 8)
    ids = [4, 1, 9, 2, 7]
    for abar in (0.9999, 0.37, 0.0042):
        np.testing.assert_array_equal(noised(x0, 3, ids, 40, 1, abar),
                                      add_noise(x0, noise(3, ids, 40, 1, (3, 8, 8)), abar))


@pytest.mark.parametrize("channels, shape",
                         [(3, (4, 16, 16, 3)), (1, (4, 16, 16)), (3, (4, 16, 16)), (1, (4, 16, 16, 3))])
def test_batched_preprocessing_equals_the_pil_path(channels, shape):
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    pre = Preprocess(size=16, channels=channels)
    by_pil = np.stack([pre.one(im) for im in images])
    for batched in (pre(images), pre(list(images))):
        for layout in (torch.contiguous_format, torch.channels_last):  # the layout the forward always saw
            expected = torch.from_numpy(by_pil).is_contiguous(memory_format=layout)
            assert batched.is_contiguous(memory_format=layout) == expected
        np.testing.assert_array_equal(batched.numpy(), by_pil)


def test_attention_option_exists_only_where_the_model_can_switch(tmp_path, model, digits):
    with pytest.raises(DiffstoreError, match="one attention implementation"):
        plan_extraction(Store.open(str(tmp_path / "s.zarr")), model, digits, **ARGS, attention="sdpa")
    with pytest.raises(DiffstoreError, match="micro_batch= must be >= 1"):
        plan_extraction(Store.open(str(tmp_path / "s.zarr")), model, digits, **ARGS, micro_batch=0)
    assert not (tmp_path / "s.zarr" / "features").exists()


def test_compiled_layers_keep_hooks_and_values(tiny_unet_dir, digits):
    """Graph capture around the hooks, with dynamo's eager backend (inductor's C++ build takes minutes on a CPU): the
    hooked blocks still fire (StopForward included) and the values are the uncompiled ones bit for bit."""
    from diffstore.extract.forward import compile_blocks

    compiled = load_model(str(tiny_unet_dir))
    compile_blocks(compiled, backend="eager")
    x0 = Preprocess(compiled.image_size, 1)(digits.load(np.arange(20)))
    blocks = compiled.blocks.resolve("2,mid")
    a = forward_blocks(compiled, x0, 300, digits.ids[:20], None, 0, 1, "noised", blocks, ["1", "full"])
    b = forward_blocks(load_model(str(tiny_unet_dir)), x0, 300, digits.ids[:20], None, 0, 1, "noised", blocks,
                       ["1", "full"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_image_in_a_loader_worker_is_a_clear_error(tmp_path, model, imagefolder_root):
    split = load_split("imagefolder", "train", str(imagefolder_root))  # holds dog/broken.jpg (truncated)
    plan = plan_extraction(Store.open(str(tmp_path / "s.zarr")), model, split, t="10", blocks="mid", pools="1",
                           micro_batch=1)
    with pytest.raises(DiffstoreError, match="cannot decode image .*broken.jpg") as e:
        extract_features(plan, batch_size=1, show_progress=False, workers=1)  # 4 batches: one worker loads them
    assert "Traceback" not in str(e.value) and "--skip-bad" in str(e.value)
