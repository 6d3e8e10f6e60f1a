"""What a feature array records about how it was made, used to rebuild its inputs (repair recomputes shards with
them, finetune trains on them) and checked before anything runs.

Nothing recorded is executed, imported, downloaded or used as a path: the model comes from the command line
(`--model SPEC`) and the data from `--data-root` (or the dataset's default location). The record only checks them:
the model's fingerprint and the data's fingerprint must be the array's; its recipe's values must be ones extract
accepts; its attributes' size and its layout must be ones this model and data give. The recorded model spec
appears in messages as a hint, as text.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..datasets import Split, stored_split
from ..errors import DiffstoreError
from ..key import FeatureKey, Recipe
from ..models.base import DiffusionModel
from ..options import STYLE
from ..preprocess import Preprocess
from ..store import Store
from ..store.attrs import bad, check_size, checked_layout, checked_recipe, checked_source, shown
from .options import ExtractOptions


@dataclass
class Recorded:
    """One array's key and recipe, and its inputs as checked against them."""

    key: FeatureKey
    attrs: dict
    recipe: Recipe
    data: Split  # the array's samples in the store's order, loaded from the caller's data root
    preprocess: Preprocess
    options: ExtractOptions  # the recipe as extract options: every value range-checked


def recorded_hint(attrs: dict) -> str:
    """What the array's attributes say produced it: printed as a hint, never loaded."""
    source = attrs.get("model", {}).get("source", {}) if isinstance(attrs.get("model"), dict) else {}
    spec = source.get("spec") if isinstance(source, dict) else None
    return f" (its attributes record --model {str(spec)[:200]})" if spec else ""


def split_data(store: Store, key: FeatureKey, attrs: dict, data_root: str | None) -> Split:
    """The array's samples, loaded from `data_root` (the command line's, never the store's) in the stored order."""
    stored = store.split(key.dataset, key.split)
    group = store._group(f"datasets/{key.dataset}/{key.split}")
    skipped = group.attrs.get("skipped") if group is not None else None
    source = checked_source(attrs, key)
    limit = source.get("limit")  # only in splits an older version stored as a prefix
    try:
        data = stored_split(key.dataset, key.split, source, data_root, skip_bad=bool(skipped), limit=limit)
    except DiffstoreError as e:
        root = source.get("root")
        where = f"; it was extracted from {str(root)[:200]} on the writer's machine" if root else ""
        raise DiffstoreError(f"{key.path} needs the data of {key.dataset}/{key.split}: {e}{where}") from None
    return data.take(stored.ids, "pass the --data-root holding the data the array was extracted from")


def check_rebuildable(layout: dict, path: str, model: DiffusionModel, key: FeatureKey, n_rows: int,
                      recipe: Recipe) -> None:
    """Refuse a recorded layout that this model and data cannot give (an array's metadata is rebuilt from it)."""
    info = model.blocks[key.block]
    side = [info.height, info.width] if key.pool == "full" else [int(key.pool)] * 2
    want = {"n_rows": n_rows, "row_shape": [info.channels, *side], "dtype": recipe.storage_dtype}
    wrong = [k for k, v in want.items() if layout[k] != v]
    if wrong or layout["shard_rows"] % recipe.micro_batch:
        name = wrong[0] if wrong else "shard_rows"
        should = f"this model and data give {want[name]}" if wrong else \
            f"shards hold a multiple of the micro-batch ({recipe.micro_batch})"
        raise bad(path, f"layout.{name}", f"is {shown(layout[name], 60)}, but {should}: nothing can be rebuilt from it")


def recorded(store: Store, path: str, model: DiffusionModel, data_root: str | None, fix: str) -> Recorded:
    """The array at `path` with its inputs: refused (naming it, followed by `fix`) unless `model` is the network
    that wrote it; then its data loaded and refused unless it gives the recorded dataset fingerprint."""
    key = FeatureKey.from_path(path)
    attrs = dict(store._group(path).attrs)
    check_size(attrs, path)
    layout = checked_layout(attrs["layout"], path) if "layout" in attrs else None
    recipe = checked_recipe(attrs, path)
    if recipe.model_fingerprint != model.fingerprint:
        raise DiffstoreError(f"{path} was extracted by another model than --model {model.source.get('spec', '')} "
                             f"(model fingerprint {recipe.model_fingerprint[:12]}, yours {model.fingerprint[:12]})"
                             f"{recorded_hint(attrs)}. {fix}")
    data = split_data(store, key, attrs, data_root)
    pre = Preprocess(model.image_size, model.image_channels)
    if data.fingerprint(pre) != recipe.dataset_fingerprint:
        raise DiffstoreError(f"{path}: the {key.dataset}/{key.split} data loaded here is not what the array was "
                             "extracted from (dataset fingerprint differs); pass the --data-root of those files. "
                             "Nothing was changed")
    if layout is not None:
        check_rebuildable(layout, path, model, key, len(data), recipe)
    token = STYLE.set("api")  # a value out of range is the store's, not the user's option: say so
    try:
        options = ExtractOptions.build(
            t=key.t, blocks=str(key.block), pools=key.pool, input=key.input, noise_seed=recipe.noise_seed,
            noise_draws=recipe.noise_draws, compute_dtype=recipe.compute_dtype, dtype=recipe.storage_dtype,
            micro_batch=recipe.micro_batch, attention=recipe.attention, compile=recipe.compile,
            shard_rows=layout["shard_rows"] if layout else None)
    except DiffstoreError as e:
        raise DiffstoreError(f"{path}: its recorded recipe is not one diffstore writes ({e}); the store's metadata "
                             "was edited or is corrupt: remove the array with `diffstore rm` and extract it again") \
            from None
    finally:
        STYLE.reset(token)
    return Recorded(key, attrs, recipe, data, pre, options)
