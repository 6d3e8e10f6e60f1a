"""Attributes read from a store are untrusted input: anyone with write access to a shared bucket can edit them.

Every value a command acts on is checked here before use (type, size, range), and a failure names the array and
the attribute and exits 2 like any bad input. Nothing read from a store is ever executed, imported, downloaded or
unpickled; text from it is printed as text (truncated), never used as a path to read or a module to import.
"""

from __future__ import annotations

import json
import math

from ..errors import DiffstoreError
from ..key import FeatureKey, Recipe

MAX_ATTRS_BYTES = 1 << 20  # a node's attributes as JSON; real ones are a few KB
MAX_TEXT = 200  # characters of a stored string shown in a message
DTYPES = ("float16", "float32", "bfloat16", "int64", "uint8")


def shown(value, limit: int = MAX_TEXT) -> str:
    """A stored value as bounded text for a message or a table cell."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def bad(where: str, name: str, what: str) -> DiffstoreError:
    return DiffstoreError(f"{where}: attribute {name} {what}. The store's metadata was edited or is corrupt: remove "
                          f"the node with `diffstore rm` and re-run the command that wrote it")


def check_size(attrs: dict, where: str) -> None:
    """Refuse attributes larger than MAX_ATTRS_BYTES, naming the largest one."""
    sizes = {k: len(json.dumps(v, default=str)) for k, v in attrs.items()}
    if sum(sizes.values()) > MAX_ATTRS_BYTES:
        big = max(sizes, key=sizes.get)
        raise bad(where, big, f"is {sizes[big]:,} bytes (attributes are limited to {MAX_ATTRS_BYTES:,})")


def positive_int(value, where: str, name: str, limit: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (limit is not None and value > limit):
        bound = f" <= {limit:,}" if limit is not None else ""
        raise bad(where, name, f"must be a whole number >= 1{bound}, got {shown(value, 40)}")
    return value


def checked_layout(layout, where: str) -> dict:
    """The `layout` attribute (n_rows, row_shape, shard_rows, dtype), every field checked."""
    if not isinstance(layout, dict):
        raise bad(where, "layout", f"must be a mapping, got {shown(layout, 40)}")
    n = positive_int(layout.get("n_rows"), where, "layout.n_rows", 1 << 40)
    positive_int(layout.get("shard_rows"), where, "layout.shard_rows", 1 << 40)
    shape = layout.get("row_shape")
    if not isinstance(shape, list) or len(shape) > 8:
        raise bad(where, "layout.row_shape", f"must be a list of at most 8 sizes, got {shown(shape, 40)}")
    for i, s in enumerate(shape):
        positive_int(s, where, f"layout.row_shape[{i}]", 1 << 24)
    if math.prod(shape) * n > 1 << 50:
        raise bad(where, "layout", f"describes {math.prod(shape) * n:,} values, more than any store holds")
    if layout.get("dtype") not in DTYPES:
        raise bad(where, "layout.dtype", f"must be one of {', '.join(DTYPES)}, got {shown(layout.get('dtype'), 40)}")
    return layout


def checked_recipe(attrs: dict, where: str) -> Recipe:
    """The `recipe` attribute as a Recipe, every field of the expected type (the extract options check ranges)."""
    recipe = attrs.get("recipe")
    if not isinstance(recipe, dict):
        raise bad(where, "recipe", f"must be a mapping, got {shown(recipe, 40)}")
    types = {"model_fingerprint": str, "dataset_fingerprint": str, "noise_seed": int, "noise_draws": int,
             "compute_dtype": str, "storage_dtype": str, "extractor_version": str, "micro_batch": int,
             "attention": str, "compile": bool}
    for name, kind in types.items():
        value = recipe.get(name)
        if value is None and name in ("micro_batch", "attention", "compile", "extractor_version"):
            continue  # absent from stores written before the field existed
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)) or \
                (kind is str and len(value) > MAX_TEXT):
            raise bad(where, f"recipe.{name}", f"must be a {kind.__name__}, got {shown(value, 40)}")
    unknown = set(recipe) - set(types)
    if unknown:
        raise bad(where, "recipe", f"has unknown fields {shown(sorted(unknown), 80)}")
    return Recipe.from_dict(recipe)


def checked_source(attrs: dict, key: FeatureKey) -> dict:
    """The dataset source fields repair uses: `limit` (a whole number or absent), `loader` (the loader of a split
    stored under another name: a string or absent) and `root` (shown only)."""
    where = key.path
    dataset = attrs.get("dataset", {})
    source = dataset.get("source", {}) if isinstance(dataset, dict) else None
    if not isinstance(source, dict):
        raise bad(where, "dataset.source", f"must be a mapping, got {shown(source, 40)}")
    limit = source.get("limit")
    if limit is not None:
        positive_int(limit, where, "dataset.source.limit", 1 << 40)
    loader = source.get("loader")
    if loader is not None and not isinstance(loader, str):
        raise bad(where, "dataset.source.loader", f"must be a dataset name, got {shown(loader, 40)}")
    root = source.get("root")
    return {"limit": limit, "loader": loader, "root": shown(root) if root is not None else None}
