"""The options of `diffstore probe` (and `ds.probe`): one dataclass, from which the CLI and the API are built.

Torch-free: `diffstore probe --help` reads it without importing the heads. The names of heads and recipes are
defined here, once; heads.py and recipe.py import them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..key import INPUT_MODES
from ..options import StoreOptions, dpi_opt, opt, plot_format_opt, progress_opt

HEADS = ("linear", "mlp", "cnn", "attention")
FUSION = "fusion"  # a head over several keys (fusion.py): not one of the paper's single-key heads
KNN = "knn"  # the k-nearest-neighbour evaluation (knn.py): a protocol, not a trained head
KINDS = (*HEADS, FUSION, KNN)
RECIPES = ("converged", "paper")
METRICS = ("top1", "top5", "mean-per-class")  # what every result records; --metric picks the summary's
# C from 1e-4 to 1e2, half a decade apart: wide enough that a chosen C at an end of the grid is a finding to report
# (the stage warns), not the grid's doing; solved from small to large C, each solve warm-starting the next.
C_GRID = tuple(float(f"{10 ** (e / 2):.4g}") for e in range(-8, 5))
KNN_KS, KNN_TEMPERATURE = (10, 20, 100, 200), 0.07  # DINO's neighbour counts and vote temperature
DEFAULT_MEMORY_GB = 2.0  # features held in RAM up to this; larger ones stream from the store


@dataclass(frozen=True)
class ProbeOptions(StoreOptions):
    dataset: str | None = opt(None, "Only keys of this dataset.")
    model: str | None = opt(None, "Only keys of this model (its random-init twins are shown too).")
    input: str | None = opt(None, "Only keys of this input mode.", choices=INPUT_MODES)
    t: tuple[int, ...] | None = opt(None, "Only these time steps (comma-separated).", flag="--t")
    blocks: tuple[str, ...] | None = opt(None, "Only these blocks: indices or names, as extract takes (7,mid,down1.0).")
    pools: tuple[str, ...] | None = opt(None, "Only these pools (comma-separated).")
    head: tuple[str, ...] = opt(("linear",), "linear | mlp | cnn | attention | fusion | knn (comma-separated for "
                                             "several; fusion needs --fuse; knn: DINO's weighted k-nearest-neighbour "
                                             "vote, k picked on validation).", choices=KINDS)
    head_pool: int | None = opt(None, "Pool the stored map to this size inside the head (fusion: tokens per key "
                                      "side, default 8).", min=1)
    batchnorm: bool = opt(False, "BatchNorm before the linear head.")
    hidden: tuple[int, ...] = opt((512,), "MLP hidden sizes.", min=1)
    channels: tuple[int, ...] = opt((64, 64), "CNN channels of the two conv blocks.", min=1)
    dim: int = opt(128, "Attention/fusion head width.", min=1)
    depth: int = opt(1, "Attention/fusion head Transformer blocks.", min=1)
    n_heads: int = opt(4, "Attention heads.", min=1)
    recipe: str = opt("converged", "converged: linear solved to convergence (L-BFGS, C on validation), other heads "
                                   "tuned and early-stopped on validation | paper: Adam, 28 epochs, StepLR.",
                      choices=RECIPES)
    cs: tuple[float, ...] = opt(C_GRID, "converged recipe: the linear probe's C grid (scikit-learn's C; default 13 "
                                        "values, 1e-4 to 1e2 half a decade apart), picked on validation.", min=0)
    refit: bool = opt(False, "Refit the linear probe on train + validation at the chosen C (knn: every train row is "
                             "the bank); part of the recipe, so results never mix.")
    ks: tuple[int, ...] = opt(KNN_KS, "knn: the neighbour counts k tried on validation.", min=1)
    temperature: float = opt(KNN_TEMPERATURE, "knn: the vote's temperature T (each neighbour votes "
                                              "exp(similarity / T)).", min=0)
    steps: int = opt(3000, "converged recipe: optimizer-step budget of mlp/cnn/attention heads.", min=1)
    lrs: tuple[float, ...] = opt((0.001, 0.003, 0.01), "converged recipe: AdamW learning rates that mlp/cnn/attention "
                                 "heads are tuned over (each paired with every --weight-decays value; picked on "
                                 "validation).")
    weight_decays: tuple[float, ...] = opt((0.0, 0.05, 0.5), "converged recipe: AdamW weight decays of that grid.")
    epochs: int = opt(28, "paper recipe: epochs.", min=1)
    lr: float = opt(1e-3, "paper recipe: Adam learning rate.")
    weight_decay: float = opt(0.0, "paper recipe: Adam weight decay.", min=0)
    batch_size: int = opt(128, "Batch size of trained heads.", min=1)
    step_every: int = opt(8, "paper recipe: StepLR step (epochs).", min=1)
    gamma: float = opt(0.1, "paper recipe: StepLR gamma.")
    val_frac: float = opt(0.1, "Validation share carved from train (never from test).", min=0)
    early_stop: bool = opt(False, "paper recipe: keep the epoch with the best validation accuracy.")
    seed: int = opt(0, "Seed of the validation carve, inits and batch order.", min=0)
    seeds: int = opt(1, "Run seeds seed..seed+K-1 and report mean +- std.", min=1)
    limit: int | None = opt(None, "Only the first N rows of each split.", min=1)
    augment: str | None = opt(None, "Train on the train split's stored views (extract --views SPEC: flip, crops:K, "
                                    "flip,crops:K): every view of a sample is a training row; validation and test read "
                                    "the plain images. Models without those views are left out, with a note.")
    baseline: str | None = opt(None, "pixels: the same head on raw preprocessed pixels.", choices=("none", "pixels"))
    data_root: str | None = opt(None, "Dataset directory for --baseline pixels.")
    select: int = opt(0, "Rank every key by a closed-form ridge proxy; train the top K.", min=0)
    fuse: str | None = opt(None, "One head on concatenated keys: t=90/b=5/p=2,t=150/b=6/p=2, or auto (the top --select "
                                 "K); with --head fusion the keys the fusion head fuses.")
    metric: tuple[str, ...] = opt(("top1",), "top1 | top5 | mean-per-class (comma-separated): the summary's "
                                             "metric(s), each selecting the best key on validation; every result "
                                             "records all three.", choices=METRICS)
    save_heads: bool = opt(False, "Store each fitted head in the store (results/heads/NAME), to load with "
                                  "ds.open(STORE).head(...) and predict on new features.")
    grid: bool = opt(False, "Accuracy table over (t, block, pool).")
    plot: str | None = opt(None, "Write heatmaps (model, random-init twin, trained minus twin) and accuracy-vs-t "
                                 "curves here.")
    plot_format: tuple[str, ...] = plot_format_opt()
    dpi: int = dpi_opt()
    show_all: bool = opt(False, "Print every result, not only the summary.", flag="--all")
    list_results: bool = opt(False, "List stored probe results without training.", flag="--list")
    retrain: bool = opt(False, "Train again even when the same recipe is stored.")
    device: str | None = opt(None, "cpu | cuda (default: cuda when present).")
    memory_gb: float = opt(DEFAULT_MEMORY_GB, "Features held in RAM up to this size; larger ones stream from the "
                                              "store.", min=0)
    workers: int | None = opt(None, "Train on a local dask cluster with this many workers.", min=1)
    scheduler: str | None = opt(None, "Train on a dask.distributed scheduler.")
    show_progress: bool = progress_opt()
