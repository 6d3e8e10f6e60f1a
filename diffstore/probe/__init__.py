"""The probe stage: classification heads trained on stored features (the U-Net is never run).

    options.py   ProbeOptions: every option of `diffstore probe` / `ds.probe`, and the names of heads and recipes
    sources.py   which keys a probe reads: a stored key and its test twin, fused keys, raw pixels
    heads.py     the paper's four heads (linear, mlp, cnn, attention) and the fusion head
    feed.py      rows from RAM or streamed from the store, batched for side-by-side heads
    solve.py     the converged linear probe (L-BFGS, C on validation); train.py the iterative heads
    knn.py       the kNN evaluation (head kind knn: cosine similarity, DINO's weighted vote)
    estimators.py  LinearProbe, KNNProbe, HeadProbe: scikit-learn estimators over the same solvers
    saved.py     fitted heads kept in the store (--save-heads) and loaded back as estimators
    results.py   training sources x heads, and the results cache in the store
    select.py    the --select ridge proxy ranking keys without training
    fusion.py    --fuse: which keys the fusion head reads, --fuse auto, the comparison table
    report.py    tables, grids and plots; frame.py ProbeResults, what ds.probe returns
    stage.py     `diffstore probe` / `ds.probe`; distributed.py the same on a dask cluster

The package is callable: `ds.probe(store, t=[10], ...)` is stage.probe (options.StagePackage). Importing it is
cheap (no torch): the CLI reads options.py through it; `from diffstore.probe import LinearProbe` loads
estimators.py (torch, scikit-learn) on first use only.
"""

import sys as _sys

from ..options import StagePackage as _StagePackage
from .options import ProbeOptions

ESTIMATORS = ("LinearProbe", "KNNProbe", "HeadProbe")
__all__ = ["ProbeOptions", *ESTIMATORS]


def __getattr__(name: str):
    if name in ESTIMATORS:
        from . import estimators

        return getattr(estimators, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_sys.modules[__name__].__class__ = _StagePackage
