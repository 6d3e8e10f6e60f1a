"""diffstore finetune: the truncated network reproduces the stored features before training, gradients stop at
block b on every backend, scratch is the same architecture with other weights, results are stored, listed and
paired with the frozen probe on the same test rows; the model comes only from --model and the data only from
--data-root (both checked against what the arrays recorded), --limit reads only extracted rows, and bad input exits
2 naming the fix."""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import diffstore as ds
from conftest import ADM_SPECS, install_plugin, save_tiny_unet
from diffstore.cli import main
from diffstore.datasets import load_split
from diffstore.errors import DiffstoreError
from diffstore.extract import extract_features, plan_extraction
from diffstore.extract.recorded import recorded
from diffstore.finetune.network import Truncated, check_model, input_rows, output_rows, trainable
from diffstore.finetune.options import FinetuneOptions
from diffstore.finetune.report import KIND
from diffstore.finetune.stage import compute, find_key, load
from diffstore.key import FeatureKey, Recipe
from diffstore.models import load_model
from diffstore.probe.intervals import difference, result_hits
from diffstore.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")
ROWS = 256  # rows [0, 256) of the digits train (1437) and test (360) splits are extracted
FAST = dict(steps=40, min_steps=20, eval_every=10, lrs="0.001", weight_decays="0", batch_size=32, limit=ROWS)
FAST_ARGS = ["--steps", "40", "--min-steps", "20", "--eval-every", "10", "--lrs", "0.001", "--weight-decays", "0",
             "--batch-size", "32", "--limit", str(ROWS), "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_unet(tmp_path_factory.mktemp("ft-model") / "tiny")


@pytest.fixture(scope="module")
def store_url(tiny_dir, tmp_path_factory) -> str:
    """Rows [0, 256) of digits through the tiny U-Net: noised t=10 with 2 noise draws and clean t=10, mid, pool 2
    (the arrays hold the whole split; the rest is not extracted)."""
    url = str(tmp_path_factory.mktemp("ft") / "s.zarr")
    store, model = Store.open(url, "a"), load_model(str(tiny_dir), name="tiny")
    for split in ("train", "test"):
        for input_mode in ("noised", "clean"):
            plan = plan_extraction(store, model, load_split("digits", split), t=[10], blocks=["mid"], pools=["2"],
                                   input=input_mode, noise_draws=2, shard_rows=32, limit=str(ROWS))
            extract_features(plan, batch_size=64, show_progress=False)
    return url


def opts(url, tiny_dir, **kw) -> FinetuneOptions:
    return FinetuneOptions.build({"store": url, "model": str(tiny_dir), "model_name": "tiny", "input": "noised",
                                  "device": "cpu", "show_progress": False, **kw})


def network(url, tiny_dir, **kw):
    """The key's truncated network (as the stage builds it), its test input rows and its stored test features."""
    store, o = Store.open(url, "r"), opts(url, tiny_dir, **kw)
    given = load(o)
    key = replace(find_key(store, o, given), split="test")
    test = recorded(store, key.path, given, None, "")
    model = given if o.start == "pretrained" else load(o, scratch=True)
    rows = input_rows(model, test.data, test.preprocess, key, test.recipe, ROWS)
    return Truncated(model, key, test.recipe), rows, store.features(key)


@pytest.mark.parametrize("input_mode", ["noised", "clean"])
def test_untrained_network_gives_the_stored_features_bit_for_bit(store_url, tiny_dir, input_mode):
    """Bit-identical, not merely close: the same inputs (the store's ids and order, the same noise), the same
    micro-batch partition and kernels give the same float32 values, so the same float16 cast."""
    net, rows, stored = network(store_url, tiny_dir, input=input_mode)
    assert net.draws == (2 if input_mode == "noised" else 1)
    ours = output_rows(net, rows, torch.device("cpu")).read(slice(None))
    assert ours.dtype == np.float32 and ours.shape == (ROWS, *stored.shape[1:])
    assert np.array_equal(ours.astype(np.float16), stored.read(slice(0, ROWS)))


def test_inputs_are_the_stored_split_in_order(store_url, tiny_dir):
    store, o = Store.open(store_url, "r"), opts(store_url, tiny_dir)
    given = load(o)
    key = replace(find_key(store, o, given), split="test")
    assert np.array_equal(recorded(store, key.path, given, None, "").data.ids, store.split("digits", "test").ids)


def diffusers_mid_expected(name: str) -> bool:
    return name.startswith(("conv_in.", "time_embedding.", "down_blocks.", "mid_block."))


def ran_before(model, block: int, x: torch.Tensor) -> set[str]:
    """Parameter names of every module that ran before block b's hook stopped the forward (an independent record)."""
    from diffstore.extract import run_truncated

    seen, handles = set(), []
    for name, m in model.module.named_modules():
        if any(True for _ in m.parameters(recurse=False)):
            handles.append(m.register_forward_pre_hook(lambda _m, _i, name=name: seen.add(name)))
    try:
        run_truncated(model, x, torch.full((len(x),), 10), None, [block])
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.module.named_modules())
    return {f"{m}.{p}" if m else p for m in seen for p, _ in modules[m].named_parameters(recurse=False)}


def backends(tiny_dir, tmp_path):
    yield "diffusers", load_model(str(tiny_dir))
    yield "plugin", load_model("py:" + install_plugin("tiny_unet", tmp_path))
    if ADM_SPECS.is_dir():
        yield "adm", load_model(f"adm:{ADM_SPECS / 'tiny' / 'tiny-uncond.safetensors'}",
                                adm_config=str(ADM_SPECS / "tiny" / "tiny-uncond.json"))


def test_gradients_reach_only_the_modules_up_to_block_b_on_every_backend(tiny_dir, tmp_path):
    for backend, model in backends(tiny_dir, tmp_path):
        size, c = model.image_size, model.image_channels
        x = torch.randn(4, c, size, size)
        for block in sorted({model.blocks.mid or 2, 2}):
            key = FeatureKey("digits", "train", model.name, "noised", 10, block, "1")
            net = Truncated(model, key, Recipe("m", "d", 0, 1, "float32", "float16"))
            n = trainable(net, x)
            names = {name for name, p in model.module.named_parameters() if p.requires_grad}
            assert names == ran_before(model, block, x), (backend, block)
            assert 0 < n < sum(p.numel() for p in model.module.parameters()), (backend, block)
            net(x).square().sum().backward()
            got = {name for name, p in model.module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
            assert got == names, (backend, block)
            if backend == "diffusers" and block == model.blocks.mid:
                assert names == {n for n, _ in model.module.named_parameters() if diffusers_mid_expected(n)}
            model.module.zero_grad(set_to_none=True)


def test_a_network_conditioned_on_the_dataset_labels_is_refused():
    if not ADM_SPECS.is_dir():
        pytest.skip("guided-diffusion specs (shared/specs/adm) not present")
    model = load_model(f"adm:{ADM_SPECS / 'tiny' / 'tiny-cond.safetensors'}",
                       adm_config=str(ADM_SPECS / "tiny" / "tiny-cond.json"))
    with pytest.raises(DiffstoreError, match="--class-label N"):
        check_model(model)


def test_scratch_is_the_same_architecture_with_other_weights_and_features(store_url, tiny_dir):
    pre_net, rows, stored = network(store_url, tiny_dir)
    scratch, _, _ = network(store_url, tiny_dir, start="scratch", init_seed=3)
    a, b = dict(pre_net.network.named_parameters()), dict(scratch.network.named_parameters())
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert any(not torch.equal(a[k], b[k]) for k in a)
    ours = output_rows(scratch, rows, torch.device("cpu")).read(slice(0, 32))
    assert not np.allclose(ours, stored.read(slice(0, 32)).astype(np.float32), atol=1e-2)


@pytest.fixture(scope="module")
def runs(store_url, tiny_dir):
    """The frozen linear probe on rows [0, 256), then the fine-tuned and scratch networks (a few dozen steps each),
    through the Python API."""
    probe = ds.probe(store_url, input="noised", t=10, blocks="mid", pools="2", limit=ROWS, show_progress=False)
    kw = dict(model=str(tiny_dir), model_name="tiny", input="noised", device="cpu", show_progress=False, **FAST)
    ft = ds.finetune(store_url, **kw)
    sc = ds.finetune(store_url, start="scratch", **kw)
    return probe["results"][0], ft, sc


def test_results_are_stored_with_the_probe_row_fields_and_listed(store_url, tiny_dir, runs):
    _, ft, sc = runs
    stored = {r["name"]: r for r in Store.open(store_url, "r").results(KIND)}
    assert set(stored) == {ft["result"]["name"], sc["result"]["name"]}
    for out, start in ((ft, "pretrained"), (sc, "scratch")):
        r = stored[out["result"]["name"]]
        assert (r["kind"], r["from"], r["dataset"], r["model"], r["input"], r["t"], r["block_name"], r["pool"],
                r["head"]["kind"]) == (KIND, start, "digits", "tiny", "noised", 10, "mid", "2", "linear")
        assert r["n_test"] == ROWS and len(result_hits(r)) == ROWS and r["n_train"] + r["n_val"] == ROWS
        assert r["ci95"][0] <= r["top1"] <= r["ci95"][1] and isinstance(r["converged"], bool)
        assert r["top1"] > 0.3  # ten classes: chance is 0.1
    assert ft["result"]["store_check"]["bit_identical"]
    again = compute(opts(store_url, tiny_dir, **FAST))
    assert again["result"]["cached"] and again["result"]["top1"] == ft["result"]["top1"]


def test_paired_comparison_uses_the_frozen_probe_on_the_same_test_rows(store_url, tiny_dir, runs):
    frozen, ft, sc = runs
    out = compute(opts(store_url, tiny_dir, start="scratch", **FAST))
    assert out["frozen"]["name"] == frozen["name"] and out["frozen"]["fingerprints"] == sc["result"]["fingerprints"]
    assert [r["name"] for r in out["runs"]] == [ft["result"]["name"], sc["result"]["name"]]
    diffs = {d["what"]: d for d in out["differences"]}
    for r, what in ((ft["result"], "fine-tuned - frozen probe"), (sc["result"], "scratch - frozen probe")):
        assert diffs[what]["diff"] == pytest.approx(r["top1"] - frozen["top1"])
        assert diffs[what] == {"what": what, "a": r["name"], "b": frozen["name"],
                               **difference(result_hits(r), result_hits(frozen))}
    assert diffs["fine-tuned - scratch"]["diff"] == pytest.approx(ft["result"]["top1"] - sc["result"]["top1"])


def test_options_reach_the_cli_and_the_api_from_one_dataclass():
    import typer.main

    from diffstore import cli

    fields = {f.name: f.default for f in dataclasses.fields(FinetuneOptions)}
    assert {k: p.default for k, p in inspect.signature(ds.finetune).parameters.items()} == fields
    command = typer.main.get_command(cli.app).commands["finetune"]
    flags = {p.name: p.opts for p in command.params}
    assert flags["start"] == ["--from"] and {"model", "model_name", "random_init", "data_root"} <= set(flags)


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["diffstore", "finetune", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        main()
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def test_cli_prints_the_table_and_the_paired_differences(monkeypatch, capsys, store_url, tiny_dir, runs):
    base = ["--store", store_url, "--model", tiny_dir, "--model-name", "tiny", "--input", "noised", *FAST_ARGS]
    code, out, err = cli(monkeypatch, capsys, *base, "--from", "scratch")
    assert code == 0 and "frozen probe" in out and "cached" in out and "fine-tuned - scratch:" in out
    code, out, _ = cli(monkeypatch, capsys, *base, "--json")
    assert code == 0 and json.loads(out)["result"]["name"] == runs[1]["result"]["name"]


@pytest.mark.parametrize("args, message", [
    (["--block", "nope"], "no such block"),
    (["--t", "999"], "no train feature array"),
    (["--from", "nowhere"], "--from must be one of pretrained, scratch"),
    (["--lrs", "0"], "--lrs takes learning rates > 0"),
    (["--limit", "300"], "is incomplete"),  # rows [256, 300) are not extracted
    (["--limit", "5"], "too few to train"),
    (["--model-name", "other"], "no train array of model other"),
    (["--random-init", "5"], "no train array of model tiny.random-init-s5"),
])
def test_bad_input_exits_2_naming_the_fix_and_writes_nothing(monkeypatch, capsys, store_url, tiny_dir, args, message):
    before = Store.open(store_url, "r").result_paths(KIND)
    code, out, err = cli(monkeypatch, capsys, "--store", store_url, "--model", tiny_dir, "--model-name", "tiny",
                         "--input", "noised", *FAST_ARGS, *args)
    assert code == 2 and out == "" and message in err and "Traceback" not in err
    assert Store.open(store_url, "r").result_paths(KIND) == before


def test_another_model_under_the_arrays_name_is_refused_before_anything_runs(monkeypatch, capsys, store_url, tiny_dir):
    """The shipped model named "tiny": its fingerprint is not the arrays', so nothing is loaded or trained; the
    spec the arrays recorded is shown as a hint."""
    before = Store.open(store_url, "r").result_paths(KIND)
    code, out, err = cli(monkeypatch, capsys, "--store", store_url, "--model", "default", "--model-name", "tiny",
                         "--input", "noised", *FAST_ARGS)
    assert code == 2 and out == "" and "was extracted by another model than --model default" in err
    assert f"its attributes record --model {tiny_dir}" in err and "Traceback" not in err
    assert Store.open(store_url, "r").result_paths(KIND) == before


def test_the_model_and_data_root_recorded_in_the_store_are_never_used(monkeypatch, capsys, idx_root, tiny_dir,
                                                                       tmp_path):
    """The store records a py: spec and a data root; finetune loads neither: without --data-root it looks in the
    dataset's default location only, and the recorded spec is never imported."""
    root = shutil.copytree(idx_root["mnist"], tmp_path / "mnist")
    url = str(tmp_path / "m.zarr")
    store, model = Store.open(url, "a"), load_model(str(tiny_dir), name="tiny")
    for split in ("train", "test"):
        plan = plan_extraction(store, model, load_split("mnist", split, str(root)), t=[10], blocks=["mid"], pools=["1"])
        extract_features(plan, show_progress=False)
    marker, planted = tmp_path / "ran", tmp_path / "planted.py"
    planted.write_text(f"open({str(marker)!r}, 'w').close()\ndef factory():\n    raise SystemExit\n")
    for split in ("train", "test"):
        g = store._group(FeatureKey("mnist", split, "tiny", "noised", 10, model.blocks.mid, "1").path)
        g.attrs["model"] = {"name": "tiny", "source": {"spec": f"py:{planted}:factory"}}
    monkeypatch.setenv("DIFFSTORE_DATA", str(tmp_path / "empty"))
    args = ["--store", url, "--model", tiny_dir, "--model-name", "tiny", "--pool", "1", *FAST_ARGS[:-4], "--device",
            "cpu"]
    code, out, err = cli(monkeypatch, capsys, *args)
    assert code == 2 and "needs the data of mnist/train" in err and "pass --data-root" in err
    assert f"extracted from {root}" in err and "Traceback" not in err  # the recorded root: shown, never read
    assert not marker.exists() and Store.open(url, "r").result_paths(KIND) == []
    other = shutil.copytree(idx_root["fashion-mnist"], tmp_path / "other")  # other files under the right name
    code, _, err = cli(monkeypatch, capsys, *args, "--data-root", other)
    assert code == 2 and "dataset fingerprint differs" in err
    code, out, err = cli(monkeypatch, capsys, *args, "--data-root", root, "--steps", "20", "--min-steps", "10")
    assert code == 0 and "fine-tuned" in out and not marker.exists()
