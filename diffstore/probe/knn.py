"""The k-nearest-neighbour evaluation of frozen features (DINO's weighted kNN), the head kind `knn`.

    features  each row flattened (average-pooled to HeadSpec.pool first when asked) and L2-normalised, so the
              dot product of two rows is their cosine similarity
    vote      the k most similar bank rows vote for their labels with weight exp(sim / T), T = 0.07; the class
              with the largest sum wins, and the votes over their total are the class probabilities
    k         chosen on the validation carve among recipe.ks (10, 20, 100, 200, clipped to the fit rows; ties to
              the smaller k); the bank is the fit rows (train minus validation), all train rows with --refit
    memory    queries meet the bank BANK_ROWS rows at a time (one [QUERY_ROWS, BANK_ROWS] matmul per pair of
              blocks) and keep a running top-k each: never an N x N matrix. Bank and queries are held on the device
              when they fit the memory budget, else streamed from the store; CPU or GPU (torch)

Nothing is trained, so the recipe's name does not matter. A top-5 hit is a label that got votes and is outvoted
by fewer than 5 classes: with k small, fewer than 5 classes may get votes, and a class without any is no hit.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from ..device import pick_device
from ..errors import DiffstoreError
from ..progress import progress
from .feed import DEFAULT_BUDGET, Feed, Rows, split_val
from .intervals import hits_record, validation_record
from .solve import flat

BANK_ROWS = 4096
QUERY_ROWS = 1024


def normalised(x: torch.Tensor, pool: int | None) -> torch.Tensor:
    return F.normalize(flat(x, pool), dim=1)


@torch.no_grad()
def neighbours(bank: Rows, bank_labels: np.ndarray, bank_pos: np.ndarray, queries: Rows, query_pos: np.ndarray,
               k: int, pool: int | None, device: torch.device, budget: int = DEFAULT_BUDGET):
    """For every query row (query_pos, in order): the cosine similarities [nq, k] (descending) and labels [nq, k]
    of its k most similar bank rows (bank_pos)."""
    query_feed = Feed([queries], np.zeros(queries.n_rows, np.int64), query_pos, QUERY_ROWS, device, budget)
    best: list | None = None  # per query block: (similarities, labels) of the best k so far
    for (xb,), yb in Feed([bank], bank_labels, bank_pos, BANK_ROWS, device, budget).batches():
        b, merged = normalised(xb, pool), []
        for j, ((xq,), _) in enumerate(query_feed.batches()):
            sims, labels = normalised(xq, pool) @ b.T, yb.expand(len(xq), -1)
            if best is not None:
                sims, labels = torch.cat([best[j][0], sims], 1), torch.cat([best[j][1], labels], 1)
            top = sims.topk(min(k, sims.shape[1]), 1)
            merged.append((top.values, labels.gather(1, top.indices)))
        best = merged
    return torch.cat([s for s, _ in best]), torch.cat([lab for _, lab in best])


def votes(sims: torch.Tensor, labels: torch.Tensor, k: int, temperature: float, n_classes: int) -> torch.Tensor:
    """Class votes [nq, K] of the k nearest neighbours (the first k columns), each weighted exp(sim / T)."""
    out = torch.zeros(len(sims), n_classes, device=sims.device)
    return out.scatter_add_(1, labels[:, :k], (sims[:, :k] / temperature).exp())


def vote_hits(v: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 and top-5 hits (bool [n] each) of the votes v [n, K] for the labels y [n]."""
    own = v.gather(1, y[:, None])
    return v.argmax(1) == y, ((v > own).sum(1) < 5) & (own[:, 0] > 0)


def knn_votes(bank: Rows, bank_labels: np.ndarray, bank_pos: np.ndarray, queries: Rows, k: int, temperature: float,
              pool: int | None, n_classes: int, device: torch.device, budget: int = DEFAULT_BUDGET) -> torch.Tensor:
    """The votes [n, K] for every row of `queries`: what the stage scores and a fitted KNNProbe predicts with."""
    sims, labels = neighbours(bank, bank_labels, bank_pos, queries, np.arange(queries.n_rows), k, pool, device, budget)
    return votes(sims, labels, k, temperature, n_classes)


def choose_k(train: Rows, y_train: np.ndarray, recipe, pool: int | None, n_classes: int, device: torch.device,
             budget: int = DEFAULT_BUDGET) -> dict:
    """k with the best validation top-1 (ties: the smaller k), its validation metrics and the top-1 per k."""
    fit_pos, val_pos = split_val(len(y_train), recipe.val_frac, recipe.seed)
    ks = sorted({min(k, len(fit_pos)) for k in recipe.ks})
    if not len(val_pos):
        if len(ks) > 1:
            raise DiffstoreError(f"the knn head picks k on the validation split: pass --val-frac > 0 (or one k), got "
                                 f"ks {ks} and no validation rows")
        return {"k": ks[0], "val_top1": None, "n_val": 0}
    sims, labels = neighbours(train, y_train, fit_pos, train, val_pos, ks[-1], pool, device, budget)
    y = torch.from_numpy(y_train[val_pos]).to(device)
    hits = {k: vote_hits(votes(sims, labels, k, recipe.temperature, n_classes), y) for k in ks}
    top1 = {k: float(h[0].float().mean()) for k, h in hits.items()}
    k = max(ks, key=lambda k: (top1[k], -k))
    return {"k": k, "val_top1_per_k": {str(k): v for k, v in top1.items()}, "n_val": len(val_pos),
            **validation_record(*(h.cpu().numpy() for h in hits[k]), y_train[val_pos], n_classes)}


def knn_many(sources: list[Rows], tests: list[Rows] | None, pools: list[int | None], y_train: np.ndarray,
             y_test: np.ndarray | None, n_classes: int, recipe, device: str | None = None,
             budget: int = DEFAULT_BUDGET, show_progress: bool = True) -> list[dict]:
    """The kNN evaluation of every (train source, its test rows, head pool): k chosen on validation, then the test
    hits against the bank (fit rows, or every train row with recipe.refit). Metrics in input order, each with
    "fitted": the chosen k and which train rows are the bank."""
    dev, out = pick_device(device), []
    with progress("key", disable=not show_progress) as bar:
        task = bar.add_task(f"knn on {len(sources)} key(s)", total=len(sources))
        for i, (train, pool) in enumerate(zip(sources, pools)):
            start = time.perf_counter()
            m = choose_k(train, y_train, recipe, pool, n_classes, dev, budget)
            bank_pos = (np.arange(len(y_train)) if recipe.refit or not m["n_val"]
                        else split_val(len(y_train), recipe.val_frac, recipe.seed)[0])
            if tests is not None:
                v = knn_votes(train, y_train, bank_pos, tests[i], m["k"], recipe.temperature, pool, n_classes, dev,
                              budget)
                hits = vote_hits(v, torch.from_numpy(y_test).to(dev))
                m.update(hits_record(*(h.cpu().numpy() for h in hits), n_classes))
            out.append({**m, "temperature": recipe.temperature, "n_train": len(bank_pos), "params": 0,
                        "fitted": {"k": m["k"], "bank": "train" if len(bank_pos) == len(y_train) else "fit"},
                        "train_time_s": time.perf_counter() - start, "trained_with": 1, "device": str(dev)})
            bar.advance(task)
    return out
