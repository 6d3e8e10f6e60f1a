"""The feature store: Zarr v3 groups of sharded arrays, splits and results (layout in store.py)."""

from .arrays import ShardedArray
from .backend import zarr_store
from .provenance import provenance
from .splits import SplitRecord
from .store import FORMAT, Store, fingerprint_diff

__all__ = ["FORMAT", "ShardedArray", "SplitRecord", "Store", "fingerprint_diff", "provenance", "zarr_store"]
