"""Probes you can keep: scikit-learn estimators over the stage's solvers, kNN evaluation, saved heads, metrics and
the C grid's boundary warning, on synthetic data and on a real (tiny) store of digits features."""

from __future__ import annotations

import csv
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score
from sklearn.neighbors import KNeighborsClassifier

import diffstore as ds
from conftest import save_tiny_unet
from diffstore.datasets import load_split
from diffstore.errors import DiffstoreError
from diffstore.extract import extract_features, plan_extraction
from diffstore.models import load_model
from diffstore.probe import HeadProbe, KNNProbe, LinearProbe, ProbeOptions, knn
from diffstore.probe.intervals import bootstrap_interval, difference, mean_per_class, result_hits
from diffstore.probe.report import summary
from diffstore.probe.stage import probe_command
from diffstore.store import Store

KEY = dict(model="tiny", t="0", blocks="3", pools="full")  # 8 channels x 4 x 4 = 128 features
CS = (0.01, 0.1, 1.0)  # a short C grid keeps the file fast; the default grid is measured in bench/bench_linear.py
MLP = dict(hidden="32", steps=100, lrs="0.01", weight_decays="0")


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    """Digits (1437 train / 360 test) through a tiny real U-Net at t=0: block 3 (4x4 maps, 8 channels), stored
    whole and pooled to 1x1, and its random-init twin's pooled key."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    unet = save_tiny_unet(tmp_path_factory.mktemp("tiny-unet"), size=8, widths=(8, 16), attention=False)
    url = str(tmp_path_factory.mktemp("est") / "s.zarr")
    store = Store.open(url, "a")
    for random_init, pools in ((None, "1,full"), (1, "1")):
        model = load_model(str(unet), name="tiny", random_init=random_init)
        for split in ("train", "test"):
            plan = plan_extraction(store, model, load_split("digits", split), t="0", blocks="3", pools=pools,
                                   shard_rows=256)
            extract_features(plan, batch_size=512, show_progress=False)
    torch.set_num_threads(threads)
    return url


def features(url, split, pool="full", model="tiny"):
    return ds.open(url).features(model=model, t=0, block=3, pool=pool, split=split)


def probe(url, **kw) -> dict:
    """ds.probe's results as the JSON holds them (nothing printed)."""
    return ds.probe(url, show_progress=False, **kw).to_json()


def blobs(n=600, d=12, k=4, seed=0):
    """k Gaussian classes in d dimensions, labelled by strings."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    x = rng.normal(size=(n, d)) + 2.5 * np.eye(k, d)[y]
    return x.astype(np.float32), np.array(["ant", "bee", "cat", "dog"])[y]


def test_estimators_fit_predict_score_with_sklearn_semantics():
    x, y = blobs()
    for est in (LinearProbe(Cs=CS), KNNProbe(), HeadProbe(hidden=(16,), steps=100, lrs=(0.01,), weight_decays=(0.0,))):
        est.fit(x[:400], y[:400])
        assert list(est.classes_) == ["ant", "bee", "cat", "dog"]
        assert set(est.predict(x[400:])) <= set(est.classes_)
        p = est.predict_proba(x[400:])
        assert p.shape == (200, 4) and np.allclose(p.sum(1), 1, atol=1e-5)
        assert np.array_equal(est.classes_[p.argmax(1)], est.predict(x[400:]))
        assert est.score(x[400:], y[400:]) > 0.85, type(est).__name__  # chance is 0.25
        assert clone(est).get_params() == est.get_params()
    est = LinearProbe().set_params(Cs=(0.01, 0.1))
    assert est.get_params()["Cs"] == (0.01, 0.1) and est.fit(x, y).C_ in (0.01, 0.1)
    maps = torch.from_numpy(x.reshape(600, 3, 2, 2))  # a torch tensor of maps is flattened the same way
    assert np.array_equal(LinearProbe().fit(maps[:400], y[:400]).predict(maps[400:]),
                          LinearProbe().fit(x[:400], y[:400]).predict(x[400:]))


def test_estimators_refuse_what_they_cannot_do():
    x, y = blobs(n=100)
    with pytest.raises(DiffstoreError, match="use LinearProbe"):
        HeadProbe(kind="linear").fit(x, y)
    with pytest.raises(DiffstoreError, match="not fitted yet"):
        LinearProbe().predict(x)
    with pytest.raises(DiffstoreError, match="fitted on rows of shape"):
        KNNProbe().fit(x, y).predict(x[:, :5])
    with pytest.raises(DiffstoreError, match="has 100 rows but y has 99"):
        LinearProbe().fit(x, y[:99])


def test_knn_matches_sklearn_weighted_cosine_neighbours():
    x, y = blobs(n=300, d=8, seed=1)
    x += 0.5  # not centred: cosine similarity is not a plain dot product of the raw rows
    weight = lambda d: np.exp((1 - d) / 0.07)  # noqa: E731 (cosine distance d = 1 - similarity)
    for k in (5, 20):
        ours = KNNProbe(ks=(k,), refit=True).fit(x[:200], y[:200])  # refit: the bank is every fit row, as sklearn's
        theirs = KNeighborsClassifier(k, metric="cosine", weights=weight, algorithm="brute").fit(x[:200], y[:200])
        assert ours.k_ == k
        assert np.array_equal(ours.predict(x[200:]), theirs.predict(x[200:]))
        np.testing.assert_allclose(ours.predict_proba(x[200:]), theirs.predict_proba(x[200:]), atol=1e-4)


def test_knn_picks_k_on_validation_like_sklearn_and_streams_in_blocks(monkeypatch):
    x, y = blobs(n=400, d=8, seed=2)
    est = KNNProbe(ks=(1, 3, 30)).fit(x, y)
    fit, val = knn.split_val(400, 0.1, 0)
    sk = {k: KNeighborsClassifier(k, metric="cosine", weights=lambda d: np.exp((1 - d) / 0.07), algorithm="brute")
          .fit(x[fit], y[fit]).score(x[val], y[val]) for k in (1, 3, 30)}
    assert est.k_ == max(sk, key=lambda k: (sk[k], -k))
    assert est.fit_record_["val_top1_per_k"] == pytest.approx({str(k): v for k, v in sk.items()})
    whole = est.predict_proba(x)
    monkeypatch.setattr(knn, "BANK_ROWS", 7)  # tiny blocks: many partial top-k merges, same neighbours
    monkeypatch.setattr(knn, "QUERY_ROWS", 5)
    np.testing.assert_allclose(est.predict_proba(x), whole, atol=1e-6)


def test_linear_probe_equals_the_stage_result_on_the_same_key(store_url):
    r = probe(store_url, **KEY, cs=CS, retrain=True)["results"][0]
    train, test = features(store_url, "train"), features(store_url, "test")
    est = LinearProbe(Cs=CS).fit(train.numpy(), train.labels)
    assert est.C_ == r["C"] and est.fit_record_["val_top1"] == r["val_top1"]
    assert np.array_equal(est.predict(test.numpy()) == test.labels, result_hits(r))
    assert est.score(test, test.labels) == r["top1"]  # a store's Features work as X too (read shard by shard)
    assert KNNProbe().fit(train, train.labels).score(test, test.labels) > 0.6  # the bank: the stored train rows


def test_saved_heads_predict_on_test_features_as_the_stage_scored_them(store_url, capsys):
    out = probe(store_url, **KEY, head="linear,knn,mlp", **MLP, cs=CS, save_heads=True)
    assert "is not saved" not in capsys.readouterr().err
    store, test = ds.open(store_url), features(store_url, "test")
    assert {h["result"] for h in store.heads(t=0, block=3)} >= {r["name"] for r in out["results"]}
    for r in out["results"]:
        head = store.head(r["name"])
        kinds = {"linear": "LinearProbe", "knn": "KNNProbe", "mlp": "HeadProbe"}
        assert type(head).__name__ == kinds[r["head"]["kind"]]
        assert head.class_names_ == [str(c) for c in range(10)] and head.saved_["recipe"] == r["recipe"]
        proba = head.predict_proba(test.numpy())
        assert np.array_equal(head.predict(test.numpy()) == test.labels, result_hits(r)), r["head_label"]
        assert np.array_equal(top5_hits(proba, test.labels), result_hits(r, "top5"))
        if r["head"]["kind"] != "knn":  # knn: classes without votes tie at 0 and are never hits (knn.vote_hits)
            assert r["top5"] == pytest.approx(top_k_accuracy_score(test.labels, proba, k=5))
        assert r["mean_per_class"] == pytest.approx(balanced_accuracy_score(test.labels, proba.argmax(1)))
        for field in ("ci95", "top5_ci95", "mean_per_class_ci95"):
            lo, hi = r[field]
            assert lo <= r[field.replace("_ci95", "").replace("ci95", "top1")] <= hi and hi - lo < 0.15
    assert store.head(t=0, head="knn").k_ == next(r["k"] for r in out["results"] if r["head"]["kind"] == "knn")
    again = probe(store_url, **KEY, head="linear", cs=CS, save_heads=True)
    assert again["results"][0].get("cached")  # result and head stored: nothing to recompute
    xr = pytest.importorskip("xarray")  # the heads' arrays are labelled: xarray still opens the whole store
    tree = xr.open_datatree(store_url, engine="zarr", consolidated=False)
    linear = next(r for r in out["results"] if r["head"]["kind"] == "linear")
    assert tree[f"results/heads/{linear['name']}"]["coef"].shape == (128, 10)


def top5_hits(proba: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The label scores > 0 and fewer than 5 classes score higher (for scores without ties: in the top 5)."""
    own = proba[np.arange(len(labels)), labels]
    return ((proba > own[:, None]).sum(1) < 5) & (own > 0)


def test_saved_knn_head_refuses_a_changed_bank_and_lookups_name_the_choices(store_url, tmp_path):
    probe(store_url, **KEY, head="knn", save_heads=True)
    with pytest.raises(DiffstoreError, match="saved heads .* match head=knn.*pick one|no saved head"):
        ds.open(store_url).head(head="nope")
    import shutil

    import zarr

    copy = str(tmp_path / "copy.zarr")
    shutil.copytree(store_url, copy)
    zarr.open_group(copy, path="features/digits/train/tiny/noised/t0/b3/pfull").attrs["fingerprint"] = "changed"
    with pytest.raises(DiffstoreError, match="has changed since"):
        ds.open(copy).head(t=0, head="knn")


def test_a_saved_head_whose_description_or_weights_were_edited_is_refused(store_url, tmp_path):
    import shutil

    import zarr

    probe(store_url, **KEY, head="linear", cs=CS, save_heads=True)
    name = ds.open(store_url).head(t=0, head="linear", model="tiny", pool="full").saved_["result"]
    copy = str(tmp_path / "edited.zarr")
    shutil.copytree(store_url, copy)
    group = zarr.open_group(copy, path=f"results/heads/{name}")
    payload = dict(group.attrs)["payload"]
    for field, value, refusal in (("row_shape", [8, 4000, 4000], "not the float arrays of the shapes"),
                                  ("estimator", "os.system", "payload.estimator must be one of"),
                                  ("class_names", "0123456789", "payload.class_names must be a list")):
        group.attrs["payload"] = {**payload, field: value}
        with pytest.raises(DiffstoreError, match=refusal):
            ds.open(copy).head(name)
    group.attrs["payload"] = payload
    group.create_array("extra", data=np.zeros(3, np.float32))
    with pytest.raises(DiffstoreError, match=r"arrays \(extra\) are not the float arrays"):
        ds.open(copy).head(name)


def test_metric_option_selects_and_shows_each_metric_with_paired_margins(store_url, capsys):
    kw = dict(store=store_url, model="tiny", t="0", blocks="3", pools="1", show_progress=False)
    out = probe_command(ProbeOptions.build(**kw, metric="top1,mean-per-class")).to_json()
    text = capsys.readouterr().out
    assert [s["metric"] for s in out["summary"]] == ["top1", "mean-per-class"]
    assert "by validation mean-per-class is tiny" in text and "test mean-per-class" in text
    line = out["summary"][1]
    best = next(r for r in out["results"] if r["name"] == line["best"]["name"])
    twin = next(r for r in out["results"] if r["name"] == line["twin"]["result"])
    y = ds.open(store_url).labels("test")
    assert line["twin"]["diff"] == pytest.approx(best["mean_per_class"] - twin["mean_per_class"])
    assert line["twin"] == {"result": twin["name"], **difference(result_hits(best), result_hits(twin), y)}
    old = [{k: v for k, v in r.items() if k not in ("top5", "test_hits5", "mean_per_class", "val_mean_per_class",
                                                     "val_top5")} for r in out["results"]]  # as stored by 0.1
    assert summary(old, "mean-per-class") == [] and len(summary(old, "top1")) == 1
    with pytest.raises(DiffstoreError, match="metric= must be one of top1, top5, mean-per-class, got 'recall'"):
        ds.probe(**kw, metric="top1,recall")
    # the tidy table carries every metric with its interval; paired() compares results on any of them
    again = ds.probe(**kw, metric=["mean-per-class"])
    row = again.to_pandas().set_index("name").loc[best["name"]]
    assert row["top5"] == best["top5"] and row["C"] == best["C"] and not row["refit"]
    assert [row["mean_per_class"], row["mean_per_class_ci_low"], row["mean_per_class_ci_high"]] == \
        [best["mean_per_class"], *best["mean_per_class_ci95"]]
    assert again.paired(best["name"], twin["name"], metric="mean-per-class") == \
        {"a": best["name"], "b": twin["name"], "metric": "mean-per-class", **difference(
            result_hits(best), result_hits(twin), y)}
    assert again.paired(best["name"], twin["name"], metric="top5")["diff"] == pytest.approx(best["top5"] - twin["top5"])


def test_the_cli_takes_the_new_options_and_prints_them_in_the_csv_table(store_url):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "diffstore.cli", "probe", "--store", store_url, "--model", "tiny",
                               "--t", "0", "--blocks", "3", "--pools", "1", "-q", *args],
                              capture_output=True, text=True)

    done = cli("--head", "linear,knn", "--cs", "0.01,0.1", "--ks", "5,10", "--metric", "top5", "--csv")
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert done.returncode == 0 and {r["head"] for r in rows} == {"linear", "knn"}, done.stderr[-2000:]
    assert all(float(r["top5_ci_low"]) <= float(r["top5"]) <= float(r["top5_ci_high"]) for r in rows)
    assert {r["C"] for r in rows if r["head"] == "linear"} <= {"0.01", "0.1"}
    assert {r["k"] for r in rows if r["head"] == "knn"} <= {"5", "10"}
    refused = cli("--metric", "recall")
    assert refused.returncode == 2 and "--metric must be one of top1, top5, mean-per-class" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_mean_per_class_and_its_stratified_interval():
    rng = np.random.default_rng(0)
    y = rng.choice(5, 500, p=[0.5, 0.2, 0.1, 0.1, 0.1])
    pred = np.where(rng.random(500) < 0.7, y, 0)
    hits = pred == y
    assert mean_per_class(hits, y) == pytest.approx(balanced_accuracy_score(y, pred))
    lo, hi = bootstrap_interval(hits, labels=y)
    assert lo < mean_per_class(hits, y) < hi and hi - lo < 0.15
    assert bootstrap_interval(hits, labels=y) == [lo, hi]  # seeded
    assert difference(hits, hits, y) == {"diff": 0.0, "ci95": [0.0, 0.0]}


def test_c_at_an_end_of_the_grid_warns_and_is_recorded(store_url, capsys):
    # C = 1e-4 and 3e-4 regularise far too strongly for 128 features of 1,300 rows: the best is the grid's top
    r = probe(store_url, **KEY, cs="1e-4,3e-4", retrain=True)["results"][0]
    assert (r["C"], r["C_at_grid_end"]) == (3e-4, "largest") and r["recipe"]["Cs"] == [1e-4, 3e-4]
    err = " ".join(capsys.readouterr().err.split())  # unwrapped
    assert "chose C=0.0003, the largest C of the grid" in err and "extend the grid with cs=" in err
    train = features(store_url, "train")
    assert LinearProbe(Cs=(1e-4, 3e-4)).fit(train.numpy(), train.labels).fit_record_["C_at_grid_end"] == "largest"


def test_many_heads_at_the_grid_end_warn_in_one_line_naming_them(capsys):
    from diffstore.probe.recipe import ProbeRecipe
    from diffstore.probe.results import warn_fits

    found = [(("C", "linear", 100.0, "largest"), f"m t=10/b={b}/p=1") for b in range(6)]
    warn_fits(found + [(("converged", "mlp", "mlp"), "m t=10/b=0/p=2")], ProbeRecipe())
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "the linear heads of 6 keys chose C=100" in lines[0]
    assert "m t=10/b=3/p=1 and 2 more" in lines[0] and "b=4" not in lines[0]
    assert "the mlp head did not converge (still improving" in lines[1] and lines[1].endswith("m t=10/b=0/p=2")


def test_refit_is_in_the_recipe_and_fits_every_train_row(store_url):
    plain, refit = (probe(store_url, **KEY, cs=CS, refit=flag)["results"][0] for flag in (False, True))
    assert plain["name"] != refit["name"] and refit["recipe"]["refit"] and not plain["recipe"]["refit"]
    assert (plain["n_train"], refit["n_train"]) == (1437 - 144, 1437) and refit["converged"]
    assert refit["C"] == plain["C"] and abs(refit["top1"] - plain["top1"]) < 0.05
