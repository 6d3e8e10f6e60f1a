"""The codec of a feature array: how each chunk's bytes are compressed before zarr appends its crc32c.

Chosen by measurement (bench/bench_read.py, README "Reads and the codec"): float16 activations barely compress
(zstd keeps ~0.90-0.92 of their bytes) and zstd decodes at ~0.6-1 GB/s a thread, the bottleneck of a checked read;
byte-shuffled lz4 keeps ~0.95-1.0 of them (and the NaN padding of a last chunk, which "none" stores) and decodes at
~5-7 GB/s, about as fast as reading them uncompressed. bitshuffle-lz4 stores the least (~0.84-0.90) at ~1-3 GB/s.
The codec is recorded in the group's `codec` attribute (shown by `info`), not in the fingerprint: it does not
change the values. An array keeps the codec it was created with: arrays written before the attribute existed used
LEGACY, and a resumed or repaired array is re-created with its own.
"""

from __future__ import annotations

import json
from typing import Callable

import numcodecs.blosc
import numcodecs.lz4
import numcodecs.zstd
from zarr.codecs import BloscCodec, ZstdCodec

from ..errors import DiffstoreError


def _lz4():
    from zarr.codecs.numcodecs import LZ4  # zarr's adapter for numcodecs' lz4 (not in the Zarr v3 spec)

    return LZ4()


CODECS: dict[str, Callable[[], list]] = {  # name -> the array's compressors (zarr adds crc32c after them)
    "none": lambda: [],
    "zstd-1": lambda: [ZstdCodec(level=1)],
    "zstd-3": lambda: [ZstdCodec(level=3)],
    "lz4": lambda: [_lz4()],
    "shuffle-lz4": lambda: [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
    "shuffle-zstd-1": lambda: [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")],
    "bitshuffle-lz4": lambda: [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")],
}
# stored / raw bytes of float16 activations (the shipped model's digits features, bench/bench_read.py): what
# `extract --dry-run` multiplies raw sizes by
RATIO = {"none": 1.059, "zstd-1": 0.920, "zstd-3": 0.920, "lz4": 1.006, "shuffle-lz4": 1.002, "shuffle-zstd-1": 0.922,
         "bitshuffle-lz4": 0.908}
DEFAULT = "shuffle-lz4"  # for new arrays (bench/bench_read.py --sections codecs,local)
LEGACY = "zstd-1"  # what every array without a `codec` attribute was written with

# numcodecs' decoders by the zarr codec name: each decompresses into a caller's buffer, releasing the GIL
DECODERS = {"zstd": numcodecs.zstd.decompress, "blosc": numcodecs.blosc.decompress,
            "numcodecs.lz4": numcodecs.lz4.decompress}


def compressors(name: str) -> list:
    if name not in CODECS:
        raise DiffstoreError(f"unknown codec {name!r}: this diffstore writes {', '.join(CODECS)}. Upgrade diffstore "
                             "if a newer version wrote the array")
    return CODECS[name]()


def without_typesize(spec: dict) -> dict:
    """A codec's JSON without blosc's typesize, which zarr fills in from the dtype."""
    conf = {k: v for k, v in spec.get("configuration", {}).items() if k != "typesize"}
    return {"name": spec["name"], "configuration": conf} if conf else {"name": spec["name"]}


def name_of(x) -> str:
    """The codec of a zarr array's (inner) chunks by its name here, or its JSON when diffstore has no name for it."""
    codecs = list(x.metadata.to_dict()["codecs"])
    if codecs[0]["name"] == "sharding_indexed":
        codecs = list(codecs[0]["configuration"]["codecs"])
    have = [without_typesize(c) for c in codecs if c["name"] not in ("bytes", "crc32c")]
    for name, make in CODECS.items():
        if [without_typesize(c.to_dict()) for c in make()] == have:
            return name
    return json.dumps(have)


def payload_decoder(spec: dict | None):
    """(src, dst) -> None for one compressor's JSON (None: the bytes are stored as they are); KeyError when
    diffstore's reader does not decode it (zarr's reader then does)."""
    return None if spec is None else DECODERS[spec["name"]]
