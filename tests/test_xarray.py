"""A store that xarray understands (issue 14): the whole store opens as a DataTree, a feature array labelled."""

import numpy as np
import pytest
import zarr

from conftest import subset
from diffstore.datasets import load_split
from diffstore.extract import extract_features, plan_extraction
from diffstore.models import load_model
from diffstore.store import Store

xr = pytest.importorskip("xarray")

X = "features/digits/test/tiny-unet/noised/t10/b2/p2"


@pytest.fixture(scope="module")
def store_url(tmp_path_factory, tiny_unet_dir):
    url = str(tmp_path_factory.mktemp("xr") / "s.zarr")
    split = subset(load_split("digits", "test"), 40)
    plan = plan_extraction(Store.open(url), load_model(str(tiny_unet_dir)), split, t="10", blocks="2,mid",
                           pools="2,full", shard_rows=16)
    extract_features(plan, batch_size=16, show_progress=False)
    return url, split


def test_open_datatree_opens_the_whole_store_with_labelled_features(store_url):
    url, split = store_url
    tree = xr.open_datatree(url, engine="zarr", consolidated=False)
    x = tree[X]["x"]
    assert x.dims == ("sample", "channel", "height", "width") and x.shape == (40, 16, 2, 2)
    np.testing.assert_array_equal(x["sample"].values, split.ids)
    np.testing.assert_array_equal(x["label"].values, split.labels)
    np.testing.assert_array_equal(x.values, Store.open(url, "r").open_array(X).read())
    assert tree[X]["done"].dims == ("shard",) and int(tree[X]["done"].sum()) == 3
    np.testing.assert_array_equal(tree["datasets/digits/test"]["ids"].values, split.ids)
    full = tree[X.replace("p2", "pfull")]["x"]
    assert full.dims == ("sample", "channel", "height", "width") and full.shape[2:] == (16, 16)
    assert float(x.sel(sample=split.ids[3]).sum()) == pytest.approx(float(x.values[3].astype(np.float64).sum()),
                                                                    rel=1e-3)


def test_to_xarray_labels_format_1_arrays_too(store_url, tmp_path):
    url, split = store_url
    a = Store.open(url, "r").open_array(X)
    labelled = a.to_xarray()
    np.testing.assert_array_equal(labelled.sel(sample=split.ids[5]).values, a.read()[5])
    assert labelled.coords["label"].values.tolist() == split.labels.tolist()
    # A format-1 store: no layout attribute, no sample/label arrays, no dimension names on ids/labels.
    import shutil

    old = tmp_path / "old.zarr"
    shutil.copytree(url, old)
    root = zarr.open_group(str(old), mode="r+")
    root.attrs["diffstore"] = {"format": 1}
    g = root[X]
    g.attrs.pop("layout")
    del g["sample"], g["label"]
    a1 = Store.open(str(old), "r").open_array(X)
    lab1 = a1.to_xarray(lazy=False)
    assert lab1.dims == labelled.dims and lab1.coords["sample"].values.tolist() == split.ids.tolist()
    np.testing.assert_array_equal(lab1.values, labelled.values)


def test_to_xarray_is_the_view_open_datatree_gives(store_url):
    """One labelled view: the same dims, coordinates (sample ids, labels, class names) and values either way."""
    import diffstore as ds

    url, split = store_url
    tree = xr.open_datatree(url, engine="zarr", consolidated=False)
    for path in (X, X.replace("p2", "pfull")):
        on_disk = tree[path]["x"]
        ours = ds.open(url).features(path).to_xarray()
        assert ours.dims == on_disk.dims == ("sample", "channel", "height", "width")
        assert set(ours.coords) == set(on_disk.coords) == {"sample", "label", "label_name"}
        for name in ("sample", "label", "label_name"):
            np.testing.assert_array_equal(ours[name].values.astype(on_disk[name].dtype), on_disk[name].values)
        np.testing.assert_array_equal(ours.values, on_disk.values)
    assert tree[X]["x"]["label_name"].values[0] == str(split.labels[0])  # digits' class names are "0".."9"
