"""--select: rank keys by a closed-form ridge proxy on the validation split, without training any head.

The ranking is compared (Spearman's rho) with the stored linear probes of the same arrays, when there are some.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..device import pick_device
from ..errors import DiffstoreError
from ..progress import progress, working_on
from ..store import Store
from .feed import DEFAULT_BUDGET, Feed, Rows, first_labels, split_val
from .recipe import ProbeRecipe

PROXY_DIM = 1024  # the proxy fits on maps pooled down to at most this many values per row (at least 1x1)
PROXY_FIT = 4000  # training rows it fits on (a seeded subsample of the train part)


def ridge_top1(xf: torch.Tensor, yf: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor, n_classes: int,
               lambdas=(1e-3, 1e-2, 1e-1, 1.0)) -> float:
    """Validation top-1 of ridge regression onto centred one-hot labels, best over a few penalties (relative
    to the mean eigenvalue, so one grid fits every feature scale). One eigendecomposition serves all of them."""
    mean, std = xf.mean(0), xf.std(0).clamp_min(1e-6)
    xf, xv = (xf - mean) / std, (xv - mean) / std
    evals, vecs = torch.linalg.eigh(xf.T @ xf)
    proj = vecs.T @ (xf.T @ (F.one_hot(yf, n_classes).double() - 1 / n_classes))
    scores = [(xv @ (vecs @ (proj / (evals + lam * evals.mean().clamp_min(1e-12))[:, None]))).argmax(1) == yv
              for lam in lambdas]
    return max(float(s.double().mean()) for s in scores)


def proxy_scores(sources: list[Rows], y_train: np.ndarray, n_classes: int, recipe: ProbeRecipe,
                 device: str | None = None, budget: int = DEFAULT_BUDGET, show_progress: bool = True) -> list[float]:
    """The ridge proxy's validation top-1 for each source (train rows only: the val split is carved from train)."""
    train_pos, val_pos = split_val(len(y_train), recipe.val_frac, recipe.seed, recipe.views)
    if not len(val_pos):
        raise DiffstoreError("--select ranks keys on the validation split: pass --val-frac > 0")
    fit_pos = np.random.default_rng([recipe.seed, 11]).permutation(train_pos)[:PROXY_FIT]
    positions = np.sort(np.concatenate([fit_pos, val_pos]))
    is_val = torch.from_numpy(np.isin(positions, val_pos))
    dev, out = pick_device(device), []
    with progress("key", disable=not show_progress) as bar:
        task = bar.add_task("rank keys by the ridge proxy", total=len(sources))
        for r in sources:
            side = max([p for p in range(1, min(r.row_shape[1:]) + 1) if r.row_shape[0] * p * p <= PROXY_DIM] or [1])
            xs, ys = [], []
            for (x,), y in Feed([r], y_train, positions, 1024, dev, budget).batches():
                xs.append(F.adaptive_avg_pool2d(x, side).flatten(1).double().cpu())
                ys.append(y.cpu())
            x, y = torch.cat(xs), torch.cat(ys)
            out.append(ridge_top1(x[~is_val], y[~is_val], x[is_val], y[is_val], n_classes))
            bar.advance(task)
    return out


def linear_top1(stored: list[dict], source) -> float | None:
    """Test top-1 of a stored linear probe on exactly this array (any recipe; the latest stored), if any."""
    found = [r["top1"] for r in stored if r["kind"] == "store" and r["head"]["kind"] == "linear"
             and r["fingerprints"] == source.fingerprints]
    return found[-1] if found else None


def rank_keys(store: Store, sources: list, recipe: ProbeRecipe, device=None, budget=DEFAULT_BUDGET,
              show_progress=True) -> tuple[list[dict], dict]:
    """Proxy ranking per dataset (best first) and, where >= 3 keys have stored linear probes, Spearman's rho."""
    from scipy.stats import spearmanr

    ranking, rho, stored = [], {}, store.results("probe")
    for dataset in dict.fromkeys(s.row["dataset"] for s in sources):
        group = [s for s in sources if s.row["dataset"] == dataset]
        split = first_labels(store.split(dataset, "train"), recipe.limit)
        with working_on(f"{dataset}/train {', '.join(dict.fromkeys(s.row['model'] for s in group))}"):
            scores = proxy_scores([s.train for s in group], split.labels, len(split.class_names), recipe, device,
                                  budget, show_progress)
        rows = sorted(({**s.row, "proxy_val_top1": sc, "linear_top1": linear_top1(stored, s), "source": s}
                       for s, sc in zip(group, scores)), key=lambda r: -r["proxy_val_top1"])
        pairs = [(r["proxy_val_top1"], r["linear_top1"]) for r in rows if r["linear_top1"] is not None]
        if len(pairs) >= 3:
            rho[dataset] = {"spearman": float(spearmanr(*zip(*pairs)).statistic), "n_keys": len(pairs)}
        ranking += [{**r, "rank": i + 1} for i, r in enumerate(rows)]
    return ranking, rho
