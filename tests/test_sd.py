"""Stable Diffusion backend on a tiny pipeline built here (no download): blocks, latents, prompt, identity, extraction."""

import json
import string

import numpy as np
import pytest
import torch

from diffstore.datasets import Split, load_split
from diffstore.errors import DiffstoreError
from diffstore.extract import encode_images, extract_features, forward_blocks, plan_extraction
from diffstore.key import sha256_files
from diffstore.models import load_model
from diffstore.models.sd import load_sd
from diffstore.store import Store

LATENT = 8  # UNet sample_size; the VAE has 2 levels, so images are 16x16


def write_tokenizer(folder):
    """A real CLIP BPE tokenizer from a minimal vocab.json + merges.txt (letters, digits, one merge chain)."""
    chars = string.ascii_lowercase + string.digits
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars] + ["th", "the</w>"]
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("tiny-sd")
    torch.manual_seed(1234)  # not a seed the random-init tests use
    UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).save_pretrained(root / "unet")
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
        sample_size=2 * LATENT,
    ).save_pretrained(root / "vae")
    CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 vocab_size=1000, max_position_embeddings=16)).save_pretrained(root / "text_encoder")
    write_tokenizer(root / "tokenizer")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(root / "scheduler")
    return root


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
    with torch.autocast("cpu", dtype=torch.bfloat16):  # --compute-dtype must not reach the VAE (fp32, like force_upcast)
        assert torch.equal(z, sd.encode(x))
    vae = AutoencoderKL.from_pretrained(sd_folder / "vae")
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
    assert torch.allclose(z, mean * vae.config.scaling_factor, atol=1e-6)


def test_same_input_gives_identical_blocks(sd):
    z, t = sd.encode(images(2)), 50
    a = forward_blocks(sd, z, t, [0, 1], None, 0, 1, "noised", [1, 5, 10], ["1", "full"])
    b = forward_blocks(sd, z, t, [0, 1], None, 0, 1, "noised", [1, 5, 10], ["1", "full"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a[(5, "full")].shape == (2, 64, LATENT // 2, LATENT // 2)


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
             sd_folder / "vae" / "diffusion_pytorch_model.safetensors", sd_folder / "text_encoder" / "model.safetensors"]
    assert sd.weights_sha256 == sha256_files(files)


def test_random_init_gives_a_different_model_key(sd, sd_folder):
    r0, r0_again, r1 = (load_sd(str(sd_folder), random_init=s) for s in (0, 0, 1))
    assert "random-init" in r0.name and r0.fingerprint != sd.fingerprint
    assert r0.fingerprint == r0_again.fingerprint and r0.fingerprint != r1.fingerprint
    x = images(1)
    assert torch.equal(r0.encode(x), r0_again.encode(x)) and not torch.allclose(r0.encode(x), sd.encode(x))
    assert [b.name for b in r0.blocks] == [b.name for b in sd.blocks]


def test_resolution_sets_latent_size(sd_folder):
    big = load_sd(str(sd_folder), resolution=32)
    assert big.image_size == 32 and big.blocks[1].height == 16 and big.name != load_sd(str(sd_folder)).name
    with pytest.raises(DiffstoreError, match="multiple"):
        load_sd(str(sd_folder), resolution=17)


def test_not_a_pipeline_folder_names_what_is_missing(sd_folder, tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(DiffstoreError, match="vae/, text_encoder/, tokenizer/, scheduler/"):
        load_sd(str(tmp_path))


def test_tiny_sd_extracts_into_a_store(sd_folder, tmp_path):
    digits = load_split("digits", "test")
    rows = 20  # two shards of 16, the second one partial
    split = Split(digits.name, digits.split, digits.ids[:rows], digits.labels[:rows], digits.class_names, digits.source,
                  digits.load)
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
    assert [(r["b"], r["name"], r["C"], r["H"]) for r in rows] == [(b.index, b.name, b.channels, b.height) for b in sd.blocks]
