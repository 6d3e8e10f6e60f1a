"""The public Python API (`import diffstore as ds`) end to end, and the promises of the surface around it:
the CLI and the API share defaults, reading never imports torch, --limit keeps split names."""

import inspect
import json
import subprocess
import sys

import numpy as np
import pytest

import diffstore as ds
from diffstore import cli
from diffstore.errors import DiffstoreError

TRAIN, TEST = 256, 360  # train: the first 256 rows of 1437 extracted (--limit); test: all of it


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    """The shipped model on the first rows of digits: t=10, the mid block and block 6, pools 1 and 2."""
    url = str(tmp_path_factory.mktemp("api") / "s.zarr")
    ds.extract(url, t=[10], blocks=["mid", 6], pools=[1, 2], limit=f"train={TRAIN}", show_progress=False)
    return url


def test_extract_features_and_own_sklearn_head_end_to_end(store_url):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    store = ds.open(store_url)
    train = store.features(t=10, block="mid", pool=2, split="train", limit=TRAIN)  # the rows extracted
    test = store.features(t=10, block="mid", pool=2, split="test")
    assert train.block_name == "mid" and train.shape[0] == TRAIN and test.shape[0] == TEST
    x_train, x_test = np.asarray(train).reshape(TRAIN, -1), test.numpy().reshape(TEST, -1)
    head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x_train, train.labels)
    accuracy = head.score(x_test, test.labels)
    assert accuracy > 0.7, accuracy  # 10 classes: chance is 0.1; the shipped model's mid block separates digits


def test_features_convert_to_torch_dask_and_labelled_xarray(store_url):
    store = ds.open(store_url)
    f = store.features(t=10, block="mid", pool=2, split="test")
    x = f.numpy()
    assert np.array_equal(f.to_torch().numpy(), x)
    assert np.array_equal(f.to_dask().compute(), x)
    xa = f.to_xarray()
    assert xa.dims == ("sample", "channel", "height", "width") and xa.shape == x.shape
    np.testing.assert_array_equal(xa["sample"].values, store.ids("test"))
    np.testing.assert_array_equal(xa["label"].values, store.labels("test"))
    assert xa["label_name"].values[0] == str(store.labels("test")[0])  # digits' class names are "0".."9"
    assert xa.attrs["block_name"] == "mid" and xa.attrs["t"] == 10
    np.testing.assert_array_equal(f.to_xarray(lazy=True).values, x)


def test_keys_select_by_block_name_index_and_lists(store_url):
    store = ds.open(store_url)
    mid = store.keys(block="mid", pool=2)
    assert {k.split for k in mid} == {"train", "test"} and len({k.block for k in mid}) == 1
    assert store.keys(block=mid[0].block, pool="2") == mid
    assert len(store.keys(block=["mid", 6], split="train")) == 4
    with pytest.raises(DiffstoreError, match="pick one.*split: test, train"):
        store.features(t=10, block="mid", pool=2)
    with pytest.raises(DiffstoreError, match="unknown key field"):
        store.keys(layer=3)


def test_limit_fills_rows_of_the_whole_split_and_reading_past_them_is_refused(store_url):
    from diffstore.datasets import load_split
    from diffstore.store import Store

    s = Store.open(store_url, mode="r")
    full = load_split("digits", "train")
    assert s.split("digits", "train").ids.tolist() == full.ids.tolist()  # the whole split's order, stored once
    key = ds.open(store_url).keys(split="train", block="mid", pool=2)[0]
    array = s.features(key)
    assert array.n_rows == len(full) and TRAIN <= array.done_rows() < len(full)
    assert "limit" not in array.attrs["dataset"]["source"]  # the key is the whole split's
    with pytest.raises(DiffstoreError, match=rf"(?s)incomplete.*--limit {array.done_prefix()} reads them"):
        ds.open(store_url).features(key).numpy()


def test_cka_and_probe_from_python_return_results_without_printing(store_url, capsys):
    m = ds.cka(store_url, by="block", t=10, pool=2, show_progress=False)  # a labelled DataArray
    assert m.attrs["method"] == "unbiased" and m.attrs["n"] == TEST  # the default split is test
    assert m.dims == ("row", "col") and list(m["row_block"].values) == [6, 7] and np.allclose(np.diag(m.values), 1)
    assert m.to_pandas().loc[m["row"].values[0], m["col"].values[1]] == m.values[0, 1]
    out = ds.probe(store_url, t="10", pools="2", limit=TRAIN, show_progress=False)
    assert len(out["results"]) == 2  # one linear head per key: blocks 6 and mid at t=10, p=2
    assert capsys.readouterr().out == ""


def test_stage_packages_are_callable_and_importable():
    import diffstore.cka.math
    from diffstore.cka import stage

    assert callable(ds.cka) and ds.cka is diffstore.cka and stage.compute
    assert callable(ds.extract) and callable(ds.probe)


def test_every_option_is_defined_once_and_reaches_cli_and_api():
    """Options dataclass -> CLI command and API signature: same names, same defaults, help shows every option."""
    import dataclasses

    import typer.main

    from diffstore.cka.options import CKAOptions
    from diffstore.extract.options import ExtractOptions
    from diffstore.probe.options import ProbeOptions

    commands = typer.main.get_command(cli.app).commands
    for name, cls, fn in (("extract", ExtractOptions, ds.extract), ("probe", ProbeOptions, ds.probe),
                          ("cka", CKAOptions, ds.cka)):
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        assert dict((k, p.default) for k, p in inspect.signature(fn).parameters.items()) == fields
        params = {p.name: p.default for p in commands[name].params if p.name not in ("as_json", "as_csv")}
        assert set(params) == set(fields), name
        for k, default in fields.items():
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            assert params[k] == (shown or None if isinstance(default, tuple) else shown), (name, k)
        assert all(f.metadata["help"] in fn.function().__doc__ for f in dataclasses.fields(cls))


def test_reading_a_store_never_imports_torch_or_matplotlib(store_url):
    code = f"""
import sys, numpy as np, diffstore as ds
s = ds.open({store_url!r})
f = s.features(t=10, block="mid", pool=2, split="train", limit=256)
f.numpy(); f.to_xarray(); s.labels("train")
from diffstore.cli import app
for argv in (["ls", "--store", {store_url!r}, "--json"], ["info", "--store", {store_url!r}, "t=10/p=2"],
             ["verify", "--store", {store_url!r}], ["--help"], ["--version"]):
    try:
        app(argv, standalone_mode=False)
    except SystemExit:
        pass
heavy = sorted(m for m in ("torch", "matplotlib", "sklearn", "diffusers", "distributed") if m in sys.modules)
assert not heavy, heavy
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_version_and_json_outputs_are_data(store_url):
    version = subprocess.run([sys.executable, "-m", "diffstore.cli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"diffstore {ds.__version__}"
    ls = subprocess.run([sys.executable, "-m", "diffstore.cli", "ls", "--store", store_url, "--json"],
                        capture_output=True, text=True)
    rows = json.loads(ls.stdout)
    assert len(rows) == 8
    for r in rows:
        assert r["store"] == store_url and r["path"].startswith("features/digits/")
        assert isinstance(r["shape"], list) and all(isinstance(v, int) for v in r["shape"])
        assert isinstance(r["bytes"], int) and r["bytes"] > 0 and r["rows"] == (1437 if r["split"] == "train" else 360)
        assert r["rows_done"] == (TRAIN if r["split"] == "train" else 360)


READER_ONLY = """
import sys
for name in {blocked!r}:  # as if not installed: import fails, importlib.util.find_spec says None
    sys.modules[name] = None
import numpy as np, diffstore as ds
s = ds.open({url!r})
f = s.features(t=10, block="mid", pool=2, split="test")
assert f.numpy().shape[0] == len(s.labels("test")) and f.to_xarray().dims == ("sample", "channel", "height", "width")
try:
    f.to_torch()
except ds.DiffstoreError as e:
    assert "pip install torch" in str(e)
else:
    raise AssertionError("to_torch worked without torch")
"""


def test_a_reader_only_environment_opens_stores_and_reads_labelled_features(store_url):
    blocked = ["torch", "dask", "distributed", "sklearn", "scipy", "matplotlib", "typer", "rich", "diffusers",
               "transformers", "PIL", "safetensors", "huggingface_hub", "fsspec", "s3fs"]
    done = subprocess.run([sys.executable, "-c", READER_ONLY.format(blocked=blocked, url=store_url)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_probe_results_are_data_a_tidy_table_and_paired_differences(store_url, capsys):
    out = ds.probe(store_url, t=[10], blocks=["mid", 6], pools=[2], limit=TRAIN, baseline="pixels",
                   show_progress=False)
    frame = out.to_pandas()
    assert len(frame) == 3 and list(frame.columns[:6]) == ["name", "dataset", "model", "input", "t", "block"]
    keys = frame[frame["kind"] == "store"]
    assert keys["t"].tolist() == [10, 10] and sorted(keys["block"].tolist()) == [6, 7]
    assert keys["pool"].tolist() == [2, 2]
    pixels = frame[frame["kind"] == "pixels"].iloc[0]
    assert frame["t"].isna().sum() == 1 and frame["block"].isna().sum() == 1  # the control has no key
    assert pixels["resolution"] == 16
    assert (frame["ci_low"] <= frame["top1"]).all() and (frame["top1"] <= frame["ci_high"]).all()
    mid = dict(model="digits-ddpm", block=7, head="linear")
    d = out.paired(mid, dict(model="pixels"))
    hits = out.to_pandas(hits=True).set_index("name")["hits"]
    assert d["diff"] == pytest.approx(hits[d["a"]].mean() - hits[d["b"]].mean())
    assert d["ci95"][0] <= d["diff"] <= d["ci95"][1]
    with pytest.raises(DiffstoreError, match="picks 2 results"):
        out.paired(dict(model="digits-ddpm"), dict(model="pixels"))
    # the CLI prints the same table as CSV
    capsys.readouterr()
    code = cli_main(capsys, "probe", "--store", store_url, "--t", "10", "--pools", "2", "--limit", str(TRAIN),
                    "--baseline", "pixels", "--csv", "-q")
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert code == 0 and [r["name"] for r in rows] == frame["name"].tolist()


def cli_main(capsys, *args) -> int:
    argv, sys.argv = sys.argv, ["diffstore", *args]
    try:
        cli.main()
    except SystemExit as e:
        return e.code or 0
    finally:
        sys.argv = argv
    return 0


def test_a_torch_dataset_streams_every_row_once_with_its_label_in_a_seeded_order(store_url):
    import torch

    f = ds.open(store_url).features(t=10, block="mid", pool=2, split="test")
    x, y = f.numpy().astype(np.float32), f.labels
    data = f.to_torch_dataset(shuffle=True, buffer=100, seed=3)
    rows = list(data)
    order = [int(np.flatnonzero((x == r.numpy()).all(axis=(1, 2, 3)))[0]) for r, _ in rows]
    assert sorted(order) == list(range(len(x))) and order != list(range(len(x)))  # each row once, shuffled
    assert [label for _, label in rows] == y[order].tolist()
    again = [int(np.flatnonzero((x == r.numpy()).all(axis=(1, 2, 3)))[0]) for r, _ in data]
    assert again == order  # the seed fixes the order
    loader = torch.utils.data.DataLoader(f.to_torch_dataset(buffer=64, batch_size=32), batch_size=None,
                                         num_workers=2)
    seen = torch.cat([b for b, _ in loader]).numpy()
    assert len(seen) == len(x) and np.array_equal(np.sort(seen.reshape(len(x), -1), axis=0),
                                                  np.sort(x.reshape(len(x), -1), axis=0))  # workers: disjoint shards
    partial = ds.open(store_url).features(t=10, block="mid", pool=2, split="train")
    with pytest.raises(DiffstoreError, match="incomplete"):
        partial.to_torch_dataset()
    first = ds.open(store_url).features(t=10, block="mid", pool=2, split="train", limit=TRAIN)
    assert len(list(first.to_torch_dataset())) == TRAIN
