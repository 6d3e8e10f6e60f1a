"""`diffstore finetune`: the one stage that trains the diffusion network itself (the first seed paper's Table 2).

    options.py   FinetuneOptions: every option of `diffstore finetune` / `ds.finetune` (torch-free)
    network.py   the network truncated after block b, its pooled output and a probe head; its inputs
    train.py     the lr x weight-decay grid, each point trained by probe.train's converged-recipe machinery
    stage.py     the key, checked against --model and --data-root; the result stored beside the probe results;
                 the table of frozen vs fine-tuned vs scratch with paired differences

The package is callable: `ds.finetune(store, t=10, block="mid", ...)` is stage.finetune (options.StagePackage).
Importing it is cheap (no torch): the CLI reads options.py through it.
"""

import sys as _sys

from ..options import StagePackage as _StagePackage
from .options import FinetuneOptions

__all__ = ["FinetuneOptions"]

_sys.modules[__name__].__class__ = _StagePackage
