"""The options of `diffstore cka` (and `ds.cka`): one dataclass, from which the CLI and the API are built.

Torch-free and numpy-free: `diffstore cka --help` reads it. The estimator and kernel names are defined here once.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..key import INPUT_MODES
from ..options import StoreOptions, dpi_opt, opt, plot_format_opt, progress_opt

METHODS = ("exact", "unbiased", "minibatch", "auto")  # auto: exact when its accumulators fit max_gram_gib
KERNELS = ("linear", "rbf")
AXES = ("block", "t", "pool")


@dataclass(frozen=True)
class CKAOptions(StoreOptions):
    by: str | None = opt(None, "block | t | pool: the matrix axis; the other fields stay fixed.", choices=AXES)
    t: tuple[int, ...] | None = opt(None, "Time step(s) (comma-separated).", flag="--t")
    block: tuple[int, ...] | None = opt(None, "Block(s).")
    pool: tuple[str, ...] | None = opt(None, "Pool(s).")
    model: str | None = opt(None, "Model of the arrays (needed when the store holds several).")
    dataset: str | None = opt(None, "Dataset of the arrays (needed when the store holds several).")
    split: str | None = opt(None, "Split to compare on (default: test when the store holds several).")
    input: str | None = opt(None, "Input mode, noised | clean (needed when the store holds both).",
                            choices=INPUT_MODES)
    a: str | None = opt(None, "Row keyset: t=90/b=5/p=2,t=150/b=6/p=2 (model=... too).")
    b: str | None = opt(None, "Column keyset (default: the rows).")
    store_b: str | None = opt(None, "Store of the column keyset (across stores).")
    method: str = opt("unbiased", "unbiased (debiased, all rows, O(D^2) memory) | exact (full-batch, biased upwards "
                                  "when N is not >> D) | minibatch (unbiased, O(batch^2)) | auto (exact if it fits, "
                                  "else minibatch).", choices=METHODS)
    kernel: str = opt("linear", "linear | rbf (minibatch only).", choices=KERNELS)
    batch_size: int = opt(256, "Minibatch size (recorded with the result).", min=2)
    seed: int = opt(0, "Sample-order seed of the minibatch estimator (recorded).", min=0)
    sigma_frac: float = opt(1.0, "RBF bandwidth as a fraction of the median distance (> 0).", min=1e-9)
    limit: int | None = opt(None, "Only the first N rows of the split.", min=1)
    plot: str | None = opt(None, "Write the heatmap into this folder.")
    plot_format: tuple[str, ...] = plot_format_opt()
    dpi: int = dpi_opt()
    out: str | None = opt(None, "Write the matrix JSON into this folder.")
    name: str | None = opt(None, "Name of the stored result (default: from the keys and the estimator).")
    save: bool = opt(True, "Store the result in the store (results/cka).")
    workers: int | None = opt(None, "Compute on a local dask cluster with this many workers.", min=1)
    scheduler: str | None = opt(None, "Compute on a dask.distributed scheduler.")
    show_progress: bool = progress_opt()
