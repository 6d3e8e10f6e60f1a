"""CKA between stored feature arrays.

    math.py     the estimators (exact, unbiased, minibatch; linear and RBF), streamed from any array-like
    stage.py    `diffstore cka`: choose arrays from the store(s), check they cover the same samples, compute
    report.py   axis labels, the terminal table and the PNG heatmap

The package is callable: `ds.cka(store, by="block", ...)` runs api.cka (see api.StageModule).
"""

from .math import CKAConfig, CKAResult, bias_floor, cka, cka_matrix

__all__ = ["CKAConfig", "CKAResult", "bias_floor", "cka", "cka_matrix"]

import sys as _sys  # noqa: E402  (last: the package becomes callable, `ds.cka(...)` = api.cka)

from ..api import StageModule as _StageModule  # noqa: E402

_sys.modules[__name__].__class__ = _StageModule
