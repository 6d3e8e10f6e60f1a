"""CKA invariants (Kornblith et al. 2019) on synthetic data, the streaming estimators, and `diffstore cka` end to
end."""

import json

import numpy as np
import pytest
import zarr
from scipy.stats import ortho_group

from conftest import feature_array
from diffstore.cka import CKAConfig, cka, cka_matrix, stage
from diffstore.cka import math as cka_math
from diffstore.cka.options import CKAOptions
from diffstore.cka.stage import parse_keyset
from diffstore.datasets import Split
from diffstore.errors import DiffstoreError
from diffstore.key import FeatureKey, Recipe
from diffstore.store import Store

EXACT = CKAConfig(method="exact", chunk_rows=97)
MINI = CKAConfig(method="minibatch", batch_size=128, block_rows=64, window_rows=1024)
RBF = CKAConfig(method="minibatch", kernel="rbf", batch_size=128, block_rows=64, window_rows=1024)


def related(n=2000, shared=6, seed=0):
    """X and Y sharing a `shared`-dim latent, each with its own noise dimensions; non-zero means, so that an
    estimator that forgets to center fails."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, shared))
    x = np.c_[z @ rng.normal(size=(shared, 10)), rng.normal(size=(n, 6))]
    y = np.c_[np.tanh(z) @ rng.normal(size=(shared, 12)), 0.5 * rng.normal(size=(n, 4))]
    return x + 2.0, y - 1.0


def reference_linear_cka(x, y):
    """Textbook formula in sample space: HSIC = tr(K H L H) with K = X X^T, H = I - 11^T/n."""
    n = len(x)
    h = np.eye(n) - 1 / n
    kx, ky = h @ x @ x.T @ h, h @ y @ y.T @ h
    return np.trace(kx @ ky) / np.sqrt(np.trace(kx @ kx) * np.trace(ky @ ky))


@pytest.mark.parametrize("cfg", [EXACT, MINI, RBF], ids=["exact", "minibatch", "rbf"])
def test_cka_of_an_array_with_itself_is_one(cfg):
    x, _ = related()
    assert cka(x, x, cfg) == pytest.approx(1.0, abs=1e-12)
    assert cka(x, x.copy(), cfg) == pytest.approx(1.0, abs=1e-12)  # a copy is read separately, same value


@pytest.mark.parametrize("cfg", [EXACT, MINI, RBF], ids=["exact", "minibatch", "rbf"])
def test_cka_is_symmetric(cfg):
    x, y = related()
    assert cka(x, y, cfg) == pytest.approx(cka(y, x, cfg), abs=1e-12)
    assert 0.2 < cka(x, y, cfg) < 0.95  # a non-trivial value, so symmetry is not 1 == 1


@pytest.mark.parametrize("cfg", [EXACT, MINI, RBF], ids=["exact", "minibatch", "rbf"])
def test_invariant_to_orthogonal_transforms_and_isotropic_scaling(cfg):
    x, y = related()
    q_x, q_y = ortho_group.rvs(x.shape[1], random_state=1), ortho_group.rvs(y.shape[1], random_state=2)
    base = cka(x, y, cfg)
    assert cka(x @ q_x, y, cfg) == pytest.approx(base, abs=1e-9)
    assert cka(x, 3.7 * y @ q_y, cfg) == pytest.approx(base, abs=1e-9)
    assert cka(0.01 * x @ q_x, 50 * y, cfg) == pytest.approx(base, abs=1e-9)


@pytest.mark.parametrize("cfg", [EXACT, MINI], ids=["exact", "minibatch"])
def test_not_invariant_to_a_general_invertible_linear_map(cfg):
    x, y = related()
    # Stretch one noise direction of x 30x: invertible, but it changes which directions dominate.
    a = np.eye(x.shape[1]) + 0.1 * np.random.default_rng(3).normal(size=(x.shape[1],) * 2)
    a[-1] *= 30
    assert abs(np.linalg.det(a)) > 1e-3
    assert abs(cka(x @ a, y, cfg) - cka(x, y, cfg)) > 0.1


def test_independent_random_features_are_near_zero_with_the_unbiased_estimator():
    """The biased full-batch estimate of independent D=64 features is inflated (~D/N = 0.016); unbiased HSIC
    is not (|estimate| < 0.003 over seeds 0..5 with N=4096, n=256)."""
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(4096, 64)) + 1.0, rng.normal(size=(4096, 64)) - 3.0
    mini = cka(x, y, CKAConfig(method="minibatch", batch_size=256))
    assert abs(mini) < 0.01
    assert cka(x, y, EXACT) > 0.01  # so the test above would catch a biased minibatch estimator


def test_minibatch_agrees_with_exact_within_tolerance():
    """Tolerance 0.03 (absolute) on N=4000 rows, D=16: the minibatch estimate (n=128, unbiased HSIC) and the
    exact full-batch value converge to the same population CKA; the gap is sampling noise plus the O(D/N)
    bias of the full-batch estimate. Observed gaps here are below 0.01."""
    x, y = related(n=4000)
    exact = cka(x, y, EXACT)
    for seed in (0, 1):
        mini = cka(x, y, CKAConfig(method="minibatch", batch_size=128, seed=seed, block_rows=64, window_rows=1024))
        assert abs(mini - exact) < 0.03


def test_exact_streaming_over_chunks_equals_the_in_memory_formula(tmp_path):
    x, y = related(n=600)
    x = x + 1e3  # a large mean: streamed centering must not cancel catastrophically
    x_before, want = x.copy(), reference_linear_cka(x, y)
    zx = zarr.create_array(tmp_path / "x.zarr", shape=x.shape, chunks=(50, x.shape[1]), dtype="float64")
    zx[:] = x
    for chunk in (1, 7, 600, 10_000):
        assert cka(x, y, CKAConfig(chunk_rows=chunk)) == pytest.approx(want, rel=1e-10)
    assert cka(zx, y, CKAConfig(chunk_rows=128)) == pytest.approx(want, rel=1e-10)
    assert np.array_equal(x, x_before)  # inputs are read, never centered in place


class CountingRows:
    """An array-like that counts the rows read from it (cka reads `x[a:b]`)."""

    def __init__(self, x):
        self.x, self.shape, self.dtype, self.rows_read = x, x.shape, x.dtype, 0

    def __getitem__(self, sl):
        out = self.x[sl]
        self.rows_read += len(out)
        return out


def test_matrix_reuses_grams_and_equals_pairwise_values(monkeypatch):
    x, y = related()
    w = np.random.default_rng(5).normal(size=(len(x), 3, 2, 2))  # rows are flattened: [N, 3, 2, 2] -> [N, 12]
    products = []
    monkeypatch.setattr(cka_math, "accumulate", lambda g, zi, zj: products.append(1) or g.__iadd__(zi.T @ zj))
    for cfg in (EXACT, MINI):
        counted = [CountingRows(a) for a in (x, y, w)]
        products.clear()
        res = cka_matrix(counted, cfg=cfg)
        m = res.matrix
        # one pass over each array for the whole matrix (exact also re-reads its first chunk for the shift)
        assert all(c.rows_read <= len(x) + EXACT.chunk_rows for c in counted), [c.rows_read for c in counted]
        if cfg is EXACT:  # per chunk: 3 own Grams + 3 cross terms, not 3 per pair
            assert len(products) == 6 * -(-len(x) // EXACT.chunk_rows)
        assert np.allclose(m, m.T) and np.allclose(np.diag(m), 1)
        assert m[0, 1] == pytest.approx(cka(x, y, cfg), abs=1e-12)
        assert m[1, 2] == pytest.approx(cka(y, w, cfg), abs=1e-12)
        assert np.allclose(cka_matrix([x], [y, w], cfg=cfg).matrix, m[:1, 1:], atol=1e-12)
        assert res.n_used == (len(x) if cfg.method == "exact" else len(x) // cfg.batch_size * cfg.batch_size)


def test_auto_runs_exact_when_its_grams_fit_and_minibatch_otherwise():
    x, y = related()
    assert cka_matrix([x, y], cfg=CKAConfig(method="auto")).method == "exact"
    small = CKAConfig(method="auto", max_gram_gib=1e-6, batch_size=128)
    assert cka_matrix([x, y], cfg=small).method == "minibatch"
    with pytest.raises(DiffstoreError, match="--method minibatch"):
        cka(x, y, CKAConfig(method="exact", max_gram_gib=1e-6))


def test_same_seed_gives_identical_minibatch_estimate_and_the_seed_matters():
    x, y = related()
    assert cka(x, y, MINI) == cka(x, y, MINI)
    other = CKAConfig(method="minibatch", batch_size=128, block_rows=64, window_rows=1024, seed=7)
    assert cka(x, y, other) != cka(x, y, MINI)


def test_mismatched_sample_counts_and_bad_settings_are_refused():
    x, y = related()
    with pytest.raises(DiffstoreError, match="row-aligned"):
        cka(x, y[:-1], EXACT)
    with pytest.raises(DiffstoreError, match="minibatch"):
        CKAConfig(method="exact", kernel="rbf")
    with pytest.raises(DiffstoreError, match="batch"):
        cka(x, y, CKAConfig(method="minibatch", batch_size=4096))


# --- the stage, on a real store --------------------------------------------------------------------------

def make_store(url, n=300, ids=None, split="train", blocks=(1, 2, 3), ts=(10, 90), seed=0, dataset_fp=None,
               model="tiny") -> Store:
    """A store with random-but-related features for each (t, block) at pool 2: block b at time t mixes a shared
    latent with noise whose weight grows with b and t, so the matrix has structure."""
    store = Store.open(str(url), mode="a")
    ids = np.arange(n, dtype=np.int64) if ids is None else ids
    rng = np.random.default_rng(seed)
    sp = Split("toy", split, ids, rng.integers(0, 3, n).astype(np.int64), ["a", "b", "c"], {"kind": "synthetic"})
    store.put_split(sp)
    recipe = Recipe("m" * 64, dataset_fp or sp.ids_sha256() + split, 0, 1, "float32", "float16")
    z = rng.normal(size=(n, 6))
    for t in ts:
        for b in blocks:
            feats = z @ rng.normal(size=(6, 16)) + (b * t / 90) * rng.normal(size=(n, 16))
            block = {"index": b, "name": f"down{b}", "module": f"m{b}", "channels": 4, "height": 4, "width": 4}
            feature_array(store, FeatureKey("toy", split, model, "noised", t, b, "2"), recipe, (4, 2, 2), n, 128,
                          rows=feats.reshape(-1, 4, 2, 2), block=block)
    return store


def cka_command(store, json_out=False, **kw):
    return stage.cka_command(CKAOptions.build(store=store, **kw), "json" if json_out else None)


def test_cka_command_block_matrix_end_to_end(tmp_path, capsys):
    url = tmp_path / "s.zarr"
    make_store(url)
    payload = cka_command(str(url), by="block", t="90", json_out=True, out=str(tmp_path / "out"),
                          plot=str(tmp_path / "plot"), show_progress=False)
    printed = json.loads(capsys.readouterr().out)
    assert printed["matrix"] == payload["matrix"]
    m = np.array(payload["matrix"])
    assert m.shape == (3, 3) and np.allclose(np.diag(m), 1, atol=1e-9) and np.allclose(m, m.T)
    assert m[0, 1] > m[0, 2]  # noise grows with b: block 1 is closer to 2 than to 3
    assert [r["label"] for r in payload["rows"]] == ["b1 down1", "b2 down2", "b3 down3"]
    assert payload["n"] == 300 and payload["method"] == "unbiased"
    assert (tmp_path / "out" / f"{payload['name']}.json").exists()
    assert (tmp_path / "plot" / f"{payload['name']}.png").stat().st_size > 1000
    stored = Store.open(str(url), mode="r").results("cka")
    assert [r["name"] for r in stored] == [payload["name"]] and stored[0]["matrix"] == payload["matrix"]


def test_a_random_init_twins_matrix_is_stored_under_a_name_holding_its_model(tmp_path):
    # `make cka` draws every model of a store, the twin too: its result name holds NAME.random-init-sS mid-name
    url = tmp_path / "s.zarr"
    make_store(url, model="tiny.random-init-s0")
    payload = cka_command(str(url), by="block", t="90", show_progress=False)
    assert "tiny.random-init-s0" in payload["name"]
    assert [r["name"] for r in Store.open(str(url), mode="r").results("cka")] == [payload["name"]]


def test_make_cka_draws_every_model_of_a_store_the_twin_too(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    url, out = tmp_path / "s.zarr", tmp_path / "cka"
    make_store(url, split="test")
    make_store(url, split="test", model="tiny.random-init-s0")
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "pipelines" / "cka.py"),
                           "--store", str(url), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    # per model: block x block at t=10 and t=90, t x t at blocks 1-3
    assert len(list(out.glob("*.png"))) == len(list(out.glob("*.json"))) == 2 * (2 + 3)
    assert len(list(out.glob("*tiny.random-init-s0*.png"))) == 5


def test_cka_command_minibatch_t_matrix_records_batch_size_and_seed(tmp_path):
    url = tmp_path / "s.zarr"
    make_store(url)
    payload = cka_command(str(url), by="t", block="2", method="minibatch", batch_size=64, seed=3,
                          json_out=True, show_progress=False)
    assert (payload["batch_size"], payload["seed"], payload["n_used"]) == (64, 3, 256)
    assert [r["label"] for r in payload["rows"]] == ["t=10", "t=90"]


def test_cka_command_keysets_across_stores(tmp_path):
    make_store(tmp_path / "a.zarr", seed=0)
    make_store(tmp_path / "b.zarr", seed=0)
    payload = cka_command(str(tmp_path / "a.zarr"), a="t=90/b=1/p=2,t=90/b=3/p=2", b="t=90/b=1/p=2",
                          store_b=str(tmp_path / "b.zarr"), json_out=True, show_progress=False)
    assert np.array(payload["matrix"]).shape == (2, 1)
    assert payload["matrix"][0][0] == pytest.approx(1.0)  # same seed -> identical arrays in both stores


def test_cka_command_refuses_mismatched_sample_sets(tmp_path):
    make_store(tmp_path / "a.zarr")
    make_store(tmp_path / "b.zarr", ids=np.arange(300, dtype=np.int64)[::-1].copy())  # same size, other order
    with pytest.raises(DiffstoreError, match="other sample ids"):
        cka_command(str(tmp_path / "a.zarr"), a="t=90/b=1/p=2", store_b=str(tmp_path / "b.zarr"), show_progress=False)
    # Same images in the same order under other preprocessing (another network's input size) do compare.
    make_store(tmp_path / "e.zarr", dataset_fp="other-preprocessing")
    out = cka_command(str(tmp_path / "a.zarr"), a="t=90/b=1/p=2", store_b=str(tmp_path / "e.zarr"),
                      show_progress=False, save=False)
    assert len(out["dataset_fingerprints"]) == 2
    # A store whose split record holds other ids than its arrays' recipe says is caught by the ids check.
    make_store(tmp_path / "c.zarr", ids=np.arange(1, 301, dtype=np.int64), dataset_fp="same")
    make_store(tmp_path / "d.zarr", dataset_fp="same")
    with pytest.raises(DiffstoreError, match="other sample ids"):
        cka_command(str(tmp_path / "c.zarr"), a="t=90/b=1/p=2", store_b=str(tmp_path / "d.zarr"), show_progress=False)
    make_store(tmp_path / "a.zarr", split="test", blocks=(1,), ts=(90,))  # one store, two splits
    with pytest.raises(DiffstoreError, match="different sample sets"):
        cka_command(str(tmp_path / "a.zarr"), a="t=90/b=1/p=2/split=train,t=90/b=1/p=2/split=test",
                    show_progress=False)


def test_ambiguous_or_unknown_selection_names_the_choices(tmp_path):
    url = tmp_path / "s.zarr"
    make_store(url)
    with pytest.raises(DiffstoreError, match="several t values.*10, 90.*--t"):
        cka_command(str(url), by="block", show_progress=False)
    with pytest.raises(DiffstoreError, match="no feature array"):
        cka_command(str(url), by="block", t="50", show_progress=False)
    with pytest.raises(DiffstoreError, match="name=value"):
        parse_keyset("t90/b5")
    assert parse_keyset("model=x/t=90/b=5/p=full") == [{"model": "x", "t": 90, "block": 5, "pool": "full"}]
