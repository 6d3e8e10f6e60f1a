"""RepFusion from the store: targets, policy, losses, students, distillation without the U-Net."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from conftest import save_tiny_unet
from diffstore import datasets
from diffstore.errors import DiffstoreError
from diffstore.extract import forward_blocks
from diffstore.models import load_model
from diffstore.preprocess import Preprocess
from diffstore.repfusion import analyze_command, finetune_command, targets_command, train_command
from diffstore.repfusion.analyze import AnalyzeConfig, effective_rank
from diffstore.repfusion.distill import DistillConfig, FinetuneConfig, distill
from diffstore.repfusion.losses import LOSSES, Distiller, attention_transfer, rkd_loss
from diffstore.repfusion.policy import TimePolicy, entropy_weight, reinforce_loss
from diffstore.repfusion.students import STUDENTS, build_student
from diffstore.repfusion.targets import TargetsConfig, View, parse_t_grid, resolve_layer, view_images
from diffstore.store import Store

N_TRAIN, N_TEST = 96, 48
GRID = "0:1000:400"  # t = 0, 400, 800
TINY = {"resnet18": 0.125, "wrn28-2": 0.25, "mobilenetv2": 0.25}


pytestmark = pytest.mark.usefixtures("one_thread")  # on a shared CPU, thread contention makes tiny networks 10x slower


def digits_subset(split: str, root, skip_bad) -> datasets.Split:
    """The first rows of sklearn's digits: real images, small enough for a test."""
    full = datasets.load_digits(split)
    n = N_TRAIN if split == "train" else N_TEST
    return datasets.Split("digits-small", split, full.ids[:n], full.labels[:n], full.class_names,
                          {**full.source, "first": n}, full.load)


def save_unet(folder) -> str:
    return str(save_tiny_unet(folder, widths=(8, 16), attention=False))


@pytest.fixture(scope="module")
def small_digits():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(datasets.LOADERS, "digits-small", digits_subset)
        yield "digits-small"


@pytest.fixture(scope="module")
def built(tmp_path_factory, small_digits):
    """A store with pooled targets and maps from a tiny U-Net whose files are then deleted."""
    tmp = tmp_path_factory.mktemp("repfusion")
    model_dir = save_unet(tmp / "unet")
    cfg = TargetsConfig(store=str(tmp / "s.zarr"), dataset=small_digits, model=model_dir, t_grid=GRID, maps=True,
                        device="cpu")
    result = targets_command(cfg, json_out=True, show_progress=False)
    model = load_model(model_dir)
    shutil.rmtree(model_dir)  # from here on no U-Net exists: train/finetune/analyze must not need it
    return {"store": cfg.store, "cfg": cfg, "result": result, "model": model}


def test_t_grid_is_the_union_of_ranges():
    assert parse_t_grid("0:50:10,50:1000:250,7", 1000) == [0, 7, 10, 20, 30, 40, 50, 300, 550, 800]
    for bad in ("0:2000:500", "a:b", "0:10:0"):
        with pytest.raises(DiffstoreError):
            parse_t_grid(bad, 1000)


def test_targets_hold_every_sample_view_and_t(built):
    r, model = built["result"], built["model"]
    assert r["path"] == "targets/digits-small/train/unet/mid_block.resnets.1.conv2/clean"
    assert r["shape"]["pooled"] == [N_TRAIN, 2, 3, 16] and r["shape"]["map"] == [N_TRAIN, 2, 3, 16, 8, 8]
    store = Store.open(built["store"], "r")
    pooled = store.open_array(r["path"] + "/pooled")
    assert pooled.complete and pooled.attrs["t_grid"] == [0, 400, 800]
    assert pooled.attrs["views"] == [View().to_dict(), View(flip=True).to_dict()]
    # row i, view 1, grid point 2 is the teacher's feature of the flipped image i at t = 800
    split = digits_subset("train", None, False)
    model, layer = resolve_layer(model, "mid-conv", torch.zeros(1, 1, 16, 16))
    x0 = view_images(split, np.arange(5), Preprocess(16, 1), View(flip=True))
    direct = forward_blocks(model, x0, 800, split.ids[:5], None, 0, 1, "clean", [layer.block], ["1"])
    np.testing.assert_allclose(pooled.read(slice(0, 5))[:, 1, 2], direct[(layer.block, "1")].flatten(1).numpy(),
                               rtol=2e-3, atol=2e-3)  # float16 storage


def test_targets_rerun_is_a_no_op_and_another_grid_is_refused(built, tmp_path):
    cfg = built["cfg"]
    model_dir = save_unet(tmp_path / "unet")  # the same seeded weights under the same name
    again = targets_command(TargetsConfig(**{**cfg.__dict__, "model": model_dir}), json_out=True, show_progress=False)
    assert again["shards_written"] == 0 and again["fingerprint"] == built["result"]["fingerprint"]
    with pytest.raises(DiffstoreError, match="t_grid"):
        targets_command(TargetsConfig(**{**cfg.__dict__, "model": model_dir, "t_grid": "0:1000:500"}),
                        show_progress=False)


def test_layer_resolves_blocks_modules_and_the_mid_conv(built):
    model, x = built["model"], torch.zeros(1, 1, 16, 16)
    assert resolve_layer(model, "mid", x)[1].name == f"b{model.blocks.mid}"
    assert resolve_layer(model, "mid_block", x)[1].name == f"b{model.blocks.mid}"
    extended, layer = resolve_layer(model, "down_blocks.1.resnets.0.conv1", x)
    assert layer.block == len(model.blocks) + 1 and (layer.info.channels, layer.info.height) == (16, 8)
    assert extended.blocks[layer.block].module == "down_blocks.1.resnets.0.conv1"
    with pytest.raises(DiffstoreError, match="neither a block"):
        resolve_layer(model, "mid_blok", x)


def test_policy_moves_toward_the_rewarded_t():
    torch.manual_seed(0)
    k, rewarded = 5, 3
    policy = TimePolicy(1, k, width=4, hidden=16)
    x = torch.randn(32, 1, 16, 16)
    start = torch.softmax(policy(x), 1)[:, rewarded].mean().item()
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for step in range(60):
        logits = policy(x)
        t = torch.distributions.Categorical(logits=logits).sample()
        loss = reinforce_loss(logits, t, (t == rewarded).float(), entropy_weight(step, 60), baseline=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = torch.softmax(policy(x), 1)[:, rewarded].mean().item()
    assert start == pytest.approx(1 / k) and end > 0.6


def test_reinforce_gradient_raises_the_log_prob_of_a_positive_reward():
    logits = torch.zeros(4, 6, requires_grad=True)
    t = torch.tensor([1, 1, 2, 2])
    reinforce_loss(logits, t, torch.tensor([1.0, 1.0, 0.0, 0.0]), lam=0.0, baseline=False).backward()
    assert (logits.grad[:2, 1] < 0).all()  # descent raises logit 1 where it was rewarded
    assert torch.equal(logits.grad[2:], torch.zeros(2, 6))  # zero reward, no baseline: no update


def test_entropy_weight_decays_from_lambda_to_zero():
    assert entropy_weight(0, 100) == 0.1 and entropy_weight(50, 100) == pytest.approx(0.05)
    assert entropy_weight(100, 100) == 0


@pytest.mark.parametrize("loss", LOSSES)
def test_each_loss_vanishes_on_a_matched_student_and_falls_as_it_learns(loss):
    torch.manual_seed(0)
    z_map = torch.randn(6, 16, 4, 4)
    z = z_map.mean((2, 3))  # the pooled target is the map's average, as stored targets are
    matched = Distiller(loss, 16, 16)
    if matched.proj is not None:  # hint: an identity projection
        nn.init.eye_(matched.proj.weight.view(16, 16)), nn.init.zeros_(matched.proj.bias)
    assert matched(z_map.clone(), z, z_map).item() < 1e-6
    # A random student map of another width: the loss is clearly positive and gradient steps on the student
    # (and the projection) bring it down.
    s_map = torch.randn(6, 12, 4, 4, requires_grad=True)
    distiller = Distiller(loss, 12, 16)
    opt = torch.optim.Adam([s_map, *distiller.parameters()], lr=0.05)
    losses = []
    for _ in range(30):
        value = distiller(s_map, z, z_map)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
    assert losses[0] > 1e-3 and losses[-1] < 0.3 * losses[0], losses[::10]


def test_relational_losses_vanish_on_matching_structure():
    z, m = torch.randn(8, 16), torch.randn(8, 16, 4, 4)
    assert rkd_loss(3 * z, z) < 1e-6  # distances are normalised by their mean: scale does not matter
    assert attention_transfer(m, m) == 0


@pytest.mark.parametrize("name", STUDENTS)
def test_students_run_at_32_rgb_and_at_the_default_models_16_grey(name):
    for channels, size in ((3, 32), (1, 16)):
        student = build_student(name, 10, channels, TINY[name])
        fmap = student.features(torch.randn(2, channels, size, size))
        assert fmap.shape[:2] == (2, student.feature_channels) and student.classify(fmap).shape == (2, 10)


def test_train_and_finetune_never_load_the_unet(built, monkeypatch, capsys):
    def no_unet(*args, **kwargs):
        raise AssertionError("the U-Net was loaded")

    monkeypatch.setattr("diffstore.models.load_model", no_unet)
    monkeypatch.setattr("diffstore.repfusion.commands.load_model", no_unet)
    trained = train_command(DistillConfig(store=built["store"], loss="hint", epochs=4, batch_size=32, width=0.125,
                                          decoder_steps=20), show_progress=False)
    assert sum(trained["distribution"]) == pytest.approx(1, abs=1e-4) and len(trained["distribution"]) == 3
    losses = [h["distill_loss"] for h in trained["history"]]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses  # the student learns the stored targets
    capsys.readouterr()
    tuned = finetune_command(FinetuneConfig(store=built["store"], run=trained["run"], epochs=6, batch_size=32),
                             json_out=True, show_progress=False)
    printed = json.loads(capsys.readouterr().out)
    assert printed["distilled_acc"] == tuned["distilled_acc"]
    # 10 classes, 48 test images: chance is 0.1 (P(>= 10 right by chance) ~ 2%); seeded, so no flake
    assert tuned["distilled_acc"] > 0.4 and tuned["scratch_acc"] > 0.2, (tuned["distilled_acc"], tuned["scratch_acc"])
    assert tuned["n_train"] == N_TRAIN and tuned["n_test"] == N_TEST
    stages = {r["stage"] for r in Store.open(built["store"], "r").results("repfusion")}
    assert {"distill", "finetune"} <= stages


def test_distillation_is_reproducible_with_a_seed(built):
    def run(name, seed):
        return distill(DistillConfig(store=built["store"], epochs=1, batch_size=32, width=0.125, decoder_steps=20,
                                     seed=seed, run=name), show_progress=False)

    a, b, c = run("seed0-a", 0), run("seed0-b", 0), run("seed1", 1)
    assert a["history"] == b["history"] and a["distribution"] == b["distribution"]
    assert a["history"] != c["history"]
    assert run("seed0-a", 0)["cached"]  # the same run again is read back, not retrained


def test_at_loss_needs_stored_maps_and_a_prefix_split_loads_back(tmp_path, small_digits):
    model_dir = save_unet(tmp_path / "unet")
    cfg = TargetsConfig(store=str(tmp_path / "s.zarr"), dataset=small_digits, model=model_dir, t_grid="0,500",
                        views="none", limit=40, device="cpu")
    r = targets_command(cfg, json_out=True, show_progress=False)
    assert r["path"].startswith("targets/digits-small/train/") and r["shape"]["pooled"] == [40, 1, 2, 16]
    with pytest.raises(DiffstoreError, match="--maps"):
        distill(DistillConfig(store=cfg.store, loss="at", epochs=1, width=0.125, decoder_steps=5), show_progress=False)
    hint = distill(DistillConfig(store=cfg.store, epochs=1, width=0.125, decoder_steps=5), show_progress=False)
    assert len(hint["decoder_acc_by_t"]) == 2  # the 40-image prefix was reloaded, row-aligned with its targets


def test_analyze_measures_rank_per_t_and_writes_plots(built, tmp_path):
    r = analyze_command(AnalyzeConfig(store=built["store"], out=str(tmp_path), tsne_ts=2, tsne_points=60),
                        json_out=True)
    # the same measure recomputed here with numpy from the stored targets (identity view, one t at a time)
    z = Store.open(built["store"], "r").open_array(built["result"]["path"] + "/pooled").read()[:, 0].astype(np.float64)
    want = []
    for k in range(z.shape[1]):
        s = np.linalg.svd(z[:, k] - z[:, k].mean(0), compute_uv=False)
        p = s / s.sum()
        want.append(float(np.exp(-(p * np.log(p)).sum())))
    np.testing.assert_allclose(r["effective_rank"], want, rtol=1e-9)
    assert len(set(np.round(want, 3))) == 3  # one value per t, not a constant
    assert all(p.endswith(".png") and (tmp_path / p).exists() for p in r["pngs"])
    assert effective_rank(np.ones(4)) == pytest.approx(4) and effective_rank(np.array([1.0, 0, 0])) == pytest.approx(1)
