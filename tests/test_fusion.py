"""The fusion head over stored keys: keys of different sizes and channel counts, trained from the store alone
(its model folder deleted), --fuse auto, and the comparison with the best single key and the concatenation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffstore.datasets import load_split
from diffstore.errors import DiffstoreError
from diffstore.extract import extract_features, plan_extraction
from diffstore.models import load_model
from diffstore.probe import ProbeOptions
from diffstore.probe.feed import Rows
from diffstore.probe.fusion import token_rows
from diffstore.probe.recipe import ProbeRecipe
from diffstore.probe.stage import probe_command
from diffstore.store import Store

FAST = dict(recipe="paper", epochs=3, lr=3e-3, dim=16, n_heads=2, hidden="32", show_progress=False)
# block 2: 16 channels at 16x16 (pooled to 8x8 tokens); block 5: 32 channels at 4x4; block 5 p=1: one token
MIXED = "t=0/b=2/p=full,t=50/b=5/p=full,t=0/b=5/p=1"
CHANCE = 0.1  # digits: 10 classes


@pytest.fixture(scope="module")
def model_dir(tiny_unet_dir, tmp_path_factory):
    """A copy of the tiny U-Net folder: deleted once the store is extracted."""
    folder = tmp_path_factory.mktemp("fusion-model") / "tiny"
    shutil.copytree(tiny_unet_dir, folder)
    return folder


@pytest.fixture(scope="module")
def store_url(model_dir, tmp_path_factory):
    """Digits through the tiny U-Net at t=0 and 50, blocks 2 and 5, pools full and 1; then the model is deleted."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    url = str(tmp_path_factory.mktemp("fusion") / "s.zarr")
    store, model = Store.open(url, "a"), load_model(str(model_dir), name="tiny")
    for split in ("train", "test"):
        plan = plan_extraction(store, model, load_split("digits", split), t="0,50", blocks="2,5", pools="full,1",
                               shard_rows=512)
        extract_features(plan, batch_size=512, show_progress=False)
    torch.set_num_threads(threads)
    del model
    shutil.rmtree(model_dir)
    return url


def probe(url, capsys=None, **kw):
    if capsys is not None:
        capsys.readouterr()
    out = probe_command(ProbeOptions.build(store=url, **{**FAST, **kw}), "json").to_json()
    if capsys is not None:
        assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(out))
    return out


def test_token_rows_hold_each_key_pooled_to_at_most_8x8_in_order():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3, 16, 16)).astype(np.float32), rng.normal(size=(5, 4, 2, 2)).astype(np.float32)
    rows = token_rows([Rows.of(a), Rows.of(b)])
    assert rows.row_shape == (3 * 64 + 4 * 4, 1, 1)
    got = rows.read(slice(1, 4))[:, :, 0, 0]
    want_a = F.adaptive_avg_pool2d(torch.from_numpy(a[1:4]), 8).reshape(3, -1).numpy()
    np.testing.assert_allclose(got[:, :192], want_a, rtol=1e-6)
    np.testing.assert_array_equal(got[:, 192:], b[1:4].reshape(3, -1))


def test_keys_of_different_sizes_and_channels_fuse_and_beat_chance(store_url):
    r = probe(store_url, fuse=MIXED, head="fusion", recipe="converged", steps=40)["results"]
    assert len(r) == 1 and r[0]["kind"] == "fusion" and r[0]["t"] == "0+50+0" and r[0]["block"] == "2+5+5"
    # (channels, token side, t, block) per key: 16x16 maps become 8x8 tokens, a p=1 key one token
    assert r[0]["head"]["keys"] == [[16, 8, 0, 2], [32, 4, 50, 5], [32, 1, 0, 5]]
    grid = len(ProbeRecipe.lrs) * len(ProbeRecipe.weight_decays)
    assert r[0]["recipe"]["name"] == "converged" and len(r[0]["val_top1_per_lr_wd"]) == grid
    assert r[0]["top1"] > 3 * CHANCE and r[0]["n_test"] == 360


def test_fusion_trains_from_a_store_whose_model_folder_is_deleted(store_url, model_dir):
    assert not model_dir.exists()
    r = probe(store_url, fuse="t=0/b=2/p=full,t=50/b=2/p=full", head="fusion", retrain=True)["results"]
    assert r[0]["top1"] > 3 * CHANCE and not r[0].get("cached")


def test_auto_fuses_the_top_ranked_keys(store_url):
    out = probe(store_url, fuse="auto", select=3, head="fusion")
    top = [(r["t"], r["block"], r["pool"]) for r in out["ranking"][:3]]
    assert len(out["ranking"]) == 8 and [r["rank"] for r in out["ranking"][:3]] == [1, 2, 3]
    fused = out["results"][0]["keys"]
    assert [(k["t"], k["block"], k["pool"]) for k in fused] == [(t, b, str(p)) for t, b, p in top]


def test_comparison_shows_best_single_key_and_concatenation_with_paired_margins(store_url, capsys):
    out = probe(store_url, capsys, fuse="t=0/b=2/p=full,t=50/b=5/p=full", head="attention,mlp,fusion")
    (line,) = out["fusion"]
    fusion = next(r for r in out["results"] if r["kind"] == "fusion")
    rows = [(row["features"], row["head"]) for row in line["rows"]]
    assert rows == [("best single key", "attention"), ("concatenation", "attention"),
                    ("best single key", "mlp"), ("concatenation", "mlp")]
    singles = [r for r in out["results"] if r["kind"] == "store" and r["head"]["kind"] == "attention"]
    best = max(singles, key=lambda r: r["val_top1"])
    assert len(singles) == 2 and line["rows"][0]["result"] == best["name"]
    for row in line["rows"]:  # paired on the same test samples: the mean difference is the accuracy difference
        assert row["fusion_minus"]["diff"] == pytest.approx(fusion["top1"] - row["top1"], abs=1e-9)
        lo, hi = row["fusion_minus"]["ci95"]
        assert lo <= row["fusion_minus"]["diff"] <= hi
    probe_command(ProbeOptions.build(store=store_url, fuse="t=0/b=2/p=full,t=50/b=5/p=full",
                                     head="attention,mlp,fusion", **FAST)).to_json()
    assert "fusion minus it" in capsys.readouterr().out


@pytest.mark.parametrize("kw, says", [
    (dict(head="fusion"), "--head fusion needs the keys to fuse"),
    (dict(head="fusion", fuse="auto"), "pass --select K with K >= 2"),
    (dict(head="fusion", fuse="t=0/b=2/p=full,t=0/b=5/p=full", baseline="pixels"), "without --head fusion"),
])
def test_refuses_fusion_without_keys(store_url, kw, says):
    with pytest.raises(DiffstoreError, match=says):
        probe(store_url, **kw)
