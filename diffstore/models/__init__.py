"""Model loading: one entry point, `load_model(spec)`, for every backend.

    default                     the shipped digits model (diffusers folder inside the package)
    PATH | owner/name           a diffusers UNet2DModel folder or hub id
    adm:PATH.pt                 a guided-diffusion ADM checkpoint (adm.py), with --adm-config
    sd:PATH | sd:owner/name     Stable Diffusion (sd.py): UNet2DConditionModel + VAE + CLIP text encoder
    dit:PATH | dit:owner/name   DiT (dit.py): DiTTransformer2DModel + VAE, class-conditional
    py:FILE.py:FACTORY          any torch U-Net through a plugin factory (plugin.py)

class_label (class-conditional ADM and DiT): a class index, or "dataset" for the dataset's labels; None is each
backend's default (ADM: the dataset's labels; DiT: its null class).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DiffstoreError, redact
from ..key import check_model_name

if TYPE_CHECKING:  # importing the package stays torch-free (extract/quick.py reads DEFAULT_DIR)
    from .base import DiffusionModel

DEFAULT_DIR = Path(__file__).parent / "default"  # the shipped digits model, a diffusers folder
DEFAULT_NAME = "digits-ddpm"


def parse_class_label(value: int | str | None) -> int | str | None:
    """--class-label N | dataset, from the CLI (a string) or from code."""
    if value is None or isinstance(value, int) or value == "dataset":
        return value
    if str(value).strip().isdigit():
        return int(value)
    raise DiffstoreError(f"--class-label takes a class index (0, 1, ...) or 'dataset', got {value!r}")


def load_model(spec: str = "default", *, name: str | None = None, random_init: int | None = None,
               adm_config: str | None = None, class_label: int | str | None = None,
               prompt: str = "", resolution: int | None = None) -> DiffusionModel:
    """The model `spec` names, checked: its name is a valid store path segment (key.check_model_name), and its source
    records the spec as the user gave it (provenance a paper can cite; never reloaded from a store)."""
    if name is not None:
        check_model_name("--model-name", name, reserved_ok=False)  # before a load that may take minutes
    with warnings.catch_warnings():
        # torch.load(weights_only=True) warns about a checkpoint's pickle protocol before it refuses (or accepts)
        # the file; base.load_failure explains a refusal, so the warning would only hide the real message
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        model = load_backend(spec, name, random_init, adm_config, parse_class_label(class_label), prompt, resolution)
    try:
        check_model_name("model", model.name)
    except DiffstoreError as e:
        raise DiffstoreError(f"{e}; pass --model-name NAME") from None
    model.source = {**model.source, "spec": redact(spec), "given": redact(spec)}
    return model


def load_backend(spec: str, name: str | None, random_init: int | None, adm_config: str | None,
                 class_label: int | str | None, prompt: str, resolution: int | None) -> DiffusionModel:
    if spec == "default":
        from .diffusers_unet import load_unet2d

        return load_unet2d(str(DEFAULT_DIR), name=name or DEFAULT_NAME, random_init=random_init)
    if spec.startswith("adm:"):
        from .adm import load_adm

        return load_adm(spec[4:] or None, adm_config, name=name, random_init=random_init,
                        class_label=None if class_label == "dataset" else class_label)
    if spec.startswith("sd:"):
        from .sd import load_sd

        return load_sd(spec[3:], prompt=prompt, resolution=resolution, name=name, random_init=random_init)
    if spec.startswith("dit:"):
        from .dit import load_dit

        return load_dit(spec[4:], name=name, random_init=random_init, class_label=class_label)
    if spec.startswith("py:"):
        from .plugin import load_plugin

        return load_plugin(spec[3:], name=name, random_init=random_init)
    from .diffusers_unet import load_unet2d

    return load_unet2d(spec, name=name, random_init=random_init)
