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
