"""guided-diffusion ADM checkpoints: named configs, the paper's block table, strict loading (adm_net.py is the net).

A config is the reference's create_model/diffusion flags (the README flag strings of github.com/openai/
guided-diffusion over its library defaults). `--adm-config` takes a name below or a JSON file holding those
flags (an object with "create_model_args" or "flags", as the shared/specs/adm files have, or the flags at top
level); missing flags take the library defaults.

Class labels: class-conditional checkpoints need an ImageNet class index per image. With `class_label` every
image gets that one label; without it run() uses the dataset's labels, which is only meaningful when those
labels are ImageNet class indices (0..999) - e.g. an ImageNet split - and is refused when there are none.
The policy is part of the model's config, hence of every feature fingerprint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..blocks import BlockTable, trace_blocks
from ..errors import DiffstoreError
from ..key import sha256_files
from .adm_net import NUM_CLASSES, ADMNetConfig, ADMUNet
from .base import DiffusionModel, class_labels, cosine_alphas_cumprod, linear_alphas_cumprod
from .weights import mismatches, read_state_dict

# guided_diffusion.script_util.model_and_diffusion_defaults()
DEFAULT_FLAGS = {
    "image_size": 64, "num_channels": 128, "num_res_blocks": 2, "num_heads": 4, "num_heads_upsample": -1,
    "num_head_channels": -1, "attention_resolutions": "16,8", "channel_mult": "", "dropout": 0.0,
    "class_cond": False, "use_checkpoint": False, "use_scale_shift_norm": True, "resblock_updown": False,
    "use_fp16": False, "use_new_attention_order": False, "learn_sigma": False, "diffusion_steps": 1000,
    "noise_schedule": "linear", "timestep_respacing": "", "use_kl": False, "predict_xstart": False,
    "rescale_timesteps": False, "rescale_learned_sigmas": False,
}
# The README's MODEL_FLAGS for each released checkpoint (use_fp16 left False: compute dtype is the extractor's).
_COMMON = {"attention_resolutions": "32,16,8", "learn_sigma": True, "num_head_channels": 64,
           "resblock_updown": True, "use_scale_shift_norm": True}
ADM_CONFIGS = {
    name: {**DEFAULT_FLAGS, **_COMMON, **flags}
    for name, flags in {
        "256-uncond": {"image_size": 256, "num_channels": 256, "num_res_blocks": 2, "class_cond": False},
        "256-cond": {"image_size": 256, "num_channels": 256, "num_res_blocks": 2, "class_cond": True},
        "128-cond": {"image_size": 128, "num_channels": 256, "num_res_blocks": 2, "class_cond": True,
                     "num_head_channels": -1, "num_heads": 4},
        "64-cond": {"image_size": 64, "num_channels": 192, "num_res_blocks": 3, "class_cond": True,
                    "dropout": 0.1, "noise_schedule": "cosine", "use_new_attention_order": True},
    }.items()
}
CHECKPOINT_CONFIGS = {"256x256_diffusion_uncond": "256-uncond", "256x256_diffusion": "256-cond",
                      "128x128_diffusion": "128-cond", "64x64_diffusion": "64-cond"}
# Flags that cannot change a forward's values in eval mode: left out of the model's identity.
NOT_IDENTITY = ("dropout", "use_checkpoint", "timestep_respacing", "use_kl", "rescale_learned_sigmas")
SCHEDULES = {"linear": linear_alphas_cumprod, "cosine": cosine_alphas_cumprod}


def adm_config(spec: str | dict | None) -> dict:
    """A named config (ADM_CONFIGS) or a JSON file of reference flags -> the complete flags dict."""
    if isinstance(spec, dict):
        flags = spec
    elif isinstance(spec, str) and spec in ADM_CONFIGS:
        return dict(ADM_CONFIGS[spec])
    elif isinstance(spec, str) and Path(spec).expanduser().is_file():
        try:
            obj = json.loads(Path(spec).expanduser().read_text())
        except (OSError, ValueError) as e:
            raise DiffstoreError(f"--adm-config {spec}: not readable JSON ({e})") from e
        if not isinstance(obj, dict):
            raise DiffstoreError(f"--adm-config {spec}: expected a JSON object of create_model arguments")
        flags = obj.get("create_model_args", obj.get("flags", obj))
    else:
        raise DiffstoreError(f"unknown --adm-config {spec!r}: use one of {', '.join(ADM_CONFIGS)} or a JSON file "
                             "of guided-diffusion create_model arguments (an object with "
                             "'create_model_args' or 'flags')")
    unknown = sorted(set(flags) - set(DEFAULT_FLAGS))
    if unknown:
        raise DiffstoreError(f"--adm-config: unknown guided-diffusion flags {unknown}; valid flags: "
                             f"{', '.join(DEFAULT_FLAGS)}")
    flags = {**DEFAULT_FLAGS, **flags}
    if flags["noise_schedule"] not in SCHEDULES:
        raise DiffstoreError(f"--adm-config: noise_schedule {flags['noise_schedule']!r} is "
                             f"not one of {list(SCHEDULES)}")
    ADMNetConfig.from_flags(flags)  # fail here, not later, on a shape it cannot build
    return flags


def build_adm(config: dict, device=None) -> ADMUNet:
    """The network for a flags dict, in eval mode; device="meta" allocates nothing (shapes only)."""
    flags = adm_config(config)
    with torch.device(device or "cpu"):
        net = ADMUNet(ADMNetConfig.from_flags(flags))
    if flags["use_fp16"]:
        net.convert_to_fp16()
    return net.eval().requires_grad_(False)


def adm_block_table(config) -> BlockTable:
    """The paper's numbering (input_blocks 1..N, middle_block, output_blocks), traced on meta: no weights."""
    net = build_adm(config, device="meta")
    cfg = net.cfg
    x = torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    y = torch.zeros(1, dtype=torch.long, device="meta") if cfg.num_classes else None
    paths = [f"input_blocks.{i}" for i in range(len(net.input_blocks))] + ["middle_block"]
    paths += [f"output_blocks.{i}" for i in range(len(net.output_blocks))]
    return trace_blocks(net, [(p, p) for p in paths], lambda: net(x, t, y), mid_path="middle_block")


def _infer_config(path: str | None) -> str:
    stem = Path(path).stem if path else None
    if stem in CHECKPOINT_CONFIGS:
        return CHECKPOINT_CONFIGS[stem]
    raise DiffstoreError(f"cannot tell the ADM architecture of {path or 'a random-init model'}: pass --adm-config "
                         f"({', '.join(ADM_CONFIGS)}, or a JSON file of create_model arguments)")


def load_checkpoint(flags: dict, state: dict, config_name: str) -> ADMUNet:
    """The net with the checkpoint's tensors, every key and shape checked first (on meta: a mismatch costs no
    memory); a near-miss config would otherwise load partially, silently wrong."""
    net = build_adm({**flags, "use_fp16": False}, device="meta")
    problems = mismatches({k: v.shape for k, v in net.state_dict().items()}, state)
    if problems:
        guess = [n for n, named in ADM_CONFIGS.items() if n != config_name and
                 {k: tuple(v.shape) for k, v in build_adm(named, device="meta").state_dict().items()}
                 == {k: tuple(v.shape) for k, v in state.items()}]
        hint = f"it fits --adm-config {guess[0]}" if guess else "pass the --adm-config it was trained with"
        raise DiffstoreError(f"checkpoint does not fit ADM config {config_name}: {'; '.join(problems)}. Fix: {hint}.")
    # assign: the checkpoint's tensors become the parameters (no second copy of a 2 GB model); float32 as
    # the reference keeps its master weights, then the blocks' convs go to float16 when use_fp16 asks.
    net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    if flags["use_fp16"]:
        net.convert_to_fp16()
    return net.requires_grad_(False)


def load_adm(path: str | None, config: str | dict | None, name: str | None = None, random_init: int | None = None,
             class_label: int | None = None) -> DiffusionModel:
    """An ADM checkpoint (or seeded random weights) as a DiffusionModel with the paper's block table."""
    if path is None and random_init is None:
        raise DiffstoreError("adm: needs a checkpoint path (adm:PATH.pt) or --random-init SEED")
    config_name = config if isinstance(config, str) else ("custom" if config else _infer_config(path))
    flags = adm_config(config if config is not None else config_name)
    cond = bool(flags["class_cond"])
    if class_label is not None and not cond:
        raise DiffstoreError(f"--class-label {class_label}: ADM config {config_name} is "
                             "unconditional; drop --class-label")
    if class_label is not None and not 0 <= class_label < NUM_CLASSES:
        raise DiffstoreError(f"--class-label {class_label}: must be an ImageNet class index 0..{NUM_CLASSES - 1}")

    if random_init is None:
        net = load_checkpoint(flags, read_state_dict(path, "ADM checkpoint"), config_name)
        weights_sha = sha256_files([Path(path).expanduser()])
        base = name or Path(path).stem
    else:
        with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
            torch.manual_seed(random_init)
            net = build_adm(flags)
        weights_sha = f"random-init:{random_init}"
        stem = name or (Path(path).stem if path else "adm-" + Path(str(config_name)).stem)
        base = f"{stem}.random-init-s{random_init}"

    steps = int(flags["diffusion_steps"])
    t_scale = 1000.0 / steps if flags["rescale_timesteps"] else None

    def run(x, t, labels):
        t_in = t.float() * t_scale if t_scale else t
        if not cond:
            return net(x, t_in)
        y = class_labels("dataset" if class_label is None else class_label, labels, len(x), NUM_CLASSES, x.device)
        return net(x, t_in, y)

    policy = "none" if not cond else ("constant" if class_label is not None else "dataset")
    return DiffusionModel(
        name=base,
        module=net,
        blocks=adm_block_table(flags),
        alphas_cumprod=SCHEDULES[flags["noise_schedule"]](steps),
        image_size=int(flags["image_size"]),
        image_channels=3,
        config={"class": "guided-diffusion-adm",
                "flags": {k: v for k, v in flags.items() if k not in NOT_IDENTITY},
                "labels": {"policy": policy, "class_label": class_label}},
        weights_sha256=weights_sha,
        run=run,
        source={"path": path, "adm_config": config_name},
        set_attention=net.set_attention,
    )
