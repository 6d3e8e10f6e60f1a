"""The producer: run the U-Net once per (batch, t) and fill every requested (block, pool) array.

Follow `diffstore extract` from the CLI: cli.extract -> plan.plan_extraction (validate everything, refuse
before writing) -> pipeline.extract_features (loop over tasks (t, shard)) -> run_task -> forward.forward_blocks
(one truncated forward with hooks) -> ShardedArray.write_shard (store.py).
"""

from .forward import encode_images, forward_blocks, pool_map, run_truncated
from .pipeline import extract_features, run_task
from .plan import (COMPUTE_DTYPES, MICRO_BATCH, SHARD_BYTES, STORAGE_DTYPES, Plan, parse_pools, parse_ts, pending,
                   pick_device, plan_extraction)

__all__ = ["COMPUTE_DTYPES", "MICRO_BATCH", "SHARD_BYTES", "STORAGE_DTYPES", "Plan", "encode_images", "extract_features",
           "forward_blocks", "parse_pools", "parse_ts", "pending", "pick_device", "plan_extraction", "pool_map",
           "run_task", "run_truncated"]
