"""The probe stage: classification heads trained on stored features (the U-Net is never run).

    heads.py   the paper's four heads (linear, mlp, cnn, attention)
    feed.py    rows from RAM or streamed from the store, batched for side-by-side heads
    train.py   iterative training of heads
    select.py  the --select ridge proxy ranking keys without training
    fusion.py  the fusion head over several keys, --fuse auto, its comparison table
    report.py  tables, grids and plots
    stage.py   the `diffstore probe` command: which keys, the results cache
"""

import sys as _sys  # noqa: E402  (last: the package becomes callable, `ds.probe(...)` = api.probe)

from ..api import StageModule as _StageModule  # noqa: E402

_sys.modules[__name__].__class__ = _StageModule
