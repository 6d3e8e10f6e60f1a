"""Uncertainty of test accuracies: bootstrap over test samples, paired where two results share the test samples.

Every result stores its per-sample top-1 hits (packed bits), so any two results on the same test split can be
compared after the fact: the paired bootstrap resamples test samples once and takes both results' accuracy on
the same draw, so the interval of the difference is much narrower than the two accuracies' intervals suggest.
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


def bootstrap_interval(x: np.ndarray, seed: int = 0) -> list[float]:
    """95% percentile-bootstrap interval of the mean of x (N_BOOT seeded resamples of its samples, drawn in
    chunks so a 60k-sample test split stays small in memory)."""
    x = np.asarray(x, np.float64)
    rng, means = np.random.default_rng([seed, len(x)]), []
    for start in range(0, N_BOOT, 100):
        means.append(x[rng.integers(0, len(x), (min(100, N_BOOT - start), len(x)))].mean(1))
    lo, hi = np.quantile(np.concatenate(means), [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return [float(lo), float(hi)]


def difference(a: np.ndarray, b: np.ndarray) -> dict:
    """Accuracy of a minus accuracy of b on the same test samples, with its paired-bootstrap 95% interval."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same test samples: {len(a)} vs {len(b)} hits")
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return {"diff": float(d.mean()), "ci95": bootstrap_interval(d)}


def mean_per_class(hits: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """Mean-per-class accuracy (the mean of per-class recalls over the classes present in `labels`: the convention
    for fine-grained data) with its 95% stratified-bootstrap interval: each draw resamples every class's test
    samples within that class, so each class keeps its size. `hits` may be a difference of two results' hits on
    the same samples (a - b): the value is then the difference of their mean-per-class, the interval paired."""
    x, labels = np.asarray(hits, np.float64), np.asarray(labels)
    if x.shape != labels.shape or not len(x):
        raise ValueError(f"mean_per_class needs one label per hit: {x.shape} hits vs {labels.shape} labels")
    rng, draws = np.random.default_rng([seed, len(x)]), np.zeros(N_BOOT)
    classes = np.unique(labels)
    for c in classes:  # per class: N_BOOT resampled recalls (in chunks, as bootstrap_interval), summed over classes
        xc = x[labels == c]
        for start in range(0, N_BOOT, 100):
            draws[start:start + 100] += xc[rng.integers(0, len(xc), (min(100, N_BOOT - start), len(xc)))].mean(1)
    lo, hi = np.quantile(draws / len(classes), [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    value = float(np.mean([x[labels == c].mean() for c in classes]))
    return {"value": value, "ci95": [float(lo), float(hi)]}


def result_hits(r: dict) -> np.ndarray:
    return unpack(r["test_hits"], r["n_test"])


def seeds_summary(values: list[float]) -> dict:
    """mean +- std (ddof 1) over seeds."""
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n_seeds": len(v)}
