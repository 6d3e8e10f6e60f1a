"""The key of a feature array: its readable name and its fingerprint.

A feature array is *named* by (dataset, split, model, input, t, block, pool): that name is its path in the
store. Everything else that changes its values (weights bytes, architecture, preprocessing, sample order,
noise seed and draws, compute and storage dtype, extractor version) goes into the *fingerprint*. A store
refuses to write under a name whose stored fingerprint differs (see store.py), so a stale cache can never
be silently reused or mixed.

Failure policy: fingerprints are sha256 over canonical JSON. A value that is not plain JSON (numbers,
strings, bools, None, lists, dicts with string keys) raises TypeError: we never fall back to repr() or
pickling, whose bytes change between versions and processes. Settings that do not change values (batch
size, device, worker count) are never passed in.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import DiffstoreError

# Bump when a change to extraction alters stored values; it is part of every feature fingerprint.
EXTRACTOR_VERSION = "1"

INPUT_MODES = ("noised", "clean")
# The forward settings every store written before they became recipe fields was computed with.
LEGACY_FORWARD = {"micro_batch": 16, "attention": "eager", "compile": False}
DEFAULT_STORE = "data/default.zarr"  # where every command reads and writes unless --store says otherwise


# Names are path segments of a shared store: letters, digits and . _ + - only (no "/", "..", spaces, control or
# markup characters), at most 128 characters. ".random-init-s<int>" is reserved: `--random-init S` appends it.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
RANDOM_INIT = ".random-init-s"
SPLITS = ("train", "test")


class BadName(DiffstoreError, ValueError):
    """A name or key that cannot be a store path (a DiffstoreError for users, a ValueError for parsers)."""


def shorten(text: str) -> str:
    return text if len(text) <= 60 else text[:60] + "..."


def check_name(kind: str, name) -> str:
    """`name` if it is a valid model, dataset, split or result name (a store path segment); else BadName saying
    what is allowed."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        text = name if isinstance(name, str) else repr(name)
        raise BadName(f"{kind} name {shorten(text)!r} is not allowed: use 1-128 letters, digits and . _ + - (no '/', "
                      "'..', spaces or brackets), starting with a letter or digit")
    return name


def check_model_name(kind: str, name, reserved_ok: bool = True) -> str:
    """A valid model name: the suffix .random-init-s<int> only as a random-init twin's (NAME.random-init-sS, whose
    seed is read back from it); reserved_ok=False: a name the user chose, which may not carry it at all. Other
    names (a result naming a twin's arrays) may hold the text freely."""
    check_name(kind, name)
    base, marker, seed = name.partition(RANDOM_INIT)
    if marker and (not reserved_ok or not seed.isdigit() or RANDOM_INIT in seed or not base):
        raise BadName(f"{kind} name {shorten(name)!r} uses the reserved suffix {RANDOM_INIT}<int>: pass --random-init "
                      "S (it names the model NAME.random-init-sS) and choose another --model-name")
    return name


def canonical_json(value) -> str:
    """JSON with sorted keys and no whitespace; raises TypeError on anything that is not plain JSON."""

    def reject(obj):
        raise TypeError(f"not a plain JSON value, refusing to fingerprint it: {type(obj).__name__} {obj!r}")

    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False, default=reject)


def fingerprint(value) -> str:
    """sha256 hex digest of the canonical JSON of `value`."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def ids_sha256(ids) -> str:
    """sha256 of sample ids (or labels) as little-endian int64: a split's identity."""
    import numpy as np  # (key.py stays importable without numpy's start-up until this is called)

    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """sha256 over the bytes of the given files, in the given order (file names do not count)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def model_fingerprint(weights_sha256: str, config: dict) -> str:
    """Model identity: the weight bytes plus the architecture config, never a name or a path."""
    return fingerprint({"weights_sha256": weights_sha256, "config": config})


@dataclass(frozen=True)
class FeatureKey:
    """The readable name of one feature array; `path` is where it lives in a store."""

    dataset: str
    split: str
    model: str
    input: str  # "noised" (x_t) or "clean" (x_0, t only in the time embedding)
    t: int
    block: int  # b, 1-based in forward order (see blocks.py)
    pool: str  # "1", "2", "4", ... (adaptive average pool to p x p) or "full" (the unpooled map)

    def __post_init__(self):
        check_name("dataset", self.dataset)
        check_name("split", self.split)
        check_model_name("model", self.model)
        if self.input not in INPUT_MODES:
            raise BadName(f"input must be one of {INPUT_MODES}, got {self.input!r}")
        for name, value, low in (("t", self.t, 0), ("block", self.block, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise BadName(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.pool, str) or (self.pool != "full" and not (self.pool.isdigit() and int(self.pool) > 0)):
            raise BadName(f"pool must be a positive integer or 'full', got {self.pool!r}")

    @property
    def path(self) -> str:
        return f"features/{self.dataset}/{self.split}/{self.model}/{self.input}/t{self.t}/b{self.block}/p{self.pool}"

    @classmethod
    def from_path(cls, path: str) -> "FeatureKey":
        """The key of a store path; BadName for anything that is not exactly features/<6 names>/t<int>/b<int>/p<p>."""
        parts = path.strip("/").split("/") if isinstance(path, str) else []
        if len(parts) != 8 or parts[0] != "features" or not (re.fullmatch(r"t\d{1,9}", parts[5]) and
                                                              re.fullmatch(r"b\d{1,9}", parts[6]) and
                                                              parts[7].startswith("p")):
            raise BadName(f"not a feature path: {str(path)[:200]!r} (features/DATASET/SPLIT/MODEL/INPUT/tT/bB/pP)")
        _, dataset, split, model, input_, t, block, pool = parts
        return cls(dataset, split, model, input_, int(t[1:]), int(block[1:]), pool[1:])

    def short(self) -> str:
        """The compact form users type: t=90/b=5/p=2."""
        return f"t={self.t}/b={self.block}/p={self.pool}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Recipe:
    """Everything besides the name that changes a feature array's values (goes into its fingerprint)."""

    model_fingerprint: str
    dataset_fingerprint: str  # source + split + ids + preprocessing (datasets.py)
    noise_seed: int
    noise_draws: int
    compute_dtype: str  # "float32", "bfloat16", "float16"
    storage_dtype: str  # "float16" or "float32"
    extractor_version: str = EXTRACTOR_VERSION
    # How the forward runs. Kernels pick algorithms by tensor shape and fuse differently when compiled, so
    # these change the last bits of the features (never --batch-size, workers or the shard size):
    micro_batch: int = 16  # rows in every forward (a fixed partition of the split's rows, the last one padded)
    attention: str = "eager"  # "eager": the model's own attention code; "sdpa": F.scaled_dot_product_attention
    compile: bool = False  # torch.compile on the blocks' modules

    def fingerprint(self, key: FeatureKey) -> str:
        """Fields still at LEGACY_FORWARD values are left out: stores written before they existed (micro-batch
        16, eager attention, no compile) keep their fingerprints, so they open, read and resume as before."""
        recipe = {k: v for k, v in asdict(self).items() if k not in LEGACY_FORWARD or LEGACY_FORWARD[k] != v}
        return fingerprint({"key": key.to_dict(), "recipe": recipe})

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        """A stored recipe; the forward fields absent from older stores take their LEGACY_FORWARD values."""
        return cls(**{**LEGACY_FORWARD, **d})

    def to_dict(self) -> dict:
        return asdict(self)


SELECTOR_FIELDS = {"dataset": "dataset", "split": "split", "model": "model", "input": "input", "t": "t", "b": "block",
                   "block": "block", "p": "pool", "pool": "pool"}


def parse_selector(text: str) -> dict:
    """'t=90/b=5/p=2' (any subset, also dataset=, split=, model=, input=) -> {field: value}."""
    out = {}
    for part in (p for p in text.strip().strip("/").split("/") if p):
        name, sep, value = part.partition("=")
        if not sep or name not in SELECTOR_FIELDS:
            raise ValueError(f"cannot read {part!r} in {text!r}: use name=value parts such as t=90/b=5/p=2 "
                             f"(names: {', '.join(SELECTOR_FIELDS)})")
        field_ = SELECTOR_FIELDS[name]
        if field_ in ("dataset", "split", "model"):  # a name that cannot be a store path selects nothing: say why
            (check_model_name if field_ == "model" else check_name)(field_, value)
        if field_ in ("t", "block"):
            if not value.lstrip("-").isdigit():
                raise ValueError(f"cannot read {part!r} in {text!r}: {name} takes an integer (e.g. {name}=90)")
            value = int(value)
        out[field_] = value
    return out


def select(keys: list[FeatureKey], text: str) -> list[FeatureKey]:
    """Keys matching a selector (a store path works too)."""
    if text.startswith("features/"):
        return [k for k in keys if k.path == text.rstrip("/")]
    want = parse_selector(text)
    return [k for k in keys if all(getattr(k, f) == v for f, v in want.items())]
