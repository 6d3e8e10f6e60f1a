"""The options of `diffstore finetune` (and `ds.finetune`): one dataclass, from which the CLI and the API are built.

The model comes from the command line as extract takes it (ModelOptions), never from the array's attributes; its
fingerprint must be the one the array recorded. Torch-free: `diffstore finetune --help` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..key import INPUT_MODES
from ..options import ModelOptions, StoreOptions, device_opt, opt, progress_opt
from ..probe.options import HEADS

STARTS = ("pretrained", "scratch")


@dataclass(frozen=True)
class FinetuneOptions(ModelOptions, StoreOptions):
    dataset: str | None = opt(None, "Dataset of the key (needed when the store holds several).")
    input: str | None = opt(None, "Input mode of the key (needed when the store holds both).", choices=INPUT_MODES)
    t: int = opt(10, "Time step of the key.", flag="--t", min=0)
    block: str = opt("mid", "Block of the key: an index or a name (mid, down1.0), as extract takes.")
    pool: str = opt("2", "Pool of the key (the head reads the block's map pooled to p x p).")
    head: str = opt("linear", "The head on the pooled map (probe's heads).", choices=HEADS)
    dim: int = opt(128, "Attention head width.", min=1)
    depth: int = opt(1, "Attention head Transformer blocks.", min=1)
    n_heads: int = opt(4, "Attention heads.", min=1)
    start: str = opt("pretrained", "pretrained: start from --model's weights | scratch: the same truncated "
                                   "architecture with seeded random weights (the paper's comparison).",
                     flag="--from", choices=STARTS)
    init_seed: int = opt(0, "Seed of the random weights with --from scratch.", min=0)
    steps: int = opt(1000, "Optimizer-step budget per grid point (early stopping on validation may end it sooner).",
                     min=1)
    lrs: tuple[float, ...] = opt((0.0001, 0.0003, 0.001), "AdamW learning rates of the grid (network and head "
                                 "alike; each paired with every --weight-decays value, picked on validation).")
    weight_decays: tuple[float, ...] = opt((0.0, 0.05), "AdamW weight decays of the grid.")
    min_steps: int = opt(200, "Early stopping never before this many steps.", min=1)
    batch_size: int = opt(64, "Images per step.", min=1)
    eval_every: int = opt(50, "Validation top-1 every this many steps (early stopping, convergence test).", min=1)
    patience: int = opt(5, "Evaluations without a better validation top-1 before a grid point stops.", min=1)
    val_frac: float = opt(0.1, "Validation share carved from train (never from test), as the probe carves it.", min=0)
    seed: int = opt(0, "Seed of the validation carve, the head's init and the batch order.", min=0)
    limit: int | None = opt(None, "Only rows [0, N) of each split (they must be extracted; compared with probe "
                                  "results of the same limit).", min=1)
    data_root: str | None = opt(None, "Dataset directory the key was extracted from (default: $DIFFSTORE_DATA/"
                                      "<dataset>).")
    retrain: bool = opt(False, "Train again even when the same settings are stored.")
    device: str = device_opt()
    show_progress: bool = progress_opt()
