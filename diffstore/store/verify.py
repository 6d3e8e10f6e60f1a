"""`diffstore verify`: every array complete, every chunk readable with a matching crc32c checksum."""

from __future__ import annotations

import numpy as np

from .store import Store


def verify_store(store: Store) -> tuple[list[dict], int]:
    """(problems, number of arrays checked). Reads every done shard once (zarr checks each chunk's crc32c)."""
    problems, arrays = [], store.arrays()
    for a in arrays:
        missing = a.missing()
        if missing:
            problems.append({"array": a.path, "problem": f"incomplete: shards {missing[:10]}{' ...' if len(missing) > 10 else ''} "
                             f"of {a.n_shards} missing; re-run the extract command to complete it"})
        for i in np.flatnonzero(a.done_mask()):
            try:
                data = a.read(a.shard_slice(int(i)))
            except Exception as e:  # zarr raises on a checksum mismatch or an undecodable chunk
                problems.append({"array": a.path, "problem": f"shard {i} corrupt ({type(e).__name__}: {e}); delete the array and re-extract"})
                continue
            if np.isnan(data).any():
                problems.append({"array": a.path, "problem": f"shard {i} is marked done but holds unwritten (NaN) rows"})
    return problems, len(arrays)
