"""The options of `diffstore extract` (and `ds.extract`): one dataclass, from which the CLI and the API are built.

Torch-free: `diffstore extract --help` reads it without importing the extractor.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..key import INPUT_MODES, LEGACY_FORWARD
from ..options import ModelOptions, StoreOptions, opt, progress_opt

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
STORAGE_DTYPES = ("float16", "float32")
ATTENTION = ("eager", "sdpa")
MICRO_BATCH = LEGACY_FORWARD["micro_batch"]  # the CPU default, and what every store before the field used


@dataclass(frozen=True)
class ExtractOptions(ModelOptions, StoreOptions):
    dataset: str = opt("digits", "digits | mnist | fashion-mnist | cifar10 | imagefolder")
    data_root: str | None = opt(None, "Dataset directory (default: $DIFFSTORE_DATA/<dataset>).")
    split: tuple[str, ...] = opt(("train", "test"), "Splits, comma-separated.", choices=("train", "test"))
    t: tuple[int, ...] = opt((10, 50, 150, 300), "Time steps, comma-separated.", flag="--t", min=0)
    blocks: tuple[str, ...] = opt(("all",), "Block indices or names (mid), comma-separated, or all.")
    pools: tuple[str, ...] = opt(("1", "2"), "Pool sizes p (adaptive average pool to p x p) and/or full.")
    input: str = opt("noised", "noised (x_t) | clean (x_0, t only in the time embedding).", choices=INPUT_MODES)
    noise_seed: int = opt(0, "Noise seed: eps is a function of (seed, sample id, t, draw).", min=0)
    noise_draws: int = opt(1, "Average features over this many noise draws.", min=1)
    batch_size: int = opt(64, "Rows per step (does not change values).", min=1)
    device: str = opt("auto", "auto | cpu | cuda | cuda:N (does not change the key).")
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
    workers: int | None = opt(None, "Run on a local dask cluster with this many worker processes.", min=1)
    scheduler: str | None = opt(None, "Run on a dask.distributed scheduler (tcp://HOST:8786).")
    show_progress: bool = progress_opt()


@dataclass(frozen=True)
class RepairOptions(ModelOptions, StoreOptions):
    """`diffstore repair`: the model comes from the command line, as extract takes it; never from the store."""

    keys: tuple[str, ...] = opt((), "Arrays to repair (paths or selectors like t=90/b=5/p=2); default: all.")
    data_root: str | None = opt(None, "Dataset directory the arrays were extracted from (default: $DIFFSTORE_DATA/"
                                      "<dataset>).")
    batch_size: int = opt(64, "Rows per step (does not change values).", min=1)
    device: str = opt("auto", "auto | cpu | cuda | cuda:N (does not change values).")
    show_progress: bool = progress_opt()
