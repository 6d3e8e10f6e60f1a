"""Fault injection on a local store: the corruptions `verify` must catch, readers refuse and `repair` undoes.

Test-only code (not shipped in the package): used by tests/test_reliability.py and bench/bench_faults.py; each
takes (store folder, array path, shard).
"""

from __future__ import annotations

import json
from pathlib import Path


def shard_file(url: Path, array: str, shard: int) -> Path:
    return next(p for p in (Path(url) / array / "x" / "c" / str(shard)).rglob("*") if p.is_file())  # c/{shard}/0/0/0


def flipped_byte(url: Path, array: str, shard: int) -> None:
    f = shard_file(url, array, shard)
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))


def truncated_shard(url: Path, array: str, shard: int) -> None:
    f = shard_file(url, array, shard)
    f.write_bytes(f.read_bytes()[:64])


def deleted_shard(url: Path, array: str, shard: int) -> None:
    shard_file(url, array, shard).unlink()  # its done flag stays 1


def done_flag_cleared(url: Path, array: str, shard: int) -> None:
    (Path(url) / array / "done" / "c" / str(shard)).unlink()  # as if killed between the data and the flag


def unreadable_zarr_json(url: Path, array: str, shard: int) -> None:
    (Path(url) / array / "x" / "zarr.json").write_text("{ truncated")


def wrong_shape_in_zarr_json(url: Path, array: str, shard: int) -> None:
    meta_file = Path(url) / array / "x" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["shape"][1] += 1
    meta_file.write_text(json.dumps(meta))


CORRUPTIONS = [flipped_byte, truncated_shard, deleted_shard, done_flag_cleared, unreadable_zarr_json,
               wrong_shape_in_zarr_json]
SHARD_LEVEL = CORRUPTIONS[:4]  # the others break the metadata, found before any shard is read
