"""The ADM U-Net against guided-diffusion: conformance vectors (tiny models, float32) and the official
architecture manifests (keys, shapes, parameter counts, paper block numbering, schedules), all from
shared/specs/adm. The big configs are only ever built on the meta device."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ADM_SPECS as SPECS
from conftest import subset
from diffstore.datasets import load_split
from diffstore.errors import DiffstoreError
from diffstore.extract import extract_features, plan_extraction
from diffstore.key import canonical_json, sha256_files
from diffstore.models import load_model
from diffstore.models.adm import ADM_CONFIGS, SCHEDULES, adm_block_table, adm_config, build_adm, load_adm
from diffstore.noise import add_noise, noise
from diffstore.preprocess import Preprocess
from diffstore.store import Store

pytestmark = [pytest.mark.skipif(not SPECS.is_dir(), reason="guided-diffusion specs (shared/specs/adm) not present"),
              pytest.mark.usefixtures("one_thread")]  # the tolerances were measured on one thread

MANIFESTS = {"256-uncond": "256x256_diffusion_uncond", "256-cond": "256x256_diffusion",
             "128-cond": "128x128_diffusion", "64-cond": "64x64_diffusion"}
TINY = ("tiny-uncond", "tiny-cond")




def manifest(config_name):
    return json.loads((SPECS / f"{MANIFESTS[config_name]}.json").read_text())


def tiny(name, **kw):
    return load_adm(str(SPECS / "tiny" / f"{name}.safetensors"), str(SPECS / "tiny" / f"{name}.json"), **kw)


def forward_with_blocks(model, x, t, labels):
    """The output and every block's output (hooks on the block modules, as the extractor reads them)."""
    outs = {}
    handles = [model.module.get_submodule(b.module).register_forward_hook(
        lambda _m, _i, out, b=b.index: outs.__setitem__(b, out)) for b in model.blocks]
    try:
        with torch.no_grad():
            out = model.run(x, t, labels)
    finally:
        for h in handles:
            h.remove()
    return out, outs


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("name", TINY)
def test_tiny_model_matches_reference_output_and_every_block(name, attention):
    io = load_file(SPECS / "tiny" / f"{name}_io.safetensors")
    spec = json.loads((SPECS / "tiny" / f"{name}.json").read_text())
    model = tiny(name)
    model.set_attention(attention)  # the reference's einsum, or F.scaled_dot_product_attention
    out, blocks = forward_with_blocks(model, io["x"], io["t"], io.get("y"))

    def rel_err(ours, ref):
        return ((ours - ref).abs().max() / ref.abs().max()).item()

    assert out.shape == io["out"].shape == (4, 6, 32, 32)  # learn_sigma: eps and v
    assert rel_err(out, io["out"]) <= 1e-5
    assert sorted(blocks) == [b["b"] for b in spec["blocks"]]
    for b, h in blocks.items():
        assert rel_err(h, io[f"block_{b}"]) <= 1e-5, f"block {b} ({model.blocks[b].module})"


@pytest.mark.parametrize("config_name", MANIFESTS)
def test_architecture_equals_official_manifest(config_name):
    spec = manifest(config_name)
    assert ADM_CONFIGS[config_name] == spec["flags"]
    net = build_adm(config_name, device="meta")
    assert [[k, list(v.shape)] for k, v in net.state_dict().items()] == spec["state_dict"]
    assert sum(p.numel() for p in net.parameters()) == spec["num_params"]
    table = adm_block_table(config_name)
    assert [dict(b=b.index, module=b.module, channels=b.channels, height=b.height, width=b.width)
            for b in table] == spec["blocks"]
    assert table[table.mid].module == "middle_block"
    # use_fp16 casts exactly the reference's tensors (the blocks' convs) and nothing else
    net.convert_to_fp16()
    n_half = sum(v.dtype == torch.float16 for v in net.state_dict().values())
    assert n_half == spec["fp16_check"]["num_float16_tensors_after_convert_to_fp16"]


def test_block_24_of_adm256_is_1024_channels_at_16x16():
    b24 = adm_block_table("256-uncond")[24]
    assert (b24.module, b24.channels, b24.height, b24.width) == ("output_blocks.4", 1024, 16, 16)


@pytest.mark.parametrize("config_name", MANIFESTS)
def test_alphas_cumprod_match_reference_schedule(config_name):
    spec = manifest(config_name)
    abar = SCHEDULES[adm_config(config_name)["noise_schedule"]](spec["diffusion_steps"])
    assert len(abar) == 1000
    for t, value in spec["alphas_cumprod_at"].items():
        assert abar[int(t)].item() == pytest.approx(value, rel=1e-12)


def test_model_schedule_comes_from_config():
    flags = {**adm_config(str(SPECS / "tiny" / "tiny-uncond.json")), "noise_schedule": "cosine"}
    model = load_adm(None, flags, random_init=0)
    assert model.alphas_cumprod[999].item() == pytest.approx(manifest("64-cond")["alphas_cumprod_at"]["999"], rel=1e-12)


def test_strict_load_rejects_missing_renamed_and_foreign_keys(tmp_path):
    state = load_file(SPECS / "tiny" / "tiny-uncond.safetensors")
    config = str(SPECS / "tiny" / "tiny-uncond.json")
    missing = dict(state)
    del missing["out.2.bias"]
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(DiffstoreError, match=r"missing keys: out\.2\.bias"):
        load_adm(str(tmp_path / "missing.safetensors"), config)
    renamed = dict(state)
    renamed["middle_block.1.qkv_renamed.weight"] = renamed.pop("middle_block.1.qkv.weight")
    save_file(renamed, tmp_path / "renamed.safetensors")
    with pytest.raises(DiffstoreError, match=r"unexpected keys: middle_block\.1\.qkv_renamed\.weight"):
        load_adm(str(tmp_path / "renamed.safetensors"), config)
    # a checkpoint named like an official one is checked against that architecture (on meta: no 2 GB alloc)
    save_file(state, tmp_path / "256x256_diffusion_uncond.safetensors")
    with pytest.raises(DiffstoreError, match="does not fit ADM config 256-uncond.*--adm-config"):
        load_adm(str(tmp_path / "256x256_diffusion_uncond.safetensors"), None)


def test_unknown_checkpoint_name_asks_for_adm_config(tmp_path):
    save_file(load_file(SPECS / "tiny" / "tiny-uncond.safetensors"), tmp_path / "mine.safetensors")
    with pytest.raises(DiffstoreError, match="--adm-config"):
        load_adm(str(tmp_path / "mine.safetensors"), None)


def test_pt_checkpoint_loads_with_weights_only_and_matches_safetensors(tmp_path):
    io = load_file(SPECS / "tiny" / "tiny-uncond_io.safetensors")
    torch.save(load_file(SPECS / "tiny" / "tiny-uncond.safetensors"), tmp_path / "ckpt.pt")
    model = load_adm(str(tmp_path / "ckpt.pt"), str(SPECS / "tiny" / "tiny-uncond.json"))
    assert model.weights_sha256 == sha256_files([tmp_path / "ckpt.pt"])
    assert all(p.device.type == "cpu" and not p.requires_grad for p in model.module.parameters())
    with torch.no_grad():
        assert torch.equal(model.run(io["x"], io["t"], None), tiny("tiny-uncond").run(io["x"], io["t"], None))


def test_conditional_model_label_policy():
    io = load_file(SPECS / "tiny" / "tiny-cond_io.safetensors")
    x, t = io["x"][:2], io["t"][:2]
    with pytest.raises(DiffstoreError, match="--class-label"):
        tiny("tiny-cond").run(x, t, None)
    with pytest.raises(DiffstoreError, match="ImageNet class"):
        tiny("tiny-cond").run(x, t, torch.tensor([3, 1000]))
    with pytest.raises(DiffstoreError, match="unconditional"):
        tiny("tiny-uncond", class_label=3)
    constant = tiny("tiny-cond", class_label=207)
    dataset = tiny("tiny-cond")
    with torch.no_grad():
        # the constant label overrides the dataset's labels, and equals passing that label per image
        assert torch.equal(constant.run(x, t, torch.tensor([5, 6])), dataset.run(x, t, torch.tensor([207, 207])))
        assert not torch.equal(dataset.run(x, t, torch.tensor([5, 6])), dataset.run(x, t, torch.tensor([207, 207])))
    # the policy is plain JSON and part of the identity: same weights, different labels -> different model
    canonical_json(constant.config)
    assert constant.config["labels"] == {"policy": "constant", "class_label": 207}
    assert constant.fingerprint != dataset.fingerprint


def test_adm_config_accepts_names_and_spec_files_and_refuses_the_rest(tmp_path):
    assert adm_config("64-cond") == manifest("64-cond")["flags"]
    assert adm_config(str(SPECS / "64x64_diffusion.json")) == manifest("64-cond")["flags"]  # a "flags" object
    tiny_flags = adm_config(str(SPECS / "tiny" / "tiny-cond.json"))  # a "create_model_args" object
    assert tiny_flags["channel_mult"] == "1,2,3,4" and tiny_flags["noise_schedule"] == "linear"
    with pytest.raises(DiffstoreError, match="256-uncond"):
        adm_config("256-uncnd")
    (tmp_path / "typo.json").write_text(json.dumps({"flags": {"num_chanels": 64}}))
    with pytest.raises(DiffstoreError, match="num_chanels"):
        adm_config(str(tmp_path / "typo.json"))
    with pytest.raises(DiffstoreError, match="channel_mult"):
        adm_config({"image_size": 32})


def test_wrapped_checkpoint_is_refused_with_advice(tmp_path):
    torch.save({"model": load_file(SPECS / "tiny" / "tiny-uncond.safetensors"), "step": 3}, tmp_path / "wrapped.pt")
    with pytest.raises(DiffstoreError, match="plain state_dict"):
        load_adm(str(tmp_path / "wrapped.pt"), str(SPECS / "tiny" / "tiny-uncond.json"))


def test_adm_spec_extracts_into_a_store_equal_to_its_own_forward(tmp_path):
    """`--model adm:PATH --adm-config JSON` end to end: digits -> 32x32 RGB -> x_t -> the paper's blocks -> the store,
    against the same network's forward with hooks on its modules (noise and preprocessing applied here)."""
    from typer.testing import CliRunner

    from diffstore.cli import app

    ckpt, config = SPECS / "tiny" / "tiny-uncond.safetensors", str(SPECS / "tiny" / "tiny-uncond.json")
    model = load_model(f"adm:{ckpt}", adm_config=config)
    split = subset(load_split("digits", "test"), 20)  # a full micro-batch and a padded one
    store = Store.open(str(tmp_path / "adm.zarr"))
    plan = plan_extraction(store, model, split, t="90", blocks="2,mid", pools="1,full")
    extract_features(plan, batch_size=8, show_progress=False)
    assert {k.model for k in store.feature_keys()} == {"tiny-uncond"} and len(store.feature_keys()) == 4
    x0 = Preprocess(32, 3)(split.load(np.arange(len(split))))
    x_t = add_noise(x0, noise(0, split.ids, 90, 0, (3, 32, 32)), float(model.alphas_cumprod[90]))
    _, maps = forward_with_blocks(model, x_t, torch.full((len(split),), 90), None)
    for (t, b, p), array in plan.arrays.items():
        direct = maps[b] if p == "full" else maps[b].mean((2, 3), keepdim=True)
        stored = array.read().astype(np.float32)
        np.testing.assert_allclose(stored, direct.numpy(), rtol=2e-3, atol=2e-3 * float(direct.abs().max()),
                                   err_msg=f"b{b} p{p}")
    out = CliRunner().invoke(app, ["blocks", "--model", f"adm:{ckpt}", "--adm-config", config, "--json"])
    assert out.exit_code == 0, out.output
    assert [r["module"] for r in json.loads(out.stdout)] == [b.module for b in model.blocks]


def test_extraction_uses_sdpa_by_default_and_eager_is_another_recipe(tmp_path):
    from diffstore.datasets import load_split
    from diffstore.extract import extract_features, forward_blocks, plan_extraction
    from diffstore.store import Store

    model = tiny("tiny-uncond")
    split = load_split("digits", "test")
    split = split.take(split.ids[:20])
    store = Store.open(str(tmp_path / "s.zarr"))
    plan = plan_extraction(store, model, split, t="50", blocks="mid", pools="1")
    assert plan.recipe.attention == "sdpa"
    model.set_attention("eager")  # the pipeline must put the recipe's attention on the network itself
    extract_features(plan, show_progress=False, workers=0)
    x0 = plan.preprocess(split.load(range(len(split))))
    model.set_attention("sdpa")
    direct = forward_blocks(model, x0, 50, split.ids, None, 0, 1, "noised", [model.blocks.mid], ["1"])
    stored = plan.arrays[(50, model.blocks.mid, "1")].read()
    assert np.array_equal(stored, direct[(model.blocks.mid, "1")].numpy().astype(np.float16))
    with pytest.raises(DiffstoreError, match="attention: stored 'sdpa', requested 'eager'"):
        plan_extraction(store, model, split, t="50", blocks="mid", pools="1", attention="eager")


@pytest.mark.parametrize("new_order", [False, True])
def test_sdpa_attention_equals_the_reference_einsum_in_both_qkv_layouts(new_order):
    from diffstore.models.adm_net import qkv_attention

    qkv = torch.randn(3, 3 * 4 * 8, 37, generator=torch.Generator().manual_seed(0))  # B=3, 4 heads of 8, T=37
    reference = qkv_attention(qkv, 4, new_order)
    fused = qkv_attention(qkv, 4, new_order, sdpa=True)
    assert fused.shape == reference.shape == (3, 32, 37)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(qkv_attention(qkv, 4, not new_order, sdpa=True), reference, atol=1e-3)  # layout matters
