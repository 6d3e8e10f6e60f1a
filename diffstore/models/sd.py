"""Stable Diffusion (1.x / 2.x) as a feature extractor, as in the paper's Table 4.

A diffusers pipeline folder (or hub id): unet/ (UNet2DConditionModel), vae/ (AutoencoderKL), text_encoder/
(CLIPTextModel), tokenizer/ (CLIPTokenizer), scheduler/ (its alpha-bar schedule). The prompt is encoded once;
the empty prompt is the paper's "null text". Images are encoded to latents (x_0 = mode of the VAE posterior,
scaled by vae.config.scaling_factor, deterministic) and the extractor adds noise in latent space. The block
table covers the UNet only (hooks go there); the VAE runs before it, in `encode`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..blocks import BlockTable
from ..errors import DiffstoreError
from .base import DiffusionModel, load_failure
from .diffusers_unet import folder_identity, model_config, read_alphas_cumprod, resolve_folder, trace_unet

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# transformers' bookkeeping keys: they change with the library version, not with the network.
TEXT_CONFIG_DROP = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures")

# Only the pipeline parts diffstore uses: hub SD repos also hold single-file checkpoints, fp16/non-EMA copies and a
# safety checker (over 10 GB), which would be downloaded and would enter the weights hash.
SD_HUB_PATTERNS = ["model_index.json", "scheduler/*.json", "tokenizer/*", "unet/config.json",
                   "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                   "vae/diffusion_pytorch_model.safetensors",
                   "text_encoder/config.json", "text_encoder/model.safetensors"]


def encode_prompt(tokenizer, text_encoder, prompt: str) -> tuple[torch.Tensor, list[int]]:
    """[1, L, D] encoder_hidden_states as diffusers' StableDiffusionPipeline computes them (no CFG, no clip skip)."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        emb = text_encoder(ids)[0]
    return emb, ids[0].tolist()


def text_encoder_config(root: Path) -> dict:
    """The text encoder's config as written in its folder, less bookkeeping (stable across library versions)."""
    config = json.loads((root / "text_encoder" / "config.json").read_text())
    return {k: v for k, v in config.items() if k not in TEXT_CONFIG_DROP}


def latent_encoder(vae):
    """encode(images) -> latents x_0 = mode of the VAE posterior x vae.config.scaling_factor (deterministic).

    The VAE follows the denoiser's device lazily (DiffusionModel.to moves only the denoiser) and always runs in
    float32: the SD VAE overflows in fp16, which is why diffusers' force_upcast exists.
    """
    scale = float(vae.config.scaling_factor)

    def encode(images):
        if vae.device != images.device:
            vae.to(images.device)
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            return vae.encode(images.float()).latent_dist.mode() * scale

    return encode


def vae_downscale(vae) -> int:
    """Image pixels per latent pixel: 2 per VAE level after the first (8 for SD's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def load_parts(root: Path, random_init: int | None):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    if random_init is None:
        unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=torch.float32, low_cpu_mem_usage=False)
        vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=torch.float32, low_cpu_mem_usage=False)
        # transformers 5 would otherwise keep the file's dtype (fp16 checkpoints stay fp16)
        text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", dtype=torch.float32)
        return unet, vae, text_encoder, tokenizer
    with torch.random.fork_rng():
        torch.manual_seed(random_init)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))
    return unet, vae, text_encoder, tokenizer


def load_sd(spec: str, prompt: str = "", resolution: int | None = None, name: str | None = None,
            random_init: int | None = None) -> DiffusionModel:
    """Stable Diffusion from a pipeline folder or hub id; random_init=seed: same architecture, seeded random weights.

    resolution: image side in pixels (default: the UNet's sample_size x the VAE's downscale factor, 512 for SD 1.x).
    """
    root = resolve_folder(spec, SD_HUB_PATTERNS)
    missing = [p for p in PARTS if not (root / p).is_dir()]
    if missing:
        raise DiffstoreError(f"{root} is not a Stable Diffusion pipeline folder: missing "
                             f"{', '.join(f'{p}/' for p in missing)} "
                             "(expected the diffusers layout unet/ vae/ text_encoder/ tokenizer/ scheduler/)")
    if not (root / "scheduler" / "scheduler_config.json").is_file():
        raise DiffstoreError(f"{root}/scheduler has no scheduler_config.json: SD's alpha-bar schedule comes from it")
    try:
        unet, vae, text_encoder, tokenizer = load_parts(root, random_init)
    except Exception as e:
        raise load_failure(f"could not load Stable Diffusion from {root}", e) from e
    if unet.config.addition_embed_type is not None:
        raise DiffstoreError(f"{root}: the UNet needs added conditioning ({unet.config.addition_embed_type}, "
                             "e.g. SDXL); only SD 1.x/2.x pipelines are supported")
    for m in (unet, vae, text_encoder):
        m.eval().requires_grad_(False)

    vae_scale = vae_downscale(vae)
    sample = unet.config.sample_size
    resolution = resolution or vae_scale * int(sample[0] if isinstance(sample, (list, tuple)) else sample)
    if resolution % vae_scale:
        raise DiffstoreError(f"resolution {resolution} is not a multiple of the VAE's downscale factor {vae_scale}")
    emb, prompt_ids = encode_prompt(tokenizer, text_encoder, prompt)
    del text_encoder  # only its output for this prompt is needed from here on

    def run(x, t, labels):
        return unet(x, t, encoder_hidden_states=emb.to(x.device, x.dtype).expand(len(x), -1, -1))

    alphas, schedule = read_alphas_cumprod(root)
    suffix = f".{resolution}px" + (f".prompt-{hashlib.sha256(prompt.encode()).hexdigest()[:8]}" if prompt else "")
    model_name, weights_sha = folder_identity(spec, root, [root / p for p in ("unet", "vae", "text_encoder")], name,
                                              random_init, suffix)
    model = DiffusionModel(
        name=model_name,
        module=unet,
        blocks=BlockTable([]),
        alphas_cumprod=alphas,
        image_size=resolution,
        image_channels=3,
        config={"class": "StableDiffusion", "unet": model_config(unet), "vae": model_config(vae),
                "text_encoder": text_encoder_config(root), "prompt": prompt, "prompt_ids": prompt_ids,
                "resolution": resolution, "schedule": schedule},
        weights_sha256=weights_sha,
        run=run,
        encode=latent_encoder(vae),
        source={"spec": spec, "folder": str(root)},
    )
    model.blocks = trace_unet(model, (unet.config.in_channels, resolution // vae_scale, resolution // vae_scale))
    return model
