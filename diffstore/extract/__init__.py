"""The producer: run the U-Net once per (batch, t) and fill every requested (block, pool) array.

Follow `diffstore extract` from the CLI: cli.extract -> plan.plan_extraction (validate everything, refuse
before writing) -> pipeline.extract_features (loader workers -> run_units -> forward.forward_blocks: one
truncated forward with hooks -> ShardWriter thread) -> ShardedArray.write_shard (store.py).
"""

from .forward import encode_images, forward_blocks, pool_map, prepare_model, run_truncated
from .pipeline import default_workers, extract_features, run_task
from .plan import (ATTENTION, COMPUTE_DTYPES, MICRO_BATCH, SHARD_BYTES, STORAGE_DTYPES, Plan, default_micro_batch,
                   done_masks, parse_pools, parse_ts, pending, pick_device, plan_extraction)

__all__ = ["ATTENTION", "COMPUTE_DTYPES", "MICRO_BATCH", "SHARD_BYTES", "STORAGE_DTYPES", "Plan", "default_micro_batch",
           "default_workers", "done_masks", "encode_images", "extract_features", "forward_blocks", "parse_pools",
           "parse_ts", "pending", "pick_device", "plan_extraction", "pool_map", "prepare_model", "run_task",
           "run_truncated"]

import sys as _sys  # noqa: E402  (last: the package becomes callable, `ds.extract(...)` = api.extract)

from ..api import StageModule as _StageModule  # noqa: E402

_sys.modules[__name__].__class__ = _StageModule
