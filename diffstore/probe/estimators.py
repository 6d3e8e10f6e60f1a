"""scikit-learn estimators over the probe stage's heads: fit on any array, predict, keep in a store, load back.

    LinearProbe  the converged linear probe of `diffstore probe` (solve.py: standardise, L-BFGS, C chosen on a
                 validation carve; the same function the stage calls)
    KNNProbe     the kNN evaluation (knn.py: cosine similarity, DINO's exp(sim / T) vote, k chosen on validation)
    HeadProbe    an iterative head (mlp, cnn, attention; linear under the paper recipe) trained by train.py

    from diffstore.probe import LinearProbe
    probe = LinearProbe().fit(x_train, y_train)       # x: [N, C, H, W] or [N, D], numpy, torch or ds Features
    probe.predict(x_test), probe.predict_proba(x_test), probe.score(x_test, y_test), probe.C_

fit(X, y) carves its validation rows from X with the recipe's val_frac and seed, exactly as the stage carves them
from a train split, so LinearProbe().fit(train features, train labels) is the stage's result on that key. Labels
may be anything sortable (classes_ holds them); a head loaded from a store (saved.load_head) predicts the store's
integer labels and names them in class_names_. Parameters follow scikit-learn (get_params, set_params, clone).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin

from ..device import pick_device
from ..errors import DiffstoreError
from ..store import ShardedArray
from .feed import DEFAULT_BUDGET, Feed, Rows, first_rows, split_val
from .heads import FUSION, KNN, HeadSpec
from .knn import choose_k, knn_votes
from .options import C_GRID, KNN_KS, KNN_TEMPERATURE
from .recipe import ProbeRecipe
from .solve import linear_logits, solve_many
from .train import EVAL_ROWS, Job, head_logits, train_many


def as_rows(X) -> Rows:
    """Rows [N, C, H, W] of X: a numpy array or torch tensor ([N, D] vectors become [N, D, 1, 1] maps), or a store's
    Features / ShardedArray, which are read shard by shard when they exceed the memory budget."""
    if isinstance(X, ShardedArray):
        X.require_done()
        return Rows.of(X)
    if isinstance(getattr(X, "array", None), ShardedArray):  # ds Features: its first n rows (limit=)
        X.array.require_done(X.n)
        return first_rows(Rows.of(X.array), X.n)
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    X = np.asarray(X)
    if X.ndim == 2:
        X = X[:, :, None, None]
    if X.ndim != 4 or X.dtype.kind not in "fiub":
        raise DiffstoreError(f"a probe takes numeric features [N, C, H, W] or [N, D], got shape {X.shape} ({X.dtype})")
    return Rows.of(X if X.dtype.kind == "f" else X.astype(np.float32))


class Probe(ClassifierMixin, BaseEstimator):
    """What the probes share: inputs as Rows, labels encoded as 0..K-1, predictions from predict_proba."""

    def _budget(self) -> int:
        return int(self.memory_gb * 2**30)

    def _device(self) -> torch.device:
        return pick_device(self.device)

    def _fit_rows(self, X, y) -> tuple[Rows, np.ndarray]:
        rows, y = as_rows(X), np.asarray(y)
        if len(y) != rows.n_rows:
            raise DiffstoreError(f"X has {rows.n_rows} rows but y has {len(y)} labels")
        self.classes_, encoded = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise DiffstoreError(f"a probe needs at least 2 classes in y, got {list(self.classes_)}")
        self.row_shape_ = rows.row_shape
        self.n_features_in_ = int(np.prod(rows.row_shape))
        return rows, encoded.astype(np.int64)

    def _rows(self, X) -> Rows:
        rows = as_rows(X)
        if not hasattr(self, "row_shape_"):
            raise DiffstoreError(f"this {type(self).__name__} is not fitted yet: call fit(X, y) first")
        if tuple(rows.row_shape) != tuple(self.row_shape_):
            raise DiffstoreError(f"X has rows of shape {tuple(rows.row_shape)}, but this probe was fitted on rows of "
                                 f"shape {tuple(self.row_shape_)}: pass features of the same key")
        return rows

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(1)]


class LinearProbe(Probe):
    """Multinomial logistic regression on standardised features, solved to convergence (solve.py), with C chosen
    on a validation carve from Cs (refit=True: refit on all rows at that C). Fitted: classes_, C_, coef_ [K, D]
    and intercept_ [K] on the standardised features (mean_, scale_), fit_record_ (validation top-1 per C,
    convergence)."""

    def __init__(self, Cs=C_GRID, val_frac: float = 0.1, seed: int = 0, tol: float = 0.01, max_iter: int = 1000,
                 refit: bool = False, pool: int | None = None, device: str | None = None,
                 memory_gb: float = DEFAULT_BUDGET / 2**30):
        self.Cs, self.val_frac, self.seed, self.tol, self.max_iter = Cs, val_frac, seed, tol, max_iter
        self.refit, self.pool, self.device, self.memory_gb = refit, pool, device, memory_gb

    def _recipe(self) -> ProbeRecipe:
        return ProbeRecipe(Cs=tuple(float(c) for c in np.atleast_1d(self.Cs)), tol=self.tol, max_iter=self.max_iter,
                           refit=self.refit, val_frac=self.val_frac, seed=self.seed)

    def fit(self, X, y) -> "LinearProbe":
        rows, y = self._fit_rows(X, y)
        record = solve_many([rows], None, [self.pool], y, None, len(self.classes_), self._recipe(), self.device,
                            self._budget(), show_progress=False)[0]
        self._set_weights(record.pop("fitted"))
        self.C_, self.fit_record_ = record["C"], record
        return self

    def _set_weights(self, weights: dict[str, np.ndarray]) -> None:
        self.weights_ = {name: np.asarray(v, np.float32) for name, v in weights.items()}
        self.mean_, self.scale_ = self.weights_["mean"], self.weights_["std"]
        self.coef_, self.intercept_ = self.weights_["coef"].T, self.weights_["bias"]

    def decision_function(self, X) -> np.ndarray:
        """Logits [N, K]."""
        rows, dev = self._rows(X), self._device()
        head = {name: torch.from_numpy(v)[None].to(dev) for name, v in self.weights_.items()}
        return torch.cat([z[0] for z, _ in linear_logits([rows], head, self.pool, dev, self._budget())]).cpu().numpy()

    def predict_proba(self, X) -> np.ndarray:
        return torch.from_numpy(self.decision_function(X)).softmax(1).numpy()


class KNNProbe(Probe):
    """DINO's weighted kNN (knn.py): k chosen on a validation carve from ks, votes exp(sim / temperature); the
    bank is the fit rows (refit=True: every row). Fitted: classes_, k_, fit_record_; the bank is kept as rows of
    X (a store array is read again at predict time, not copied)."""

    def __init__(self, ks=KNN_KS, temperature: float = KNN_TEMPERATURE, val_frac: float = 0.1, seed: int = 0,
                 refit: bool = False, pool: int | None = None, device: str | None = None,
                 memory_gb: float = DEFAULT_BUDGET / 2**30):
        self.ks, self.temperature, self.val_frac, self.seed = ks, temperature, val_frac, seed
        self.refit, self.pool, self.device, self.memory_gb = refit, pool, device, memory_gb

    def _recipe(self) -> ProbeRecipe:
        # the paper recipe only because it allows val_frac 0 (one k needs no validation rows): kNN trains nothing
        return ProbeRecipe("paper", ks=tuple(int(k) for k in np.atleast_1d(self.ks)), temperature=self.temperature,
                           refit=self.refit, val_frac=self.val_frac, seed=self.seed)

    def fit(self, X, y) -> "KNNProbe":
        rows, y = self._fit_rows(X, y)
        record = choose_k(rows, y, self._recipe(), self.pool, len(self.classes_), self._device(), self._budget())
        bank = (np.arange(len(y)) if self.refit or not record["n_val"]
                else split_val(len(y), self.val_frac, self.seed)[0])
        self._set_bank(rows, y, bank, record["k"])
        self.fit_record_ = record
        return self

    def _set_bank(self, rows: Rows, labels: np.ndarray, positions: np.ndarray, k: int) -> None:
        self.bank_, self.bank_labels_, self.bank_positions_, self.k_ = rows, labels, positions, int(k)

    def predict_proba(self, X) -> np.ndarray:
        """The normalised votes [N, K] (as scikit-learn's KNeighborsClassifier with weights exp(sim / T))."""
        rows = self._rows(X)
        v = knn_votes(self.bank_, self.bank_labels_, self.bank_positions_, rows, self.k_, self.temperature, self.pool,
                      len(self.classes_), self._device(), self._budget())
        return (v / v.sum(1, keepdim=True)).cpu().numpy()


class HeadProbe(Probe):
    """An iterative head of the probe stage (heads.py) trained by train.py: kind mlp, cnn or attention (or linear
    under the paper recipe; the converged linear probe is LinearProbe). recipe "converged": AdamW for `steps`,
    lr x weight decay picked on validation, early stopping; "paper": Adam, epochs, StepLR. Fitted: classes_,
    module_ (the torch head, its input standardisation included), fit_record_."""

    def __init__(self, kind: str = "mlp", pool: int | None = None, batchnorm: bool = False, hidden=(512,),
                 channels=(64, 64), dim: int = 128, depth: int = 1, n_heads: int = 4, recipe: str = "converged",
                 steps: int = 3000, lrs=(1e-3, 3e-3, 1e-2), weight_decays=(0.0, 0.05, 0.5), epochs: int = 28,
                 lr: float = 1e-3, weight_decay: float = 0.0, batch_size: int = 128, val_frac: float = 0.1,
                 seed: int = 0, device: str | None = None, memory_gb: float = DEFAULT_BUDGET / 2**30):
        self.kind, self.pool, self.batchnorm, self.hidden, self.channels = kind, pool, batchnorm, hidden, channels
        self.dim, self.depth, self.n_heads, self.recipe, self.steps = dim, depth, n_heads, recipe, steps
        self.lrs, self.weight_decays, self.epochs, self.lr = lrs, weight_decays, epochs, lr
        self.weight_decay, self.batch_size, self.val_frac, self.seed = weight_decay, batch_size, val_frac, seed
        self.device, self.memory_gb = device, memory_gb

    def spec(self) -> HeadSpec:
        spec = HeadSpec(self.kind, self.pool, self.batchnorm, tuple(self.hidden), tuple(self.channels), self.dim,
                        self.depth, self.n_heads)
        if spec.kind in (KNN, FUSION) or (spec.kind == "linear" and self.recipe == "converged"):
            use = {KNN: "KNNProbe", FUSION: "`diffstore probe --head fusion --fuse ...`"}.get(spec.kind, "LinearProbe")
            raise DiffstoreError(f"HeadProbe trains mlp, cnn and attention heads (linear under recipe='paper'); "
                                 f"for kind={spec.kind!r} with recipe={self.recipe!r} use {use}")
        return spec

    def _recipe(self) -> ProbeRecipe:
        return ProbeRecipe(self.recipe, self.epochs, self.lr, self.weight_decay, steps=self.steps,
                           min_steps=min(self.steps, ProbeRecipe.min_steps), lrs=tuple(self.lrs),
                           weight_decays=tuple(self.weight_decays), batch_size=self.batch_size,
                           val_frac=self.val_frac, seed=self.seed)

    def fit(self, X, y) -> "HeadProbe":
        spec, recipe = self.spec(), self._recipe()
        rows, y = self._fit_rows(X, y)
        record = train_many([Job(rows, None, spec)], y, None, len(self.classes_), recipe, self.device, self._budget(),
                            show_progress=False)[0]
        self._set_module(record.pop("fitted"))
        self.fit_record_ = record
        return self

    def _set_module(self, module: torch.nn.Module) -> None:
        module.source_index = 0  # train.head_logits reads each head's source in a Feed of several
        self.module_ = module.eval()

    def predict_proba(self, X) -> np.ndarray:
        rows, dev = self._rows(X), self._device()
        self.module_.to(dev)
        feed = Feed([rows], np.zeros(rows.n_rows, np.int64), np.arange(rows.n_rows), EVAL_ROWS, dev, self._budget())
        return torch.cat([z[0].softmax(1) for z, _ in head_logits([self.module_], feed)]).cpu().numpy()
