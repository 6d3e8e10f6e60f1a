"""The producer: run the U-Net once per (batch, t) and fill every requested (block, pool) array.

Follow `diffstore extract` from the CLI: cli.py builds the command from options.ExtractOptions -> stage.run ->
plan.plan_extraction (validate everything, refuse before writing) -> pipeline.extract_features (loader workers ->
run_units -> forward.forward_blocks: one truncated forward with hooks -> ShardWriter thread) ->
ShardedArray.write_shard (store/arrays.py). distributed.py runs the same plan on a dask cluster; repair.py
recomputes the shards `verify` reports bad; recorded.py checks a given model and data root against what an array
recorded (repair and finetune rebuild its inputs from them).

The package is callable: `ds.extract(store, t=[10, 50], ...)` is stage.extract (options.StagePackage). Importing
it is cheap: `diffstore extract --help` reads options.py through it; the names below load torch on first use.
"""

import sys as _sys
from importlib import import_module as _import

from ..options import StagePackage as _StagePackage
from .options import ATTENTION, COMPUTE_DTYPES, MICRO_BATCH, STORAGE_DTYPES, ExtractOptions, RepairOptions

_LAZY = {"encode_images": "forward", "forward_blocks": "forward", "pool_map": "forward", "prepare_model": "forward",
         "run_truncated": "forward", "default_workers": "pipeline", "extract_features": "pipeline",
         "run_task": "pipeline", "SHARD_BYTES": "plan", "Plan": "plan", "default_micro_batch": "plan",
         "done_masks": "pipeline", "pending": "plan", "plan_extraction": "plan"}
__all__ = ["ATTENTION", "COMPUTE_DTYPES", "MICRO_BATCH", "STORAGE_DTYPES", "ExtractOptions", "RepairOptions",
           *_LAZY]

_sys.modules[__name__].__class__ = _StagePackage


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(_import(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
