"""Your own head on stored features, from Python: a scikit-learn logistic regression per block.

The store already holds the U-Net's activations, so any classifier is a few lines over `ds.open`: read the
train and test arrays of a key, fit, score. This one standardises the features, fits a multinomial logistic
regression (L2 strength C chosen on a validation split carved from train), and reports test top-1 with a
95% bootstrap interval over the test images, for every block at one (t, pool).

    python pipelines/own_head.py [--store data/default.zarr] [--t 50] [--pool 2] [--model digits-ddpm]
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import diffstore as ds


def fit_head(x: np.ndarray, y: np.ndarray, seed: int = 0):
    """C from {0.01, 0.1, 1, 10} by validation accuracy (20% of train), then refit on all of train."""
    x_fit, x_val, y_fit, y_val = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)

    def head(c: float):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))

    best = max((0.01, 0.1, 1.0, 10.0), key=lambda c: head(c).fit(x_fit, y_fit).score(x_val, y_val))
    return head(best).fit(x, y), best


def bootstrap_interval(correct: np.ndarray, seed: int = 0, draws: int = 2000) -> tuple[float, float]:
    """95% interval of the mean of `correct` (0/1 per test image), resampling test images."""
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, len(correct), size=(draws, len(correct)))].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="data/default.zarr", help="store path or URL")
    ap.add_argument("--t", type=int, default=50, help="time step")
    ap.add_argument("--pool", default="2", help="pool size p")
    ap.add_argument("--model", default=None, help="model name in the store (needed when it holds several)")
    args = ap.parse_args()

    store = ds.open(args.store)
    keys = store.keys(t=args.t, pool=args.pool, split="train", model=args.model)
    if not keys:
        raise SystemExit(f"no train arrays at t={args.t}, pool={args.pool} in {args.store}: see `diffstore ls`")
    print(f"{'block':22s} {'C':>5s} {'test top-1':>10s}  95% interval")
    for key in keys:
        train = store.features(key)
        test = store.features(dataclasses.replace(key, split="test"))
        x_train, x_test = train.numpy().reshape(train.shape[0], -1), test.numpy().reshape(test.shape[0], -1)
        head, c = fit_head(x_train.astype(np.float32), train.labels)
        correct = (head.predict(x_test.astype(np.float32)) == test.labels).astype(float)
        lo, hi = bootstrap_interval(correct)
        name = f"b{key.block} {train.block_name}"
        print(f"{name:22s} {c:5g} {correct.mean():10.3f}  [{lo:.3f}, {hi:.3f}]")


if __name__ == "__main__":
    main()
