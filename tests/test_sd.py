"""Stable Diffusion backend on a tiny pipeline built here (no download): blocks, latents, prompt, identity,
extraction."""

import json

import numpy as np
import pytest
import torch

from conftest import SD_LATENT, save_tiny_sd, subset
from diffstore.datasets import load_split
from diffstore.errors import DiffstoreError
from diffstore.extract import encode_images, extract_features, forward_blocks, plan_extraction
from diffstore.key import sha256_files
from diffstore.models import load_model
from diffstore.models.sd import load_sd
from diffstore.noise import noise
from diffstore.store import Store

LATENT = SD_LATENT  # UNet sample_size; the VAE has 2 levels, so images are 16x16


@pytest.fixture(scope="module")
def sd(sd_folder):
    return load_sd(str(sd_folder))


def images(n=2, seed=0, size=2 * LATENT):
    return torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_block_table_covers_unet_down_mid_up_at_latent_size(sd):
    names = [b.name for b in sd.blocks]
    assert names == ["in", "down0.0", "down0.downsample", "down1.0", "mid", "up0.0", "up0.1", "up0.upsample",
                     "up1.0", "up1.1"]
    by = {b.name: b for b in sd.blocks}
    assert (by["in"].channels, by["in"].height) == (32, LATENT)
    assert by["down0.0"].module == "down_blocks.0.attentions.0"  # cross-attention output, not the resnet under it
    assert (by["mid"].channels, by["mid"].height) == (64, LATENT // 2)
    assert (by["up1.1"].channels, by["up1.1"].height) == (32, LATENT)
    assert sd.blocks.resolve("mid") == [by["mid"].index]
    assert (sd.image_size, sd.image_channels, sd.num_timesteps) == (2 * LATENT, 3, 1000)


def test_scheduler_gives_sd_scaled_linear_alphas(sd):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(sd.alphas_cumprod, torch.cumprod(1 - betas, 0), atol=1e-6)


def test_encode_gives_scaled_deterministic_latents(sd, sd_folder):
    from diffusers import AutoencoderKL

    x = images(3)
    z = sd.encode(x)
    assert z.shape == (3, 4, LATENT, LATENT)
    assert torch.equal(z, sd.encode(x))
    # --compute-dtype must not reach the VAE (fp32, like force_upcast)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(z, sd.encode(x))
    vae = AutoencoderKL.from_pretrained(sd_folder / "vae")
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
    assert torch.allclose(z, mean * vae.config.scaling_factor, atol=1e-6)


def test_blocks_equal_a_direct_diffusers_forward_with_the_null_text(sd, sd_folder):
    """The extractor's blocks against diffusers' own UNet2DConditionModel, loaded here, conditioned on the
    CLIP embedding of "" computed here, on x_t noised here with the scheduler's alpha-bar."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    z, t, ids = sd.encode(images(2)), 50, [0, 1]
    ours = forward_blocks(sd, z, t, ids, None, 0, 1, "noised", [1, 5, 10], ["1", "full"])
    tokenizer = CLIPTokenizer.from_pretrained(sd_folder / "tokenizer")
    tokens = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    unet = UNet2DConditionModel.from_pretrained(sd_folder / "unet").eval()
    abar = DDPMScheduler.from_pretrained(sd_folder / "scheduler").alphas_cumprod[t].item()
    x_t = abar ** 0.5 * z + (1 - abar) ** 0.5 * noise(0, ids, t, 0, tuple(z.shape[1:]))
    maps, modules = {}, {1: "conv_in", 5: "mid_block", 10: "up_blocks.1.attentions.1"}
    def keep(b, out):  # attention blocks return (sample,)
        maps[b] = out[0] if isinstance(out, tuple) else out

    handles = [unet.get_submodule(m).register_forward_hook(lambda _m, _i, out, b=b: keep(b, out))
               for b, m in modules.items()]
    with torch.no_grad():
        text = CLIPTextModel.from_pretrained(sd_folder / "text_encoder")(tokens).last_hidden_state
        unet(x_t, torch.tensor([t, t]), encoder_hidden_states=text.expand(2, -1, -1))
    for h in handles:
        h.remove()
    assert [sd.blocks[b].module for b in modules] == list(modules.values())
    for b, direct in maps.items():
        torch.testing.assert_close(ours[(b, "full")], direct, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours[(b, "1")], direct.mean((2, 3), keepdim=True), rtol=1e-4, atol=1e-5)
    assert ours[(5, "full")].shape == (2, 64, LATENT // 2, LATENT // 2)


def test_prompt_changes_features_and_identity(sd, sd_folder):
    cat = load_sd(str(sd_folder), prompt="the cat")
    z = sd.encode(images(2))
    null = forward_blocks(sd, z, 10, [0, 1], None, 0, 1, "clean", [2], ["full"])[(2, "full")]
    with_prompt = forward_blocks(cat, z, 10, [0, 1], None, 0, 1, "clean", [2], ["full"])[(2, "full")]
    assert not torch.allclose(null, with_prompt, atol=1e-4)
    assert cat.fingerprint != sd.fingerprint and cat.name != sd.name
    assert cat.weights_sha256 == sd.weights_sha256  # same weights, different conditioning


def test_weights_hash_covers_unet_vae_text_encoder(sd, sd_folder):
    files = [sd_folder / "unet" / "diffusion_pytorch_model.safetensors",
             sd_folder / "vae" / "diffusion_pytorch_model.safetensors",
             sd_folder / "text_encoder" / "model.safetensors"]
    assert sd.weights_sha256 == sha256_files(files)


def test_resolution_sets_latent_size(sd_folder):
    big = load_sd(str(sd_folder), resolution=32)
    assert big.image_size == 32 and big.blocks[1].height == 16 and big.name != load_sd(str(sd_folder)).name
    with pytest.raises(DiffstoreError, match="multiple"):
        load_sd(str(sd_folder), resolution=17)


def test_sdxl_is_refused(tmp_path):
    """SDXL's UNet needs added (text_time) conditioning that SD 1.x/2.x folders do not carry."""
    xl = save_tiny_sd(tmp_path / "tiny-sdxl", addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=80)
    with pytest.raises(DiffstoreError, match="SDXL.*only SD 1.x/2.x"):
        load_model(f"sd:{xl}")


def test_not_a_pipeline_folder_names_what_is_missing(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(DiffstoreError, match="vae/, text_encoder/, tokenizer/, scheduler/"):
        load_sd(str(tmp_path))


def test_tiny_sd_extracts_into_a_store(sd_folder, tmp_path):
    rows = 20  # two shards of 16, the second one partial
    split = subset(load_split("digits", "test"), rows)
    model = load_model(f"sd:{sd_folder}")
    store = Store.open(str(tmp_path / "sd.zarr"), mode="a")
    plan = plan_extraction(store, model, split, t="0,150", blocks="down0.0,mid", pools="1,full", shard_rows=16)
    extract_features(plan, batch_size=5, show_progress=False)
    keys = store.feature_keys()
    assert len(keys) == 2 * 2 * 2 and all(k.model == model.name for k in keys)
    mid = store.features(next(k for k in keys if k.t == 150 and k.block == model.blocks.mid and k.pool == "full"))
    assert mid.complete and mid.read().shape == (rows, 64, LATENT // 2, LATENT // 2)
    # The stored rows are what one direct forward on the encoded latents gives.
    x0 = encode_images(model, plan.preprocess(split.load(np.arange(rows))))
    direct = forward_blocks(model, x0, 150, split.ids, None, 0, 1, "noised", [model.blocks.mid], ["full"])
    np.testing.assert_array_equal(mid.read(), direct[(model.blocks.mid, "full")].numpy().astype(np.float16))


def test_cli_blocks_lists_the_sd_table(sd, sd_folder):
    from typer.testing import CliRunner

    from diffstore.cli import app

    out = CliRunner().invoke(app, ["blocks", "--model", f"sd:{sd_folder}", "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    assert [(r["b"], r["name"], r["C"], r["H"]) for r in rows] == [(b.index, b.name, b.channels, b.height)
                                                                   for b in sd.blocks]
