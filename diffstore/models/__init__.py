"""Model loading: one entry point, `load_model(spec)`, for every backend.

    default                     the shipped digits model (diffusers folder inside the package)
    PATH | owner/name           a diffusers UNet2DModel folder or hub id
    adm:PATH.pt                 a guided-diffusion ADM checkpoint (adm.py), with --adm-config
    sd:PATH | sd:owner/name     Stable Diffusion (sd.py): UNet2DConditionModel + VAE + CLIP text encoder
    py:FILE.py:FACTORY          any torch U-Net through a plugin factory (plugin.py)
"""

from __future__ import annotations

from .base import DiffusionModel


def load_model(spec: str = "default", *, name: str | None = None, random_init: int | None = None,
               adm_config: str | None = None, class_label: int | None = None,
               prompt: str = "", resolution: int | None = None) -> DiffusionModel:
    if spec == "default":
        from .diffusers_unet import DEFAULT_DIR, load_unet2d

        return load_unet2d(str(DEFAULT_DIR), name=name or "digits-ddpm", random_init=random_init)
    if spec.startswith("adm:"):
        from .adm import load_adm

        return load_adm(spec[4:] or None, adm_config, name=name, random_init=random_init, class_label=class_label)
    if spec.startswith("sd:"):
        from .sd import load_sd

        return load_sd(spec[3:], prompt=prompt, resolution=resolution, name=name, random_init=random_init)
    if spec.startswith("py:"):
        from .plugin import load_plugin

        return load_plugin(spec[3:], name=name, random_init=random_init)
    from .diffusers_unet import load_unet2d

    return load_unet2d(spec, name=name, random_init=random_init)
