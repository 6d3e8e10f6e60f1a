"""Augmented views stored as rows: a view's features equal extracting the transformed images; the identity view
equals the plain extraction; views are seeded, recorded in the key, and never mixed with the plain split."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from conftest import subset
from diffstore.datasets import load_split
from diffstore.errors import DiffstoreError
from diffstore.extract import extract_features, plan_extraction
from diffstore.preprocess import Preprocess
from diffstore.store import Store
from diffstore.views import View, view_set, view_split

ARGS = dict(t="10", blocks="2,mid", pools="2", shard_rows=48)


@pytest.fixture(scope="module")
def split():
    return subset(load_split("digits", "test"), 24)


def extract(url, model, data) -> dict:
    plan = plan_extraction(Store.open(str(url)), model, data, **ARGS)
    extract_features(plan, show_progress=False)
    return {k[1]: a.read() for k, a in plan.arrays.items()}


def test_a_flip_view_equals_extracting_the_flipped_images_and_view_0_the_plain_ones(tmp_path, model, split):
    views = view_split(split, "flip", 0, Preprocess(model.image_size, model.image_channels))
    assert views.split == "test+flip" and len(views) == 2 * len(split) and views.ids.tolist()[:4] == [
        split.ids[0], split.ids[0], split.ids[1], split.ids[1]]
    stored = extract(tmp_path / "v.zarr", model, views)
    flipped = replace(split, load=lambda r: [np.ascontiguousarray(np.asarray(im)[:, ::-1]) for im in split.load(r)])
    plain, mirrored = extract(tmp_path / "p.zarr", model, split), extract(tmp_path / "f.zarr", model, flipped)
    for b in stored:
        assert np.array_equal(stored[b][0::2], plain[b]) and np.array_equal(stored[b][1::2], mirrored[b])
        assert not np.array_equal(stored[b][0::2], stored[b][1::2])


def test_crop_views_are_seeded_boxes_recorded_in_the_key(tmp_path, model, split):
    a, b = view_set("flip,crops:3", seed=0), view_set("flip,crops:3", seed=1)
    assert a == view_set("flip,crops:3", seed=0) and a != b and len(a) == 5 and a[:2] == [View(), View(flip=True)]
    for v in a[2:]:
        x0, y0, x1, y1 = v.box
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 and 0.3 <= (x1 - x0) * (y1 - y0) <= 1.0
    pre = Preprocess(model.image_size, model.image_channels)
    store = Store.open(str(tmp_path / "s.zarr"))
    plan = plan_extraction(store, model, view_split(split, "crops:2", 0, pre), **ARGS)
    other = plan_extraction(Store.open(str(tmp_path / "o.zarr")), model, view_split(split, "crops:2", 1, pre), **ARGS,
                            dry_run=True)
    assert plan.recipe.dataset_fingerprint != other.recipe.dataset_fingerprint  # the boxes are in the key
    assert plan.key(10, 2, "2").split == "test+crops2" and plan.arrays[(10, 2, "2")].n_rows == 3 * len(split)
    with pytest.raises(DiffstoreError, match="another fingerprint"):  # a name never holds two sets of views
        plan_extraction(store, model, view_split(split, "crops:2", 1, pre), **ARGS)


def test_limit_counts_samples_not_view_rows(tmp_path, model, split):
    views = view_split(split, "flip", 0, Preprocess(model.image_size, model.image_channels))
    plan = plan_extraction(Store.open(str(tmp_path / "s.zarr")), model, views, **{**ARGS, "shard_rows": 16},
                           limit="10")
    assert plan.rows == range(0, 20) and list(plan.shards()) == [0, 1]
    with pytest.raises(DiffstoreError, match="--views takes flip and crops:K"):
        view_set("rotate")


def test_the_validation_carve_keeps_every_view_of_a_sample_on_one_side():
    from diffstore.probe.feed import split_val

    fit, val = split_val(30, 0.2, seed=3, views=3)
    assert len(val) == 2 and set(val % 3) == {0}  # validation reads the identity view of 2 of the 10 samples
    fit_samples, val_samples = set(fit // 3), set(val // 3)
    assert not fit_samples & val_samples and len(fit) == 3 * len(fit_samples) == 24
    assert list(split_val(10, 0.2, seed=3)[1]) == sorted(val // 3)  # the same samples as a plain carve


def test_probe_augment_trains_on_the_stored_views_and_tests_on_plain_images(tmp_path, model):
    import diffstore as ds

    pre = Preprocess(model.image_size, model.image_channels)
    train, test = (subset(load_split("digits", s), n) for s, n in (("train", 80), ("test", 40)))
    url = str(tmp_path / "s.zarr")
    for data in (train, view_split(train, "flip", 0, pre), test):
        extract_features(plan_extraction(Store.open(url), model, data, t="10", blocks="mid", pools="2"),
                         show_progress=False)
    kw = dict(t=10, pools=2, show_progress=False)
    plain = ds.probe(url, **kw).results[0]
    augmented = ds.probe(url, augment="flip", **kw).results[0]
    assert augmented["recipe"]["augment"] == "flip" and "augment" not in plain["recipe"]
    assert augmented["name"] != plain["name"] and augmented["n_test"] == plain["n_test"] == 40
    assert augmented["n_train"] == 2 * plain["n_train"] and augmented["n_val"] == plain["n_val"]
    with pytest.raises(DiffstoreError, match="no stored views"):
        ds.probe(url, augment="crops:2", **kw)


def test_probe_augment_probes_the_models_whose_views_are_stored_and_names_the_rest(tmp_path, model, tiny_unet_dir,
                                                                                    capsys):
    import diffstore as ds
    from diffstore.models import load_model

    pre = Preprocess(model.image_size, model.image_channels)
    train, test = (subset(load_split("digits", s), n) for s, n in (("train", 80), ("test", 40)))
    url = str(tmp_path / "s.zarr")
    twin = load_model(str(tiny_unet_dir), random_init=0)
    for m, data in ((model, train), (model, view_split(train, "flip", 0, pre)), (model, test), (twin, train),
                    (twin, test)):
        extract_features(plan_extraction(Store.open(url), m, data, t="10", blocks="mid", pools="2"),
                         show_progress=False)
    kw = dict(t=10, pools=2, show_progress=False)
    results = ds.probe(url, augment="flip", **kw).results
    assert [(r["model"], r["recipe"]["augment"]) for r in results] == [(model.name, "flip")]
    err = " ".join(capsys.readouterr().err.split())
    assert f"1 key(s) without stored flip views are not probed (models {twin.name})" in err and "--views flip" in err
    assert {r["model"] for r in ds.probe(url, **kw).results} == {model.name, twin.name}  # plain: both, as before
