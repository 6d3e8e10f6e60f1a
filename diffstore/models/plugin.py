"""`--model py:path/to/file.py:factory`: any torch network through a small factory the user writes.

The file is imported from its path and `factory()` is called (`factory(random_init=seed)` under
--random-init: it must then build the same architecture with weights seeded by `seed`, not load a file).
It returns a dict:

    module          torch.nn.Module                 the network; block paths point into it
    blocks          list of module paths, or of (name, path) pairs, in forward order; each block's output must be
                    a feature map [B, C, H, W] (a tensor, a tuple whose first item is one, or an object with .sample).
                    A block named "mid" answers to --blocks mid.
    alphas_cumprod  sequence of T floats in (0, 1]: abar_t for t = 0..T-1. A network that is not a diffusion
                    model (a classifier CNN, for CKA against it) gives [1.0]: T = 1, only t = 0, x_t = x_0.
    image_size      int: images are resized + center-cropped to image_size x image_size
    image_channels  1 or 3: images are converted to grey or RGB (scaled to [-1, 1])
    weight_files    list of paths whose bytes identify the weights (sha256). May be empty only under random_init.
    config          optional plain-JSON dict: architecture settings that are not in the code (part of identity)
    run             optional callable(x, t, labels) -> anything: one forward; default module(x, t). A classifier
                    ignores t: lambda x, t, labels: module(x)
    encode          optional callable(images [-1, 1]) -> x_0 in the space noise is added in (e.g. latents)

Model identity = sha256 of weight_files + the config + the plugin file's own bytes (the code is the
architecture: editing the file gives a new fingerprint, so a store refuses to mix features from before and
after). The file runs as ordinary Python with your privileges: only load plugins you trust, and load
weights inside the factory with safetensors or torch.load(weights_only=True), never plain unpickling.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import inspect
import sys
from pathlib import Path

import torch

from ..blocks import BlockTable, trace_blocks
from ..errors import DiffstoreError
from ..key import canonical_json, sha256_files
from .base import DiffusionModel

REQUIRED = ("module", "blocks", "alphas_cumprod", "image_size", "image_channels", "weight_files")
OPTIONAL = ("config", "run", "encode")


def import_file(path: Path):
    """Import a .py file by path under a name unique to that path (so two plugins named model.py coexist)."""
    name = "diffstore_plugin_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling inside the plugin look their module up here
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise DiffstoreError(f"plugin {path} failed to import: {type(e).__name__}: {e}") from e
    return module


def call_factory(path: Path, factory_name: str, random_init: int | None) -> dict:
    module = import_file(path)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        found = [n for n, v in vars(module).items()
                 if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__]
        raise DiffstoreError(f"plugin {path} has no function {factory_name!r}; "
                             f"functions defined there: {', '.join(found) or 'none'}")
    kwargs = {}
    if random_init is not None:
        if "random_init" not in inspect.signature(factory).parameters:
            raise DiffstoreError(f"--random-init needs {factory_name}(random_init=None) in {path}: "
                                 "add that parameter and build seeded random weights when it is given")
        kwargs["random_init"] = random_init
    try:
        spec = factory(**kwargs)
    except Exception as e:
        raise DiffstoreError(f"plugin factory {path}:{factory_name} failed: {type(e).__name__}: {e}") from e
    if not isinstance(spec, dict):
        raise DiffstoreError(f"plugin factory {path}:{factory_name} must return a dict with {', '.join(REQUIRED)}; "
                             f"it returned {type(spec).__name__}")
    return spec


def check_spec(spec: dict, where: str, random_init: int | None) -> None:
    """Every refusal names the field and what it must be."""
    missing = [k for k in REQUIRED if k not in spec]
    if missing:
        raise DiffstoreError(f"{where} returned a dict without {', '.join(missing)} (required: {', '.join(REQUIRED)})")
    unknown = [k for k in spec if k not in REQUIRED + OPTIONAL]
    if unknown:
        hints = [f"{k} (did you mean {close[0]}?)"
                 if (close := difflib.get_close_matches(k, REQUIRED + OPTIONAL, n=1)) else k
                 for k in unknown]
        raise DiffstoreError(f"{where} returned unknown fields: {', '.join(hints)}; allowed: "
                             f"{', '.join(REQUIRED + OPTIONAL)}")
    if not isinstance(spec["module"], torch.nn.Module):
        raise DiffstoreError(f"{where}: 'module' must be a torch.nn.Module, got {type(spec['module']).__name__}")
    if not isinstance(spec["image_size"], int) or spec["image_size"] < 1:
        raise DiffstoreError(f"{where}: 'image_size' must be a positive int, got {spec['image_size']!r}")
    if spec["image_channels"] not in (1, 3):
        raise DiffstoreError(f"{where}: 'image_channels' must be 1 or 3, got {spec['image_channels']!r}")
    if not spec["weight_files"] and random_init is None:
        raise DiffstoreError(f"{where}: 'weight_files' is empty; list the files the weights were loaded from "
                             "(they are the model's identity). Only --random-init models may have none")
    absent = [str(f) for f in spec["weight_files"] if not Path(f).is_file()]
    if absent:
        raise DiffstoreError(f"{where}: weight files not found: {', '.join(absent)}")
    for k in ("run", "encode"):
        if spec.get(k) is not None and not callable(spec[k]):
            raise DiffstoreError(f"{where}: '{k}' must be callable, got {type(spec[k]).__name__}")
    try:
        canonical_json(spec.get("config", {}))
    except TypeError as e:
        raise DiffstoreError(f"{where}: 'config' must be plain JSON (numbers, strings, lists, dicts): {e}") from None


def block_units(spec: dict, where: str) -> list[tuple[str, str]]:
    units = []
    for item in spec["blocks"]:
        name, path = (item, item) if isinstance(item, str) else tuple(item)
        try:
            spec["module"].get_submodule(path)
        except AttributeError:
            raise DiffstoreError(f"{where}: block {name!r} points at {path!r}, which is "
                                 "not a submodule of 'module'") from None
        units.append((name, path))
    if not units:
        raise DiffstoreError(f"{where}: 'blocks' is empty; list the module paths whose outputs are features")
    return units


def alphas_tensor(values, where: str) -> torch.Tensor:
    alphas = torch.as_tensor(values, dtype=torch.float64).flatten()
    if len(alphas) == 0 or not torch.all((alphas > 0) & (alphas <= 1)):
        raise DiffstoreError(f"{where}: 'alphas_cumprod' must be T >= 1 values in (0, 1] (abar_t); "
                             "a network that is not a diffusion model gives [1.0]")
    return alphas


def load_plugin(spec: str, name: str | None = None, random_init: int | None = None) -> DiffusionModel:
    """`path/to/file.py:factory` -> DiffusionModel (see the module docstring for the factory's contract)."""
    file, sep, factory_name = spec.rpartition(":")
    if not sep or not file or not factory_name:
        raise DiffstoreError(f"py: models are given as py:path/to/file.py:factory, got py:{spec}")
    path = Path(file).expanduser()
    if not path.is_file():
        raise DiffstoreError(f"plugin file {path} not found (py:path/to/file.py:factory)")
    where = f"plugin factory {path}:{factory_name}"
    out = call_factory(path, factory_name, random_init)
    check_spec(out, where, random_init)
    units = block_units(out, where)
    module = out["module"].eval().requires_grad_(False)
    if random_init is None:
        weights_sha = sha256_files([Path(f) for f in out["weight_files"]])
    else:  # the factory built seeded random weights; any files it lists are not what it ran
        weights_sha = f"random-init:{random_init}"
    base = name or f"{path.stem}.{factory_name}"
    model = DiffusionModel(
        name=base if random_init is None else f"{base}.random-init-s{random_init}",
        module=module,
        blocks=BlockTable([]),
        alphas_cumprod=alphas_tensor(out["alphas_cumprod"], where),
        image_size=out["image_size"],
        image_channels=out["image_channels"],
        config={"class": "plugin", "factory": factory_name, "source_sha256": sha256_files([path]),
                "blocks": [list(u) for u in units], "image_size": out["image_size"],
                "image_channels": out["image_channels"], "plugin": out.get("config", {})},
        weights_sha256=weights_sha,
        run=out.get("run"),
        encode=out.get("encode"),
        source={"spec": spec, "file": str(path.resolve()), "factory": factory_name},
    )
    model.blocks = trace(model, units, where)
    return model


def trace(model: DiffusionModel, units: list[tuple[str, str]], where: str):
    """The block table from one batch-1 forward on zeros; every listed block must fire and give [B, C, H, W]."""
    param = next(model.module.parameters(), torch.empty(0))
    x = torch.zeros((1, model.image_channels, model.image_size, model.image_size), dtype=param.dtype,
                    device=param.device)
    t = torch.zeros(1, dtype=torch.long, device=param.device)
    labels = torch.zeros(1, dtype=torch.long, device=param.device)

    def forward():
        model.run(model.encode(x) if model.encode is not None else x, t, labels)

    try:
        table = trace_blocks(model.module, units, forward, mid_path=dict(units).get("mid"))
    except Exception as e:  # a shape error in the user's forward, or a block output that is not a 4-D map
        raise DiffstoreError(f"{where}: the dummy forward on a [1, {model.image_channels}, {model.image_size}, "
                             f"{model.image_size}] input failed ({type(e).__name__}: {e}); check image_size, "
                             "image_channels, run, and that every block outputs [B, C, H, W]") from e
    silent = [name for name, _ in units if name not in {b.name for b in table}]
    if silent:
        raise DiffstoreError(f"{where}: blocks {', '.join(silent)} never ran in the forward; remove them from 'blocks'")
    return table
