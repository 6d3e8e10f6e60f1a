"""`diffstore verify`: every array's metadata readable and consistent, every done shard readable with matching
crc32c checksums and no NaN row, no shard left half-written; every split's ids and labels matching their sha256.

A shard that is not done is not a problem: a split fills shard by shard (`--limit`, `--rows`), and `ls` shows the
rows done. A shard whose data is stored but whose done flag is not (a writer killed between the two) is one.

Each problem is a Finding that `repair` acts on: the shards to recompute, or the metadata to rebuild.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import DiffstoreError
from .store import Store


@dataclass
class Finding:
    array: str  # store path of the array (or split)
    kind: str  # "metadata" | "incomplete" | "corrupt" | "split"
    problem: str  # what is wrong and how to fix it
    shards: list[int] = field(default_factory=list)


def check_array(store: Store, path: str) -> list[Finding]:
    try:
        a = store.open_array(path)
    except DiffstoreError as e:
        return [Finding(path, "metadata", str(e))]
    out = []
    stored = a.stored_shards()
    interrupted = [i for i in a.missing() if i in stored]
    if interrupted:
        shown = f"{interrupted[:10]}{' ...' if len(interrupted) > 10 else ''}"
        out.append(Finding(path, "incomplete", f"shards {shown} hold data but no done flag (a write was interrupted); "
                           "re-run the command that wrote it (done shards are skipped) or "
                           f"`{a.fix_command}`", interrupted))
    for i, what in sorted(a.problems(np.flatnonzero(a.done_mask()).tolist()).items()):
        out.append(Finding(path, "corrupt", f"shard {i} {what}; fix it with `{a.fix_command}`", [i]))
    return out


def check_splits(store: Store) -> list[Finding]:
    out = []
    for dataset in store.child_groups("datasets"):
        for split in store.child_groups(f"datasets/{dataset}"):
            try:
                store.split(dataset, split)
            except DiffstoreError as e:
                out.append(Finding(f"datasets/{dataset}/{split}", "split", str(e)))
    return out


def verify_store(store: Store, paths: list[str] | None = None) -> tuple[list[dict], int]:
    """(problems as dicts, number of arrays checked). Reads every done shard once."""
    findings, checked = verify_findings(store, paths)
    return [asdict(f) for f in findings], checked


def verify_findings(store: Store, paths: list[str] | None = None) -> tuple[list[Finding], int]:
    """Findings for `paths` (default: every array, and every split)."""
    splits = check_splits(store) if paths is None else []
    paths = store.array_paths() if paths is None else paths
    return [f for p in paths for f in check_array(store, p)] + splits, len(paths)
