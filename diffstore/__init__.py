"""diffstore: cached feature stores of diffusion-model activations.

    import diffstore as ds
    store = ds.open("data/default.zarr")                          # a FeatureStore (read-only)
    f = store.features(t=50, block="mid", pool=2, split="train")  # Features: numpy(), to_torch/dask/xarray()
    ds.extract(...), ds.probe(...), ds.cka(...)                   # the stages, with the CLI's defaults

The names below load on first use (PEP 562), so `import diffstore` is cheap and never imports torch.
"""

from __future__ import annotations

import sys
import types
from importlib import import_module
from typing import TYPE_CHECKING

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("diffstore")
except PackageNotFoundError:  # a source tree on PYTHONPATH that was never installed
    __version__ = "0+unknown"

__all__ = ["open", "extract", "probe", "cka", "FeatureStore", "Features", "FeatureKey", "DiffstoreError", "__version__"]
_LAZY = {"open": "api", "extract": "api", "probe": "api", "cka": "api", "FeatureStore": "api", "Features": "api",
         "FeatureKey": "key", "DiffstoreError": "errors"}

if TYPE_CHECKING:
    from .api import Features, FeatureStore, cka, extract, open, probe
    from .errors import DiffstoreError
    from .key import FeatureKey


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diffstore' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """`ds.extract`, `ds.probe` and `ds.cka` are API functions, while diffstore.extract, diffstore.probe and
    diffstore.cka may also be subpackages. Importing a submodule makes Python set it as an attribute of its
    package, which would hide the function; this keeps the functions (the submodules stay importable by
    name: `from diffstore.cka import cka_matrix`)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
