"""Test accuracies and their uncertainty: bootstrap over test samples, paired where two results share them.

Three metrics (`--metric`): top-1, top-5 (the label among the 5 highest scores; none with 5 classes or fewer) and
mean-per-class accuracy (the mean over classes of each class's recall: the convention for fine-grained and
unbalanced datasets). Every result stores its per-sample top-1 and top-5 hits (packed bits), so any two results on
the same test split can be compared after the fact: the paired bootstrap resamples test samples once and takes
both results' accuracy on the same draw, so the interval of the difference is much narrower than the two
accuracies' intervals suggest. Mean-per-class is bootstrapped stratified (within each class, class sizes fixed).
Draws are seeded: the same hits give the same interval.
"""

from __future__ import annotations

import base64

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


def pack(hits: np.ndarray) -> str:
    """Hit vector (bool per test sample, in split order) -> base64 of its packed bits (JSON-friendly)."""
    return base64.b64encode(np.packbits(np.asarray(hits, bool)).tobytes()).decode()


def unpack(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8))[:n].astype(bool)


def mean_per_class(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean-per-class accuracy of hits x: the mean over the classes present of each class's share of hits."""
    x, labels = np.asarray(x, np.float64), np.asarray(labels)
    return float(np.mean([x[labels == c].mean() for c in np.unique(labels)]))


def class_resampled(x: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """N_BOOT draws of the mean per class of x under a stratified bootstrap (each class's samples resampled within
    the class, so class sizes stay those of the test split). Resampling n values among a class's distinct values
    is one multinomial draw of their counts, so this is exact and needs no [draws, n] index matrix."""
    rng, classes = np.random.default_rng([seed, len(x), 1]), np.unique(labels)
    total = np.zeros(N_BOOT)
    for c in classes:
        values, counts = np.unique(x[labels == c], return_counts=True)
        total += rng.multinomial(counts.sum(), counts / counts.sum(), N_BOOT) @ values / counts.sum()
    return total / len(classes)


def bootstrap_interval(x: np.ndarray, seed: int = 0, labels: np.ndarray | None = None) -> list[float]:
    """95% percentile-bootstrap interval of the mean of x (N_BOOT seeded resamples of its samples, drawn in
    chunks so a 60k-sample test split stays small in memory), or with `labels` of its mean per class
    (stratified: class_resampled)."""
    x = np.asarray(x, np.float64)
    if labels is not None:
        stats = class_resampled(x, np.asarray(labels), seed)
    else:
        rng, means = np.random.default_rng([seed, len(x)]), []
        for start in range(0, N_BOOT, 100):
            means.append(x[rng.integers(0, len(x), (min(100, N_BOOT - start), len(x)))].mean(1))
        stats = np.concatenate(means)
    lo, hi = np.quantile(stats, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return [float(lo), float(hi)]


def difference(a: np.ndarray, b: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """Accuracy of a minus accuracy of b on the same test samples (mean-per-class with `labels`), with its
    paired-bootstrap 95% interval. Both metrics are linear in the hits, so the difference is that of a - b."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same test samples: {len(a)} vs {len(b)} hits")
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    value = float(d.mean()) if labels is None else mean_per_class(d, labels)
    return {"diff": value, "ci95": bootstrap_interval(d, labels=labels)}


def hits_record(hits: np.ndarray, hits5: np.ndarray, n_classes: int) -> dict:
    """A fitter's test output: top-1 and top-5 (None with 5 classes or fewer) and the hit vectors."""
    top5 = n_classes > 5
    return {"top1": float(np.mean(hits)), "top5": float(np.mean(hits5)) if top5 else None, "n_test": len(hits),
            "hits": hits, "hits5": hits5 if top5 else None}


def validation_record(hits: np.ndarray, hits5: np.ndarray, labels: np.ndarray, n_classes: int) -> dict:
    """The validation metrics of a fitter's chosen hyperparameters (which `--metric` selects keys on)."""
    return {"val_top1": float(np.mean(hits)), "val_top5": float(np.mean(hits5)) if n_classes > 5 else None,
            "val_mean_per_class": mean_per_class(hits, labels)}


def accuracy_record(hits: np.ndarray, hits5: np.ndarray | None, labels: np.ndarray) -> dict:
    """What every probe result records about its test predictions: top-1 (ci95 is its interval, as in earlier
    releases), top-5 and mean-per-class accuracy, each with its 95% bootstrap interval, and the packed hits."""
    out = {"top1": float(np.mean(hits)), "ci95": bootstrap_interval(hits), "test_hits": pack(hits),
           "mean_per_class": mean_per_class(hits, labels),
           "mean_per_class_ci95": bootstrap_interval(hits, labels=labels)}
    if hits5 is not None:
        out.update(top5=float(np.mean(hits5)), top5_ci95=bootstrap_interval(hits5), test_hits5=pack(hits5))
    return out


def result_hits(r: dict, metric: str = "top1") -> np.ndarray | None:
    """A result's per-sample test hits for a metric (top-5's for top5, top-1's otherwise); None when it stored
    none (results of older releases)."""
    field = "test_hits5" if metric == "top5" else "test_hits"
    return unpack(r[field], r["n_test"]) if field in r else None


def seeds_summary(values: list[float]) -> dict:
    """mean +- std (ddof 1) over seeds."""
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n_seeds": len(v)}
