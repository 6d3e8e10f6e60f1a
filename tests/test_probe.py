"""diffstore probe: heads trained from a real (tiny) store, evaluation coverage, seeds, refusals, proxy, cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import diffstore as ds
from conftest import save_tiny_unet
from diffstore.datasets import Split, load_split
from diffstore.errors import DiffstoreError
from diffstore.extract import extract_features, plan_extraction
from diffstore.key import FeatureKey
from diffstore.models import load_model
from diffstore.probe import ProbeOptions
from diffstore.probe.feed import Feed, Rows, split_val
from diffstore.probe.figures import write_plots
from diffstore.probe.heads import HEADS, HeadSpec
from diffstore.probe.intervals import bootstrap_interval, difference, pack, result_hits, unpack
from diffstore.probe.recipe import ProbeRecipe
from diffstore.probe.report import grid_tables
from diffstore.probe.stage import probe_command
from diffstore.probe.train import convergence, train_probe
from diffstore.store import Store

FAST = dict(recipe="paper", epochs=3, lr=1e-2, show_progress=False)  # the converged recipe has its own tests
SMALL_HEADS = dict(hidden="32", channels="8,8", dim=16, n_heads=2)


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
    """A real diffusers UNet2DModel (8x8 grey, two levels, no attention, seeded weights) saved as a model folder."""
    return save_tiny_unet(tmp_path_factory.mktemp("tiny-unet"), size=8, widths=(8, 16), attention=False)


@pytest.fixture(scope="module")
def store_url(tiny_unet, tmp_path_factory):
    """Digits (1437 train / 360 test) through the tiny U-Net at t=0: blocks 1 (8x8) and 3 (4x4), pools 1 and full;
    plus its random-init twin at block 1, pool 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    url = str(tmp_path_factory.mktemp("probe") / "s.zarr")
    store = Store.open(url, "a")
    for model, blocks, pools in ((load_model(str(tiny_unet), name="tiny"), "1,3", "1,full"),
                                 (load_model(str(tiny_unet), name="tiny", random_init=1), "1", "1")):
        for split in ("train", "test"):
            plan = plan_extraction(store, model, load_split("digits", split), t="0", blocks=blocks, pools=pools,
                                   shard_rows=256)
            extract_features(plan, batch_size=512, show_progress=False)
    torch.set_num_threads(threads)  # later tests see the thread count they started with
    return url


def probe(url, capsys=None, **kw):
    if capsys is not None:
        capsys.readouterr()  # drop what earlier calls printed
    out = probe_command(ProbeOptions.build(store=url, **{**FAST, **kw}), "json").to_json()
    if capsys is not None:
        assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(out))  # stdout holds exactly the JSON
    return out


@pytest.mark.parametrize("head", HEADS)
def test_every_head_beats_chance_on_store_features(store_url, head):
    r = probe(store_url, model="tiny", blocks="1", pools="full", head=head, **SMALL_HEADS)["results"]
    assert len(r) == 1 and r[0]["head"]["kind"] == head
    assert r[0]["top1"] > 0.5, r[0]  # 10 classes: chance is 0.1
    assert r[0]["top5"] >= r[0]["top1"] and r[0]["params"] > 0


@pytest.mark.parametrize("recipe", ["paper", "converged"])
def test_evaluation_covers_every_test_sample(store_url, recipe):
    # 360 test rows: neither the eval batch (1024) nor the train batch (100) divides it; nothing may be dropped.
    # n_test and the stored hit vector count the rows actually evaluated; top-1 is recomputed from the hits.
    r = probe(store_url, model="tiny", t="0", blocks="3", pools="1", batch_size=100, recipe=recipe)["results"][0]
    hits = result_hits(r)
    assert r["n_test"] == 360 and len(hits) == 360 and hits.sum() > 0
    assert r["top1"] == pytest.approx(hits.mean())
    lo, hi = r["ci95"]
    assert lo < r["top1"] < hi and 0.02 < hi - lo < 0.15  # a 95% interval over 360 samples
    assert r["n_train"] + r["n_val"] == 1437 and r["n_val"] == round(0.1 * 1437)


@pytest.mark.parametrize("shuffle", [False, True])
def test_streamed_feed_yields_each_position_once(shuffle):
    x = np.arange(103, dtype=np.float16).reshape(103, 1, 1, 1)
    positions = np.sort(np.random.default_rng(0).choice(103, 77, replace=False))
    feed = Feed([Rows.of(x, chunk_rows=10)], np.arange(103), positions, 16, torch.device("cpu"), budget=200)
    assert feed.cache is None  # 77 rows x 4 bytes > 200: streamed, not held
    batches = list(feed.batches(np.random.default_rng(1) if shuffle else None))
    seen = np.concatenate([xs[0].flatten().numpy() for xs, _ in batches]).astype(int)
    labels = np.concatenate([y.numpy() for _, y in batches])
    assert sorted(seen) == list(positions) and np.array_equal(seen, labels)
    assert [len(y) for _, y in batches[:-1]] == [16] * (len(batches) - 1)  # only the last batch is short
    assert (seen != positions).any() == shuffle


def test_same_seed_gives_identical_accuracies_alone_or_side_by_side(store_url):
    kw = dict(model="tiny", t="0", blocks="1", pools="1", retrain=True, seed=3)
    a = probe(store_url, **kw)["results"][0]
    b = probe(store_url, **kw)["results"][0]
    many = probe(store_url, **{**kw, "pools": None, "blocks": None})["results"]
    c = next(r for r in many if (r["model"], r["block"], r["pool"]) == ("tiny", 1, "1"))
    assert len(many) == 5 and c["trained_with"] == 5
    assert (a["top1"], a["val_top1"]) == (b["top1"], b["val_top1"]) == (c["top1"], c["val_top1"])
    d = probe(store_url, **{**kw, "seed": 4})["results"][0]
    assert (d["top1"], d["val_top1"]) != (a["top1"], a["val_top1"])


def test_stored_result_is_shown_cached_and_listed(store_url, capsys):
    kw = dict(model="tiny", blocks="3", pools="full", seed=11)
    first = probe(store_url, **kw)["results"][0]
    again = probe(store_url, **kw)["results"][0]
    assert again["cached"] and not first.get("cached") and again["top1"] == first["top1"]
    listed = probe(store_url, capsys, list_results=True)["results"]
    assert first["name"] in {r["name"] for r in listed}


def test_random_init_twin_and_pixel_baseline_in_one_table(store_url, capsys):
    out = probe_command(ProbeOptions.build(store=store_url, model="tiny", blocks="1", pools="1", baseline="pixels",
                                           show_all=True, **FAST)).to_json()
    table = capsys.readouterr().out
    models = [r["model"] for r in out["results"]]
    assert models == ["tiny", "tiny.random-init-s1", "pixels"]
    assert "tiny.random-init-s1" in table and "pixels" in table and "top-5" in table
    pixels = out["results"][-1]
    assert pixels["n_test"] == 360 and pixels["top1"] > 0.8  # linear on 8x8 digit pixels


def test_summary_names_best_key_and_paired_margins_without_the_full_table(store_url, capsys):
    out = probe_command(ProbeOptions.build(store=store_url, model="tiny", t="0", blocks="1,3", pools="1",
                                           baseline="pixels", **FAST)).to_json()
    text = capsys.readouterr().out
    assert "probe results" not in text and "--all" in text  # the summary, not the 4-row table
    assert "vs its random-init twin" in text
    (line,) = out["summary"]
    by_name = {r["name"]: r for r in out["results"]}
    best = by_name[line["best"]["name"]]
    trained = [r for r in out["results"] if r["model"] == "tiny"]
    assert best["val_top1"] == max(r["val_top1"] for r in trained)  # chosen on validation, never test
    # the twin holds b1/p1 only: a margin where the best key has a twin, else the summary says it is missing
    for other in ("twin", "pixels") if best["block"] == 1 else ("pixels",):
        a, b = result_hits(best), result_hits(by_name[line[other]["result"]])
        assert line[other]["diff"] == pytest.approx(a.mean() - b.mean())  # paired: same test samples
        lo, hi = line[other]["ci95"]
        assert lo <= line[other]["diff"] <= hi and hi - lo < 0.2
    if best["block"] == 1:
        assert by_name[line["twin"]["result"]]["model"] == "tiny.random-init-s1"
    else:
        assert "twin" not in line and "vs its random-init twin: not in this run" in text
    assert f"block {best['block']} {best['block_name']}" in text and "paired 95% CI" in text


def test_fuse_trains_one_head_on_concatenated_keys(store_url):
    r = probe(store_url, model="tiny", fuse="t=0/b=1/p=full,t=0/b=3/p=full", head="cnn", **SMALL_HEADS)["results"]
    assert len(r) == 1 and r[0]["block"] == "1+3" and len(r[0]["keys"]) == 2
    assert r[0]["top1"] > 0.5  # b1 (8x8) pooled to b3's 4x4: still a spatial map the cnn head reads


def test_select_ranks_every_key_and_trains_the_top_k(store_url, capsys):
    probe(store_url, model="tiny")  # linear probes on all 5 keys: what the ranking is compared with
    out = probe(store_url, capsys, model="tiny", select=2)
    ranking = out["ranking"]
    assert len(ranking) == 5 and [r["rank"] for r in ranking] == [1, 2, 3, 4, 5]
    scores = [r["proxy_val_top1"] for r in ranking]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0.5
    assert all(r["linear_top1"] is not None for r in ranking)
    expected = spearmanr([r["proxy_val_top1"] for r in ranking], [r["linear_top1"] for r in ranking]).statistic
    assert out["spearman"]["digits"]["spearman"] == pytest.approx(expected) and out["spearman"]["digits"]["n_keys"] == 5
    setting = lambda r: (r["t"], r["block"], r["pool"])  # noqa: E731
    assert [setting(r) for r in out["results"]] == [setting(r) for r in ranking[:2]]


def test_grid_table_values_equal_stored_results_and_plots_are_written(store_url, tmp_path, capsys):
    out = probe_command(ProbeOptions.build(store=store_url, model="tiny", t="0", grid=True, plot=str(tmp_path),
                                           **FAST)).to_json()
    assert "t x block" in capsys.readouterr().out
    # (tiny p=1, tiny p=full, random-init p=1) x heatmap, tiny minus twin at p=1: one t has no curve over t
    assert len(out["plots"]) == 4
    two_t = write_plots(out["results"] + [{**r, "t": 50} for r in out["results"]], str(tmp_path / "two_t"))
    assert sorted(p.endswith("_vs_t.png") for p in two_t) == [False] * 4 + [True] * 3  # with two t, the curves too
    assert all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in out["plots"] + two_t)
    stored = {r["name"]: r for r in Store.open(store_url, "r").results("probe")}
    tables = {t.title: t for t in grid_tables(out["results"])}
    checked = 0
    for r in out["results"]:
        table = next(t for title, t in tables.items()
                     if title.startswith(f"digits {r['model']} (noised) p={r['pool']} "))
        column = next(c for c in table.columns if c.header == f"b{r['block']} {r['block_name']}")
        cell = list(column.cells)[[str(t) for t in table.columns[0].cells].index(str(r["t"]))]
        assert cell.rstrip("*+") == f"{100 * stored[r['name']]['top1']:.1f}"
        checked += 1
    assert checked == 5


def test_refuses_spatial_head_on_pooled_vectors(store_url):
    with pytest.raises(DiffstoreError, match=r"needs spatial maps.*--pools full"):
        probe(store_url, model="tiny", blocks="1", pools="1", head="attention")


def test_refuses_unknown_head_and_baseline(store_url):
    with pytest.raises(DiffstoreError,
                       match=r"head= must be one of linear, mlp, cnn, attention, fusion, knn, got 'resnet'"):
        probe(store_url, head="linear,resnet")
    with pytest.raises(DiffstoreError, match=r"baseline= must be one of none, pixels, got 'random'"):
        probe(store_url, baseline="random")


def test_refuses_unknown_key_naming_close_matches(store_url):
    with pytest.raises(DiffstoreError, match=r"no train feature array.*matches model=tiny/t=500. Closest: [^ ]*t=0/"):
        probe(store_url, model="tiny", t="500")
    with pytest.raises(DiffstoreError, match=r"--fuse t=5/b=1/p=1: no array.*closest: t=0/b=1/p=1"):
        probe(store_url, model="tiny", fuse="t=5/b=1/p=1,t=0/b=3/p=1")


def synthetic_store(tmp_path, n_rows: int, done_shards: list[int], splits=("train", "test")) -> str:
    """A store with a 40-sample split and one train/test array pair written by hand (some shards missing)."""
    url = str(tmp_path / "bad.zarr")
    store = Store.open(url, "a")
    for split in splits:
        store.put_split(Split("toy", split, np.arange(40), np.arange(40) % 4, list("abcd"), {"kind": "toy"}))
        key = FeatureKey("toy", split, "m", "noised", 10, 2, "1")
        arr = store.create(key.path, f"fp-{split}", {"key": key.to_dict()}, (3, 1, 1), n_rows, 10)
        for i in done_shards:
            sl = arr.shard_slice(i)
            arr.write_shard(i, np.ones((sl.stop - sl.start, 3, 1, 1), np.float16))
    return url


def test_refuses_incomplete_array_naming_shards_and_command(tmp_path):
    url = synthetic_store(tmp_path, 40, done_shards=[0, 2])
    with pytest.raises(DiffstoreError, match=r"(?s)incomplete: 2 of 4 shards are not done \(1, 3\)"
                                              r".*diffstore extract .*--t 10 --blocks 2"):
        probe(url)


def test_refuses_train_array_without_test_twin(tmp_path):
    url = synthetic_store(tmp_path, 40, done_shards=[0, 1, 2, 3], splits=("train",))
    with pytest.raises(DiffstoreError, match=r"(?s)has no test twin features/toy/test/.*--split test --model m"):
        probe(url)


def test_refuses_feature_label_count_mismatch(tmp_path):
    url = synthetic_store(tmp_path, 30, done_shards=[0, 1, 2])
    with pytest.raises(DiffstoreError, match=r"30 feature rows but the train split has 40 labels"):
        probe(url)


def test_train_probe_on_plain_arrays_streams_like_in_ram():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = (np.eye(3)[y][:, :, None, None] * 2 + rng.normal(size=(300, 3, 1, 1))).astype(np.float16)
    recipe = ProbeRecipe("paper", epochs=4, lr=1e-2, batch_size=16)
    held = train_probe(x[:200], y[:200], x[200:], y[200:], HeadSpec(), recipe, show_progress=False)
    streamed = train_probe(x[:200], y[:200], x[200:], y[200:], HeadSpec(), recipe, show_progress=False, budget=1000)
    assert held["n_test"] == streamed["n_test"] == 100
    assert held["top1"] > 0.7 and streamed["top1"] > 0.7 and held["top5"] is None  # 3 classes: no top-5


def test_early_stop_keeps_the_best_validation_epoch():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 240)
    x = (np.eye(4)[y][:, :, None, None] + rng.normal(size=(240, 4, 1, 1))).astype(np.float16)
    recipe = ProbeRecipe("paper", epochs=6, lr=3e-2, batch_size=16, val_frac=0.25, early_stop=True)
    r = train_probe(x[:160], y[:160], x[160:], y[160:], HeadSpec(), recipe, show_progress=False)
    assert len(r["val_history"]) == 6 and r["n_val"] == 40
    # the reported head is the one of the first best epoch: its val accuracy is that epoch's
    assert r["val_top1"] == max(r["val_history"]) == r["val_history"][r["epochs_used"] - 1]
    with pytest.raises(DiffstoreError, match="--val-frac > 0"):
        ProbeRecipe("paper", early_stop=True, val_frac=0)
    with pytest.raises(DiffstoreError, match="converged recipe selects on the validation split"):
        ProbeRecipe(val_frac=0)


def sklearn_probe(store: Store, key: FeatureKey, Cs, val_frac=0.1, seed=0) -> tuple[float, float]:
    """scikit-learn's converged multinomial LogisticRegression (lbfgs) on the stored features, standardised on the
    fit rows, C chosen on the same validation carve (ties to the smaller C): (chosen C, test top-1)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    y_train, y_test = store.split(key.dataset, "train").labels, store.split(key.dataset, "test").labels
    x = store.features(key).read().reshape(len(y_train), -1).astype(np.float64)
    x_test = store.features(FeatureKey(**{**key.to_dict(), "split": "test"})).read().reshape(len(y_test), -1)
    fit, val = split_val(len(y_train), val_frac, seed)
    scaler = StandardScaler().fit(x[fit])
    best = None
    for C in sorted(Cs):
        model = LogisticRegression(C=C, tol=1e-10, max_iter=20000).fit(scaler.transform(x[fit]), y_train[fit])
        score = model.score(scaler.transform(x[val]), y_train[val])
        if best is None or score > best[0]:
            best = (score, C, model.score(scaler.transform(x_test.astype(np.float64)), y_test))
    return best[1], best[2]


@pytest.mark.parametrize("setting", [dict(blocks="3", pools="full"), dict(blocks="1", pools="1")])
def test_converged_linear_probe_matches_sklearn_on_stored_features(store_url, setting):
    r = probe(store_url, model="tiny", t="0", recipe="converged", show_progress=False, retrain=True,
              **setting)["results"]
    ours = next(x for x in r if x["model"] == "tiny")
    assert ours["recipe"]["name"] == "converged" and ours["converged"]
    C, sk_top1 = sklearn_probe(Store.open(store_url, "r"), FeatureKey(**ours["keys"][0]), ProbeRecipe().Cs)
    assert abs(ours["top1"] - sk_top1) <= 0.005, (ours["top1"], ours["C"], sk_top1, C)  # within 0.5 points
    assert ours["C"] == C


def test_iterative_head_records_convergence_and_warns_when_the_budget_is_short(store_url, capsys):
    kw = dict(model="tiny", t="0", blocks="1", pools="1", head="mlp", hidden="32", recipe="converged", retrain=True)
    short = probe(store_url, steps=20, **kw)["results"][0]
    assert short["steps"] == 20 and not short["early_stopped"] and short["converged"] is False
    assert "did not converge" in capsys.readouterr().err
    grid = len(ProbeRecipe.lrs) * len(ProbeRecipe.weight_decays)
    assert short["final_train_loss"] > 0 and len(short["val_top1_per_lr_wd"]) == grid
    r = probe(store_url, steps=1500, **kw)["results"][0]
    assert r["early_stopped"] and r["converged"] and r["steps"] < 1500 and r["best_step"] <= r["steps"]
    assert r["val_top1"] == max(r["val_top1_per_lr_wd"].values())  # the grid point chosen on validation
    assert r["recipe"]["name"] == "converged" and "steps" in r["recipe"] and "epochs" not in r["recipe"]


def evals(losses, top1s, every=100):
    return [(every * (i + 1), loss, acc) for i, (loss, acc) in enumerate(zip(losses, top1s))]


def test_a_head_still_improving_at_its_budget_is_never_called_converged():
    flat = [1.0, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    plateau = evals(flat, [0.5, 0.7, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8])
    assert convergence(plateau, best_step=300, still_active=True)["converged"]  # flat over the last fifth
    assert convergence(plateau, best_step=300, still_active=False)["converged"]
    # the loss keeps falling at the budget
    falling = convergence(evals([1.0 - 0.05 * i for i in range(10)], [0.8] * 10), best_step=100, still_active=True)
    assert falling["val_loss_falling_late"] and not falling["converged"]
    # the loss has turned (over-fitting) but the reported state is from the last evaluations: more budget may help
    late_best = convergence(evals(flat, [0.5, 0.7, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.81]), best_step=1000,
                            still_active=True)
    assert late_best["val_top1_best_late"] and not late_best["val_loss_falling_late"] and not late_best["converged"]
    # early stopping ended it: the budget sufficed whatever the curves did
    assert convergence(evals(flat, [0.8] * 10), best_step=1000, still_active=False)["converged"]


def test_the_lr_and_weight_decay_grid_is_an_option_and_its_default_is_the_recipe_default(store_url):
    import inspect

    defaults = inspect.signature(ds.probe).parameters
    assert defaults["lrs"].default == ProbeRecipe.lrs and defaults["weight_decays"].default == ProbeRecipe.weight_decays
    kw = dict(model="tiny", t="0", blocks="1", pools="1", head="mlp", hidden="16", steps=100, recipe="converged")
    r = probe(store_url, lrs="0.003", weight_decays="0.5", **kw)["results"][0]
    assert list(r["val_top1_per_lr_wd"]) == ["lr=0.003,wd=0.5"] and (r["lr"], r["weight_decay"]) == (0.003, 0.5)
    assert r["recipe"]["lrs"] == [0.003] and r["recipe"]["weight_decays"] == [0.5]
    for bad in (dict(lrs="0"), dict(weight_decays="-1"), dict(lrs="fast")):
        with pytest.raises(DiffstoreError, match="lrs|weight.decays"):
            probe(store_url, **bad, **kw)


def test_blocks_accept_the_names_extract_accepts(store_url):
    r = probe(store_url, model="tiny", t="0", blocks="in", pools="1")["results"]
    assert {(x["block"], x["block_name"]) for x in r} == {(1, "in")}
    with pytest.raises(DiffstoreError, match=r"--blocks nope: no such block.*1 in"):
        probe(store_url, model="tiny", blocks="nope")


def test_seeds_report_mean_and_std_over_seeds(store_url):
    out = probe(store_url, model="tiny", t="0", blocks="3", pools="1", seeds=2, seed=5)
    assert [r["seed"] for r in out["results"]] == [5, 6]
    top1 = [r["top1"] for r in out["results"]]
    seeds = out["summary"][0]["best"]["seeds"]
    assert seeds["n_seeds"] == 2 and seeds["mean"] == pytest.approx(np.mean(top1))
    assert seeds["std"] == pytest.approx(np.std(top1, ddof=1))


def test_paired_interval_of_a_difference_is_narrower_than_unpaired():
    rng = np.random.default_rng(0)
    a = rng.random(2000) < 0.8
    b = a.copy()
    b[rng.choice(2000, 40, replace=False)] ^= True  # b differs from a on 2% of the samples
    d = difference(a, b)
    assert d["diff"] == pytest.approx(a.mean() - b.mean()) and d["ci95"][0] <= d["diff"] <= d["ci95"][1]
    lo_a, hi_a = bootstrap_interval(a)
    assert d["ci95"][1] - d["ci95"][0] < (hi_a - lo_a) / 2  # pairing removes the shared sampling noise
    assert difference(a, a) == {"diff": 0.0, "ci95": [0.0, 0.0]}
    assert np.array_equal(unpack(pack(a), len(a)), a)


def test_limit_probes_the_first_rows_of_each_split_and_names_its_results(store_url, capsys):
    """probe --limit N reads the first N rows of train and test (as extract --limit), and its results are stored
    under other names than the full splits' (the limit is part of the recipe)."""
    full = probe(store_url, t="0", blocks="3", pools="1", capsys=capsys)["results"][0]
    cut = probe(store_url, t="0", blocks="3", pools="1", limit=300, capsys=capsys)["results"][0]
    assert (cut["n_train"] + cut["n_val"], cut["n_test"]) == (300, 300)
    assert (full["n_train"] + full["n_val"], full["n_test"]) == (1437, 360)
    assert cut["name"] != full["name"] and cut["recipe"]["limit"] == 300
    with pytest.raises(DiffstoreError, match="limit= must be >= 1"):
        probe(store_url, t="0", blocks="3", pools="1", limit=0, capsys=capsys)
