"""diffusers U-Nets (UNet2DModel) from a local folder or a hub id; the shipped default model is one of them.

A hub id is first resolved to a local snapshot folder, so hub models and the offline default share one
code path. Layouts accepted: the U-Net at the folder root (config.json + weights) or in `unet/`; the
schedule from `scheduler/scheduler_config.json` or `scheduler_config.json`, else DDPM's linear default.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..blocks import BlockTable, trace_blocks
from ..errors import DiffstoreError
from ..key import sha256_files
from .base import DiffusionModel, linear_alphas_cumprod, load_failure

WEIGHT_SUFFIXES = (".safetensors", ".bin")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.txt"]


def unet_units(unet) -> list[tuple[str, str]]:
    """Candidate blocks of a diffusers U-Net in forward order: conv_in, each down layer (resnet, or its
    attention when it has one), downsamplers, the mid block, each up layer, upsamplers."""
    units = [("in", "conv_in")]
    for side, blocks in (("down", unet.down_blocks), ("up", unet.up_blocks)):
        if side == "up":
            units.append(("mid", "mid_block"))
        for i, block in enumerate(blocks):
            prefix = f"{side}_blocks.{i}"
            attentions = getattr(block, "attentions", None)
            for j in range(len(block.resnets)):
                attended = attentions is not None and j < len(attentions)
                path = f"{prefix}.attentions.{j}" if attended else f"{prefix}.resnets.{j}"
                units.append((f"{side}{i}.{j}", path))
            for k, _ in enumerate(getattr(block, f"{side}samplers", None) or []):
                units.append((f"{side}{i}.{side}sample" + (f"{k}" if k else ""), f"{prefix}.{side}samplers.{k}"))
    return units


def trace_unet(model: DiffusionModel, x_shape: tuple) -> BlockTable:
    """Block table of a diffusers U-Net from one batch-1 forward on zeros of the model's input shape."""
    param = next(model.module.parameters())
    x = torch.zeros((1, *x_shape), dtype=param.dtype, device=param.device)
    t = torch.zeros(1, dtype=torch.long, device=param.device)
    return trace_blocks(model.module, unet_units(model.module), lambda: model.run(x, t, None), mid_path="mid_block")


def resolve_folder(spec: str, allow_patterns: list[str] = HUB_PATTERNS) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (or taken from the local hub cache)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise DiffstoreError(f"model {spec!r} is neither a model folder nor a hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, allow_patterns=allow_patterns))
    except Exception as e:  # offline, unknown id, gated repo: all need the same advice
        raise DiffstoreError(f"could not fetch hub model {spec!r} ({type(e).__name__}: {e}); "
                             "pass a local folder, or check the id and your network/HF token") from e


def weight_files(folder: Path) -> list[Path]:
    """The weight files that define the model: safetensors when present (never unpickled), else .bin."""
    for suffix in WEIGHT_SUFFIXES:
        files = sorted(p for p in folder.iterdir() if p.suffix == suffix)
        if files:
            return files
    raise DiffstoreError(f"no weight files (*.safetensors or *.bin) in {folder}")


def folder_identity(spec: str, root: Path, weight_folders: list[Path], name: str | None, random_init: int | None,
                    suffix: str = "") -> tuple[str, str]:
    """(name in store paths, weights sha256) of a folder or hub model. The name defaults to the folder's name (a hub
    id with / as --) plus `suffix` (settings that change the features, so stores never mix them); seeded random
    weights hash no file and add .random-init-sSEED."""
    base = name or ((root.name if Path(spec).expanduser().is_dir() else spec.replace("/", "--")) + suffix)
    if random_init is not None:
        return f"{base}.random-init-s{random_init}", f"random-init:{random_init}"
    return base, sha256_files([f for folder in weight_folders for f in weight_files(folder)])


def read_alphas_cumprod(folder: Path) -> tuple[torch.Tensor, dict]:
    for cfg in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"):
        if cfg.is_file():
            from diffusers import DDPMScheduler

            config = json.loads(cfg.read_text())
            sched = DDPMScheduler.from_config(config)
            keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
            return sched.alphas_cumprod.double(), {k: config.get(k) for k in keep}
    return linear_alphas_cumprod(1000), {"beta_schedule": "linear", "num_train_timesteps": 1000}


def model_config(unet) -> dict:
    """The architecture config as plain JSON (diffusers' own private keys dropped)."""
    return json.loads(json.dumps({k: v for k, v in dict(unet.config).items() if not k.startswith("_")}, default=list))


def load_unet2d(spec: str, name: str | None = None, random_init: int | None = None) -> DiffusionModel:
    """A diffusers UNet2DModel folder or hub id. random_init=seed: same architecture, seeded random weights."""
    from diffusers import UNet2DModel

    root = resolve_folder(spec)
    folder = root / "unet" if (root / "unet" / "config.json").is_file() else root
    if not (folder / "config.json").is_file():
        raise DiffstoreError(f"{root} has no config.json (nor unet/config.json): not a diffusers model folder")
    alphas, schedule = read_alphas_cumprod(root)
    try:
        if random_init is None:
            has_safetensors = (folder / "diffusion_pytorch_model.safetensors").is_file()
            unet = UNet2DModel.from_pretrained(folder, low_cpu_mem_usage=False, use_safetensors=has_safetensors)
        else:
            torch.manual_seed(random_init)
            unet = UNet2DModel.from_config(UNet2DModel.load_config(folder))
    except DiffstoreError:
        raise
    except Exception as e:
        raise load_failure(f"could not load a UNet2DModel from {folder}", e) from e
    unet.eval().requires_grad_(False)
    model_name, weights_sha = folder_identity(spec, root, [folder], name, random_init)
    size = unet.config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    model = DiffusionModel(
        name=model_name,
        module=unet,
        blocks=BlockTable([]),
        alphas_cumprod=alphas,
        image_size=int(size),
        image_channels=int(unet.config.in_channels),
        config={"class": "UNet2DModel", "unet": model_config(unet), "schedule": schedule},
        weights_sha256=weights_sha,
        run=lambda x, t, labels: unet(x, t),
        source={"spec": spec, "folder": str(folder)},
    )
    model.blocks = trace_unet(model, (model.image_channels, model.image_size, model.image_size))
    return model
