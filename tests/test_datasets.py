"""Dataset loaders on small real data: order, ids, labels, class names, fingerprints and refusals."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from diffstore import datasets
from diffstore.datasets import CIFAR10_CLASSES, FASHION_CLASSES, load_split
from diffstore.errors import DiffstoreError
from diffstore.preprocess import Preprocess


def test_digits_split_is_fixed_and_in_sklearn_order():
    train, test = load_split("digits", "train"), load_split("digits", "test")
    assert (len(train), len(test)) == (1437, 360)
    np.testing.assert_array_equal(np.concatenate([train.ids, test.ids]), np.arange(1797))
    np.testing.assert_array_equal(np.concatenate([train.labels, test.labels]), load_digits().target)
    images = test.load([0, 359])
    assert images.shape == (2, 8, 8) and images.dtype == np.uint8 and images.max() == 255


def test_digits_fingerprint_is_stable_and_tracks_preprocess_and_split():
    p = Preprocess(size=32, channels=3)
    first, again = load_split("digits", "train"), load_split("digits", "train")
    assert first.fingerprint(p) == again.fingerprint(p)
    others = {first.fingerprint(q) for q in (Preprocess(32, 1), Preprocess(64, 3), Preprocess(32, 3, flip=True))}
    assert first.fingerprint(p) not in others and len(others) == 3
    assert load_split("digits", "test").fingerprint(p) != first.fingerprint(p)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_split_keeps_file_order_labels_and_pixels(name, idx_root, shared_data):
    real = shared_data(name)
    with gzip.open(real / "train-labels-idx1-ubyte.gz") as f:
        real_labels = np.frombuffer(f.read(8 + 50)[8:], np.uint8)
    with gzip.open(real / "train-images-idx3-ubyte.gz") as f:
        real_images = np.frombuffer(f.read(16 + 50 * 784)[16:], np.uint8).reshape(50, 28, 28)
    train = load_split(name, "train", idx_root[name])
    np.testing.assert_array_equal(train.ids, np.arange(50))  # the fixture keeps 50 train, 30 test records
    np.testing.assert_array_equal(train.labels, real_labels)
    np.testing.assert_array_equal(train.load([49, 0]), real_images[[49, 0]])
    assert train.class_names == ([str(i) for i in range(10)] if name == "mnist" else FASHION_CLASSES)
    assert len(load_split(name, "test", idx_root[name])) == 30
    assert train.source["root"] == str(idx_root[name].resolve())


@pytest.mark.parametrize("name, min_per_class", [("mnist", 892), ("fashion-mnist", 1000)])
def test_real_test_file_header_and_labels_are_read_in_full(name, min_per_class, shared_data):
    test = load_split(name, "test", shared_data(name))
    assert len(test) == 10000 and np.bincount(test.labels).min() == min_per_class
    assert test.load([9999]).shape == (1, 28, 28)


def test_truncated_or_mislabelled_idx_file_is_refused_naming_it(idx_root, tmp_path):
    root = shutil.copytree(idx_root["mnist"], tmp_path / "mnist")
    images = root / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(DiffstoreError, match="train-images-idx3-ubyte.gz is truncated"):
        load_split("mnist", "train", root)
    labels = root / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-5])
    with pytest.raises(DiffstoreError, match="t10k-labels-idx1-ubyte.gz"):
        load_split("mnist", "test", root)
    shutil.copy(root / "train-labels-idx1-ubyte.gz", images)  # a labels file where the images belong
    with pytest.raises(DiffstoreError, match="train-images-idx3-ubyte.gz is not an IDX file"):
        load_split("mnist", "train", root)


def test_data_root_comes_from_env_var_then_system_default(idx_root, tmp_path, monkeypatch):
    monkeypatch.delenv(datasets.DATA_ENV, raising=False)
    monkeypatch.setattr(datasets, "SYSTEM_ROOTS", {"fashion-mnist": str(tmp_path / "absent")})
    with pytest.raises(DiffstoreError, match="--data-root DIR, or set DIFFSTORE_DATA"):
        load_split("fashion-mnist", "train")
    monkeypatch.setattr(datasets, "SYSTEM_ROOTS", {"fashion-mnist": str(idx_root["fashion-mnist"])})
    assert load_split("fashion-mnist", "train").source["root"] == str(idx_root["fashion-mnist"].resolve())
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "fashion-mnist").symlink_to(idx_root["mnist"])  # the env var wins over the default
    monkeypatch.setenv(datasets.DATA_ENV, str(tmp_path / "data"))
    assert load_split("fashion-mnist", "train").source["root"] == str(idx_root["mnist"].resolve())
    with pytest.raises(DiffstoreError, match="mnist-absent"):
        load_split("mnist", "train", tmp_path / "mnist-absent")


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_binary_and_folder_layouts_give_the_same_samples(split, cifar_jpg_root, cifar_bin_root):
    folder = load_split("cifar10", split, cifar_jpg_root)
    binary = load_split("cifar10", split, cifar_bin_root)  # found under cifar-10-batches-bin/
    direct = load_split("cifar10", split, cifar_bin_root / "cifar-10-batches-bin")
    assert folder.class_names == binary.class_names == CIFAR10_CLASSES
    assert len(folder) == len(binary) == 20
    np.testing.assert_array_equal(np.bincount(folder.labels), np.full(10, 2))
    np.testing.assert_array_equal(folder.labels, binary.labels)
    rows = np.array([19, 0, 7])  # spans several binary batches on train
    np.testing.assert_array_equal(binary.load(rows), np.stack(folder.load(rows)))
    np.testing.assert_array_equal(direct.load(rows), binary.load(rows))
    assert binary.load(rows).shape == (3, 32, 32, 3)
    p = Preprocess(32, 3)
    assert folder.fingerprint(p) != binary.fingerprint(p) == direct.fingerprint(p)


def test_truncated_cifar_batch_or_unknown_layout_is_refused(cifar_bin_root, tmp_path):
    bin_dir = shutil.copytree(cifar_bin_root / "cifar-10-batches-bin", tmp_path / "bin")
    (bin_dir / "test_batch.bin").write_bytes((bin_dir / "test_batch.bin").read_bytes()[:-1])
    with pytest.raises(DiffstoreError, match="test_batch.bin is truncated"):
        load_split("cifar10", "test", bin_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffstoreError, match="no CIFAR-10 data"):
        load_split("cifar10", "train", tmp_path / "empty")


def test_imagefolder_sorts_classes_across_splits_and_paths_within(imagefolder_root):
    train = load_split("imagefolder", "train", imagefolder_root)
    test = load_split("imagefolder", "test", imagefolder_root)
    assert train.class_names == test.class_names == ["bird", "cat", "dog"]
    np.testing.assert_array_equal(train.ids, [0, 1, 2, 3])  # cat/a.jpg, cat/b.png, dog/broken.jpg, dog/c.jpg
    np.testing.assert_array_equal(train.labels, [1, 1, 2, 2])
    np.testing.assert_array_equal(test.labels, [0])
    rgb, grey, _ = train.load([0, 1, 3])
    assert rgb.shape == (32, 32, 3) and grey.shape == (30, 40) and grey.dtype == np.uint8


def test_corrupt_image_is_named_and_skip_bad_records_its_id(imagefolder_root):
    strict = load_split("imagefolder", "train", imagefolder_root)
    with pytest.raises(DiffstoreError, match=r"dog/broken\.jpg .*--skip-bad"):
        strict.load([3, 2])
    lenient = load_split("imagefolder", "train", imagefolder_root, skip_bad=True)
    assert lenient.skipped == [2]
    np.testing.assert_array_equal(lenient.ids, [0, 1, 3])  # the other ids do not move
    np.testing.assert_array_equal(lenient.labels, [1, 1, 2])
    np.testing.assert_array_equal(lenient.load([2])[0], strict.load([3])[0])
    p = Preprocess(32, 3)
    assert lenient.fingerprint(p) != strict.fingerprint(p)


def test_preprocess_runs_on_every_loader(idx_root, cifar_jpg_root, cifar_bin_root, imagefolder_root):
    cases = [("digits", None), ("mnist", idx_root["mnist"]), ("fashion-mnist", idx_root["fashion-mnist"]),
             ("cifar10", cifar_jpg_root), ("cifar10", cifar_bin_root), ("imagefolder", imagefolder_root)]
    for name, root in cases:
        split = load_split(name, "train", root, skip_bad=True)
        x = Preprocess(size=32, channels=3)(split.load(np.arange(3)))
        assert x.shape == (3, 3, 32, 32) and x.min() >= -1 and x.max() <= 1 and x.std() > 0.1, name
        assert split.name == name and split.name.replace("-", "").isalnum()  # a safe store path segment
        assert json.loads(json.dumps(split.source)) == split.source


@pytest.mark.parametrize("name", ["mnist", "cifar10", "imagefolder"])
def test_data_root_is_left_out_of_the_key(name, idx_root, cifar_bin_root, imagefolder_root, tmp_path):
    """The same files under another path (a colleague's checkout) give the same fingerprint; other files do not."""
    src = {"mnist": idx_root["mnist"], "cifar10": cifar_bin_root, "imagefolder": imagefolder_root}[name]
    here = load_split(name, "train", src, skip_bad=True)
    there = load_split(name, "train", shutil.copytree(src, tmp_path / "b"), skip_bad=True)
    p = Preprocess(32, 3)
    assert here.source["root"] != there.source["root"] and here.fingerprint(p) == there.fingerprint(p)
    change_one_train_file(name, tmp_path / "b")
    assert load_split(name, "train", tmp_path / "b", skip_bad=True).fingerprint(p) != here.fingerprint(p)


def change_one_train_file(name, root):
    """One label relabelled (mnist, cifar10), or one image one byte longer (imagefolder)."""
    if name == "imagefolder":
        image = root / "train" / "cat" / "a.jpg"
        image.write_bytes(image.read_bytes() + b"\0")
        return
    path = root / ("train-labels-idx1-ubyte.gz" if name == "mnist" else "cifar-10-batches-bin/data_batch_1.bin")
    raw = bytearray(gzip.decompress(path.read_bytes()) if name == "mnist" else path.read_bytes())
    at = len(raw) - 1 if name == "mnist" else 0  # mnist: the last label; cifar: the first record's label byte
    raw[at] = (raw[at] + 1) % 10
    path.write_bytes(gzip.compress(bytes(raw)) if name == "mnist" else bytes(raw))


def test_preprocess_resizes_the_short_side_bicubic_then_center_crops():
    """A 60x40 (w x h) RGB image of random pixels to 20x20: resize to 30x20 with bicubic, keep columns 5..24."""
    rgb = np.random.default_rng(0).integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(rgb).resize((30, 20), Image.BICUBIC))[:, 5:25].astype(np.float32) / 127.5 - 1
    got = Preprocess(20, 3)([rgb])
    assert got.shape == (1, 3, 20, 20) and got.dtype == torch.float32
    np.testing.assert_allclose(got[0].numpy(), want.transpose(2, 0, 1), atol=1e-6)
    # tall images crop rows; the flip view mirrors the columns of the same crop
    tall = rgb.transpose(1, 0, 2).copy()  # 40 x 60 (w x h)
    want_tall = np.asarray(Image.fromarray(tall).resize((20, 30), Image.BICUBIC))[5:25].astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(Preprocess(20, 3)([tall])[0].numpy(), want_tall.transpose(2, 0, 1), atol=1e-6)
    np.testing.assert_array_equal(Preprocess(20, 3, flip=True)([rgb])[0].numpy(), got[0].numpy()[:, :, ::-1])


def test_preprocess_converts_channels_and_scales_to_minus_one_one():
    """Grey -> RGB repeats the grey value; RGB -> grey is ITU-R 601 luma (299 R + 587 G + 114 B) / 1000;
    0 -> -1 and 255 -> 1. An image already at the output size is not resampled."""
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    np.testing.assert_allclose(Preprocess(8, 1)([red]).numpy(), np.full((1, 1, 8, 8), 76 / 127.5 - 1), atol=1e-6)
    as_rgb = Preprocess(8, 3)([grey]).numpy()
    np.testing.assert_allclose(as_rgb, np.broadcast_to(grey / 127.5 - 1, (1, 3, 8, 8)), atol=1e-6)
    extremes = Preprocess(8, 1)([np.full((8, 8), 0, np.uint8), np.full((8, 8), 255, np.uint8)]).numpy()
    assert extremes[0].max() == -1 and extremes[1].min() == 1
    single = Preprocess(8, 1)([grey[:, :, None]]).numpy()  # HxWx1 is grey too
    np.testing.assert_allclose(single[0, 0], grey / 127.5 - 1, atol=1e-6)
