"""The options of `diffstore extract` (and `ds.extract`): one dataclass, from which the CLI and the API are built.

Torch-free: `diffstore extract --help` reads it without importing the extractor.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DiffstoreError
from ..key import INPUT_MODES, LEGACY_FORWARD, check_name
from ..options import ModelOptions, StoreOptions, device_opt, opt, progress_opt, spell

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
STORAGE_DTYPES = ("float16", "float32")
ATTENTION = ("eager", "sdpa")
MICRO_BATCH = LEGACY_FORWARD["micro_batch"]  # the CPU default, and what every store before the field used


@dataclass(frozen=True)
class ExtractOptions(ModelOptions, StoreOptions):
    dataset: str = opt("digits", "digits | mnist | fashion-mnist | cifar10 | imagefolder")
    data_root: str | None = opt(None, "Dataset directory (default: $DIFFSTORE_DATA/<dataset>).")
    dataset_name: str | None = opt(None, "Name of the dataset in store paths (default: --dataset). Several image "
                                         "folders in one store need one each (--dataset imagefolder --dataset-name "
                                         "cub).")
    split: tuple[str, ...] = opt(("train", "test"), "Splits, comma-separated.", choices=("train", "test"))
    t: tuple[int, ...] = opt((10, 50, 150, 300), "Time steps, comma-separated.", flag="--t", min=0)
    blocks: tuple[str, ...] = opt(("all",), "Block indices or names (mid), comma-separated, or all.")
    pools: tuple[str, ...] = opt(("1", "2"), "Pool sizes p (adaptive average pool to p x p) and/or full.")
    input: str = opt("noised", "noised (x_t) | clean (x_0, t only in the time embedding).", choices=INPUT_MODES)
    noise_seed: int = opt(0, "Noise seed: eps is a function of (seed, sample id, t, draw).", min=0)
    noise_draws: int = opt(1, "Average features over this many noise draws.", min=1)
    batch_size: int = opt(64, "Rows per step (does not change values).", min=1)
    device: str = device_opt("does not change the key")
    dtype: str = opt("float16", "Storage dtype: float16 | float32.", choices=STORAGE_DTYPES)
    compute_dtype: str = opt("float32", "float32 | bfloat16 | float16 (autocast).", choices=COMPUTE_DTYPES)
    shard_rows: int | None = opt(None, "Rows per shard (a multiple of the micro-batch; default: sized to ~256 MB "
                                       "per task).", min=1)
    micro_batch: int | None = opt(None, "Rows per forward: part of the recipe (changes the last bits). Default: what "
                                        "the arrays hold, else 16 on CPU, sized to memory on CUDA.", min=1)
    attention: str | None = opt(None, "ADM attention: sdpa (default for new arrays) | eager (the reference's "
                                      "einsum). Part of the recipe.", choices=ATTENTION)
    compile: bool | None = opt(None, "torch.compile the blocks' layers (part of the recipe; default: what the "
                                     "arrays hold, else off).")
    loader_workers: int | None = opt(None, "Processes decoding images ahead of the device (default: cores - 1, at "
                                           "most 8; does not change values).", min=0)
    skip_bad: bool = opt(False, "Skip unreadable images, recording their ids.")
    limit: str | None = opt(None, "Only rows [0, N) of each split: N, or per split train=2000,test=10000. The arrays "
                                  "are the whole split's; a later run with a larger limit (or none) adds the rest.")
    rows: str | None = opt(None, "Only this row range of each split: A:B, or per split train=0:5000,test=0:100 "
                                 "(machines or people can split the rows of one array between them).")
    views: str | None = opt(None, "Augmented views stored as extra rows: flip, crops:K (seeded random-resized crops) "
                                  "or flip,crops:K; the split is stored as SPLIT+VIEWS (e.g. train+flip), each view "
                                  "a fixed transform in its key. probe --augment trains on them.")
    view_seed: int = opt(0, "Seed of the crop views' boxes (part of the key).", min=0)
    dry_run: bool = opt(False, "Print the arrays to create, the shards to compute, the bytes they take and an "
                               "estimated time (one timed micro-batch), without writing anything.")
    workers: int | None = opt(None, "Run on a local dask cluster with this many worker processes.", min=1)
    scheduler: str | None = opt(None, "Run on a dask.distributed scheduler (tcp://HOST:8786).")
    show_progress: bool = progress_opt()

    def stored_dataset(self) -> str:
        """The dataset's name in store paths: --dataset-name (checked: a path segment, not another loader's name),
        else --dataset."""
        from ..datasets import LOADERS

        name = self.dataset_name
        if name is None or name == self.dataset:
            return self.dataset
        check_name(spell("dataset_name", ExtractOptions), name)
        if name in LOADERS:
            raise DiffstoreError(f"{spell('dataset_name', ExtractOptions)} {name} is the name of the {name} dataset; "
                                 f"choose another name for {self.dataset} data")
        return name


@dataclass(frozen=True)
class RepairOptions(ModelOptions, StoreOptions):
    """`diffstore repair`: the model comes from the command line, as extract takes it; never from the store."""

    keys: tuple[str, ...] = opt((), "Arrays to repair (paths or selectors like t=90/b=5/p=2); default: all.")
    data_root: str | None = opt(None, "Dataset directory the arrays were extracted from (default: $DIFFSTORE_DATA/"
                                      "<dataset>).")
    batch_size: int = opt(64, "Rows per step (does not change values).", min=1)
    device: str = device_opt("does not change values")
    show_progress: bool = progress_opt()


# --- checks of these options against a model and a split (torch-free: the no-op re-run uses them too) ---

def per_split(text: str | None, split: str, name: str) -> str | None:
    """`text` for this split: "256" (every split) or "train=2000,test=10000" (None when this split is not named)."""
    if text is None or "=" not in text:
        return text
    found = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        which, sep, value = part.partition("=")
        if not sep or which not in ("train", "test") or which in found:
            raise DiffstoreError(f"{spell(name, ExtractOptions)} {text!r}: use one value for every split, or "
                                 "train=...,test=... with each split at most once")
        found[which] = value
    return found.get(split)


def row_range(o: ExtractOptions, split: str, n: int) -> range:
    """The rows of a split this run extracts: --limit N is [0, N), --rows A:B is [A, B); default all n rows."""
    limit, rows = per_split(o.limit, split, "limit"), per_split(o.rows, split, "rows")
    if limit is not None and rows is not None:
        raise DiffstoreError(f"{spell('limit', ExtractOptions)} and {spell('rows', ExtractOptions)} both name rows of "
                             f"{split}: pass one of them")
    if limit is not None:
        if not limit.strip().isdigit() or int(limit) < 1:
            raise DiffstoreError(f"{spell('limit', ExtractOptions)} takes a number of rows >= 1, got {limit!r}")
        start, stop = 0, int(limit)
    elif rows is not None:
        a, sep, b = rows.partition(":")
        if not sep or not a.strip().isdigit() or not b.strip().isdigit() or int(a) >= int(b):
            raise DiffstoreError(f"{spell('rows', ExtractOptions)} takes a range A:B of rows with A < B, got {rows!r}")
        start, stop = int(a), int(b)
    else:
        return range(n)
    if stop > n:
        raise DiffstoreError(f"the {split} split holds {n} rows; rows [{start}, {stop}) reach past its end: pass at "
                             f"most {n}")
    return range(start, stop)


def check_ts(ts: tuple[int, ...], num_timesteps: int) -> list[int]:
    bad = [t for t in ts if not 0 <= t < num_timesteps]
    if bad or not ts:
        raise DiffstoreError(f"t must be in [0, {num_timesteps - 1}] for this model (T = {num_timesteps}); "
                             f"got {bad or 'none'}")
    return sorted(set(ts))


def check_pools(pools: tuple[str, ...]) -> list[str]:
    for p in pools:
        if p != "full" and not (p.isdigit() and int(p) > 0):
            raise DiffstoreError(f"{spell('pools', ExtractOptions)} takes positive integers or "
                                 f"'full' (e.g. 1,2,4,full), got {p!r}")
    if not pools:
        raise DiffstoreError(f"{spell('pools', ExtractOptions)} is empty: pass e.g. 1,2")
    return sorted(set(pools), key=lambda p: (p == "full", int(p) if p != "full" else 0))
