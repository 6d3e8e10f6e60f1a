"""CKA between stored feature arrays.

    options.py       CKAOptions: every option of `diffstore cka` / `ds.cka`
    math.py          the estimators (exact, unbiased, minibatch; linear and RBF), streamed from any array-like
    stage.py         `diffstore cka`: choose arrays from the store(s), check they cover the same samples, compute
    report.py        axis labels, the terminal table and the PNG heatmap
    distributed.py   tiles of the matrix on a dask cluster

The package is callable: `ds.cka(store, by="block", ...)` is stage.cka (options.StagePackage).
"""

import sys as _sys

from ..options import StagePackage as _StagePackage
from .options import CKAOptions

__all__ = ["CKAConfig", "CKAOptions", "CKAResult", "bias_floor", "cka", "cka_matrix"]

_sys.modules[__name__].__class__ = _StagePackage


def __getattr__(name: str):
    """The estimators (math.py: CKAConfig, cka, cka_matrix, ...) load numpy and scipy: on first use only."""
    if not name.startswith("_") and name != "math":
        from importlib import import_module

        math = import_module(f"{__name__}.math")
        if hasattr(math, name):
            return getattr(math, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
