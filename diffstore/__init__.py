"""diffstore: cached feature stores of diffusion-model activations.

    import diffstore as ds
    store = ds.open("data/default.zarr")                          # a FeatureStore (read-only)
    f = store.features(t=50, block="mid", pool=2, split="train")  # Features: numpy(), to_torch/dask/xarray()
    ds.extract(...), ds.probe(...), ds.cka(...), ds.repair(...)   # the stages, with the CLI's options and defaults
    ds.finetune(...)                                              # the network itself trained (frozen vs tuned)

The names below load on first use (PEP 562), so `import diffstore` is cheap and never imports torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("diffstore")
except PackageNotFoundError:  # a source tree on PYTHONPATH that was never installed
    __version__ = "0+unknown"

__all__ = ["open", "extract", "probe", "cka", "finetune", "repair", "FeatureStore", "Features", "FeatureKey",
           "DiffstoreError", "__version__"]
# name -> module it comes from; extract, probe, cka and finetune are the stage packages themselves, callable
# (options.StagePackage); repair is extract.repair's API function
_LAZY = {"open": "api", "FeatureStore": "api", "Features": "api", "FeatureKey": "key", "DiffstoreError": "errors",
         "extract": None, "probe": None, "cka": None, "finetune": None, "repair": "extract.repair"}

if TYPE_CHECKING:
    from . import cka, extract, finetune, probe
    from .api import Features, FeatureStore, open
    from .errors import DiffstoreError
    from .extract.repair import repair_command as repair
    from .key import FeatureKey


def __getattr__(name: str):
    if name in _LAZY:
        module = import_module(f".{_LAZY[name] or name}", __name__)
        return getattr(module, "repair_command" if name == "repair" else name) if _LAZY[name] else module
    raise AttributeError(f"module 'diffstore' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
