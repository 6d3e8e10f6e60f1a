"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") as a feature extractor.

A diffusers pipeline folder or hub id (facebook/DiT-XL-2-256; one code path: a hub id is resolved to its local
snapshot folder): transformer/ (DiTTransformer2DModel), vae/ (AutoencoderKL), scheduler/ (its alpha-bar schedule).
Images are encoded to latents as for Stable Diffusion (sd.latent_encoder) and noise is added in latent space.

Blocks: the transformer blocks in forward order, named layer1..layerN, b = depth, the numbering of the DiT/SiT/REPA
layer sweeps (REPA aligns "layer 8" = b 8). Each block's tokens [B, N, C] are read as a map [C, h, w] over the patch
grid (tokens.py), so every pool and head works unchanged; the patch embedding (a linear projection) is left out to
keep b = depth. Early exit: nothing after the deepest requested block runs.

Class labels: DiT is class-conditional and was trained with label dropout, so it has a learned null class (index
num_classes, the "unconditional" embedding of classifier-free guidance). Default: the null class for every image,
i.e. unconditional features. --class-label N: class N for every image; --class-label dataset: the dataset's labels
(meaningful only when they are the model's class indices, ImageNet's for the released checkpoints). The policy is
part of the model's config, hence of every feature fingerprint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..blocks import BlockTable, trace_blocks
from ..errors import DiffstoreError
from .base import DiffusionModel, class_labels, load_failure
from .diffusers_unet import folder_identity, model_config, read_alphas_cumprod, resolve_folder
from .sd import latent_encoder, vae_downscale
from .tokens import token_maps

PARTS = ("transformer", "vae", "scheduler")
# Only what diffstore reads. The hub's facebook/DiT-* main branches hold .bin weights only (safetensors copies sit in
# an unmerged PR): safetensors are fetched when a repo has them, else the .bin files.
HUB_CONFIGS = ["model_index.json", "scheduler/*.json", "transformer/config.json", "vae/config.json"]
HUB_WEIGHTS = {suffix: [f"{p}/diffusion_pytorch_model.{suffix}" for p in ("transformer", "vae")]
               for suffix in ("safetensors", "bin")}


def resolve_dit(spec: str) -> Path:
    """The local pipeline folder of a folder or hub id, downloading one weight format only."""
    root = resolve_folder(spec, HUB_CONFIGS + HUB_WEIGHTS["safetensors"])
    if not Path(spec).expanduser().is_dir() and not (root / HUB_WEIGHTS["safetensors"][0]).is_file():
        root = resolve_folder(spec, HUB_CONFIGS + HUB_WEIGHTS["bin"])
    return root


def load_parts(root: Path, random_init: int | None):
    """(transformer, vae): safetensors when present, else .bin through diffusers' torch.load(weights_only=True)."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    if random_init is None:
        kwargs = dict(torch_dtype=torch.float32, low_cpu_mem_usage=False)
        return (DiTTransformer2DModel.from_pretrained(root / "transformer", **kwargs),
                AutoencoderKL.from_pretrained(root / "vae", **kwargs))
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(random_init)
        return (DiTTransformer2DModel.from_config(DiTTransformer2DModel.load_config(root / "transformer")),
                AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae")))


def label_policy(class_label: int | str | None, num_classes: int) -> dict:
    """The labels every image is conditioned on, as plain JSON (part of the model's identity)."""
    if class_label is None:
        return {"policy": "null", "class_label": num_classes}
    if class_label == "dataset":
        return {"policy": "dataset", "class_label": None}
    if isinstance(class_label, int) and 0 <= class_label <= num_classes:
        return {"policy": "null" if class_label == num_classes else "constant", "class_label": class_label}
    raise DiffstoreError(f"--class-label {class_label}: this DiT has classes 0..{num_classes - 1} and the null class "
                         f"{num_classes}; pass one of those, or 'dataset' for the dataset's labels")


def load_dit(spec: str, name: str | None = None, random_init: int | None = None,
             class_label: int | str | None = None) -> DiffusionModel:
    """DiT from a pipeline folder or hub id; random_init=seed: same architecture, seeded random weights."""
    root = resolve_dit(spec)
    missing = [p for p in PARTS if not (root / p).is_dir()]
    if missing:
        raise DiffstoreError(f"{root} is not a DiT pipeline folder: missing {', '.join(f'{p}/' for p in missing)} "
                             "(expected the diffusers layout transformer/ vae/ scheduler/)")
    try:
        net, vae = load_parts(root, random_init)
    except Exception as e:
        raise load_failure(f"could not load DiT from {root}", e) from e
    for m in (net, vae):
        m.eval().requires_grad_(False)
    num_classes = int(net.config.num_embeds_ada_norm)
    labels_cfg = label_policy(class_label, num_classes)
    label = "dataset" if labels_cfg["policy"] == "dataset" else labels_cfg["class_label"]

    def run(x, t, labels):
        return net(x, t, class_labels=class_labels(label, labels, len(x), num_classes, x.device))

    suffix = {"null": "", "dataset": ".labels-dataset"}.get(labels_cfg["policy"], f".class{label}")
    model_name, weights_sha = folder_identity(spec, root, [root / "transformer", root / "vae"], name, random_init,
                                              suffix)
    alphas, schedule = read_alphas_cumprod(root)
    resolution = int(net.config.sample_size) * vae_downscale(vae)
    return DiffusionModel(name=model_name, module=net, blocks=dit_block_table(net), alphas_cumprod=alphas,
                          image_size=resolution, image_channels=3,
                          config={"class": "DiT", "transformer": model_config(net), "vae": model_config(vae),
                                  "labels": labels_cfg, "resolution": resolution, "schedule": schedule},
                          weights_sha256=weights_sha, run=run, encode=latent_encoder(vae),
                          source={"spec": spec, "folder": str(root)})


def dit_block_table(net) -> BlockTable:
    """Token maps on every transformer block, traced by one forward on a zero latent (null class: the table does
    not depend on the labels)."""
    size, patch = int(net.config.sample_size), int(net.config.patch_size)
    units = token_maps(net, [f"transformer_blocks.{i}" for i in range(len(net.transformer_blocks))],
                       grid=(size // patch, size // patch))
    param = next(net.parameters())
    x = torch.zeros((1, net.config.in_channels, size, size), dtype=param.dtype, device=param.device)
    t = torch.zeros(1, dtype=torch.long, device=param.device)
    null = torch.full((1,), int(net.config.num_embeds_ada_norm), device=param.device)
    return trace_blocks(net, units, lambda: net(x, t, class_labels=null))
