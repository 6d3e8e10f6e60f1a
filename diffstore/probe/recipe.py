"""How a head is trained: one recipe record, stored with every result it produced.

    converged (default)  linear: logistic regression solved to convergence, C picked on validation (solve.py);
                         mlp/cnn/attention: AdamW for a budget of optimizer steps, lr and weight decay picked on
                         validation from a small grid, early stopping on validation (train.py)
    paper                the paper's linear-probe recipe for every head: Adam lr 1e-3, 28 epochs, StepLR x0.1
                         every 8 epochs, batch 128 (today's numbers; it underfits small datasets)

The knn head trains nothing: under either recipe it reads ks, temperature and refit (knn.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import DiffstoreError
from .options import C_GRID, KNN_KS, KNN_TEMPERATURE, RECIPES

COMMON = ("name", "val_frac", "seed", "limit")
USED = {  # the fields each recipe reads: only they name a result, so unused options never split a cache entry
    "paper": (*COMMON, "epochs", "lr", "weight_decay", "batch_size", "step_every", "gamma", "early_stop"),
    "linear": (*COMMON, "Cs", "tol", "max_iter", "refit"),
    "iterative": (*COMMON, "steps", "min_steps", "lrs", "weight_decays", "batch_size", "eval_every", "patience"),
    "knn": (*COMMON, "ks", "temperature", "refit"),
}


@dataclass(frozen=True)
class ProbeRecipe:
    name: str = "converged"
    # paper: Adam, epochs, StepLR
    epochs: int = 28
    lr: float = 1e-3
    weight_decay: float = 0.0
    step_every: int = 8
    gamma: float = 0.1
    early_stop: bool = False  # keep the weights of the epoch with the best validation top-1
    # converged linear: the C grid (scikit-learn's C = 1 / (lam * n)), the convergence test and its cap
    Cs: tuple[float, ...] = C_GRID
    tol: float = 0.01  # converged when max |gradient| <= tol * lam, clamped to [1e-5, 1e-4]
    max_iter: int = 1000
    refit: bool = False  # linear, knn: the reported head refit on train + validation at the chosen C (knn: k)
    # knn: neighbours tried on validation (clipped to the fit rows) and the vote's temperature, as DINO
    ks: tuple[int, ...] = KNN_KS
    temperature: float = KNN_TEMPERATURE
    # converged iterative heads: optimizer steps (early stopping never before min_steps), the lr x wd grid
    steps: int = 3000
    min_steps: int = 500
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    weight_decays: tuple[float, ...] = (0.0, 0.05, 0.5)
    eval_every: int = 100
    patience: int = 5  # evaluations without a better validation top-1 before a head stops
    # both
    batch_size: int = 128
    val_frac: float = 0.1
    seed: int = 0
    limit: int | None = None  # only the first N rows of each split (as extract --limit): part of a result's name

    def __post_init__(self):
        if self.name not in RECIPES:
            raise DiffstoreError(f"unknown recipe {self.name!r}: choose one of {', '.join(RECIPES)}")
        if min(self.epochs, self.batch_size, self.step_every, self.steps, self.eval_every, self.max_iter) < 1:
            raise DiffstoreError("--epochs, --steps, --batch-size and --step-every must be >= 1")
        if not self.lrs or min(self.lrs) <= 0 or not self.weight_decays or min(self.weight_decays) < 0:
            raise DiffstoreError(f"--lrs takes learning rates > 0 and --weight-decays values >= 0 (at least one each), "
                                 f"got {list(self.lrs)} and {list(self.weight_decays)}")
        if not self.Cs or min(self.Cs) <= 0:
            raise DiffstoreError(f"--cs takes values of C > 0 (at least one), got {list(self.Cs)}")
        if not self.ks or min(self.ks) < 1 or self.temperature <= 0:
            raise DiffstoreError(f"the knn head takes --ks integers >= 1 (at least one) and a --temperature > 0, got "
                                 f"{list(self.ks)} and {self.temperature}")
        if self.limit is not None and self.limit < 1:
            raise DiffstoreError(f"--limit must be >= 1, got {self.limit}")
        if not 0 <= self.val_frac < 1:
            raise DiffstoreError(f"--val-frac must be in [0, 1), got {self.val_frac}")
        if (self.early_stop or self.name == "converged") and self.val_frac == 0:
            raise DiffstoreError(f"the {self.name} recipe{' with --early-stop' * self.early_stop} selects on the "
                                 "validation split: pass --val-frac > 0")

    def to_dict(self, head: str = "linear") -> dict:
        """The fields this recipe reads for this kind of head."""
        part = ("knn" if head == "knn" else "paper" if self.name == "paper" else "linear" if head == "linear"
                else "iterative")
        d = asdict(self)
        return {k: list(d[k]) if isinstance(d[k], tuple) else d[k] for k in USED[part]}
