"""Train the truncated network and its head end to end with the converged recipe's machinery (probe/train.py).

Every grid point (lr, weight decay) starts from the same initial state (the key's weights or the seeded random
init, and one head init) and trains by probe.train.fit_steps: AdamW for the step budget, early stopping on the
validation carve of train, the convergence test. Grid points run one after another rather than side by side as
the probe's heads do: each holds a whole network, and one at a time keeps memory at two copies (the running one
and the best state). The grid point with the best validation top-1 (ties: lower validation loss) is evaluated on
every test row, in order.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from ..probe.feed import DEFAULT_BUDGET, Feed, Rows, split_val
from ..probe.heads import n_params
from ..probe.recipe import ProbeRecipe
from ..probe.train import evaluate, fit_steps, snapshot
from ..progress import progress

EVAL_BATCH = 1024  # rows per evaluation batch: a multiple of every micro-batch, so test rows keep the store's partition


def train_grid(net: nn.Module, train: Rows, test: Rows, y_train: np.ndarray, y_test: np.ndarray, n_classes: int,
               recipe: ProbeRecipe, device: torch.device, budget: int = DEFAULT_BUDGET,
               show_progress: bool = True) -> dict:
    """Metrics of the best grid point, with the fields train.train_many reports for a probe head."""
    train_pos, val_pos = split_val(len(y_train), recipe.val_frac, recipe.seed)
    feed = Feed([train], y_train, train_pos, recipe.batch_size, device, budget)
    val_feed = Feed([train], y_train, val_pos, EVAL_BATCH, device, budget)
    grid = [(lr, wd) for lr in recipe.lrs for wd in recipe.weight_decays]
    initial, best, per_point = snapshot(net), None, {}
    net.source_index = 0  # fit_steps feeds each head its source's rows: here the only one
    start = time.perf_counter()
    with progress("step", disable=not show_progress) as bar:
        for lr, wd in grid:
            net.load_state_dict(initial)
            fit = fit_steps([net], [(lr, wd)], feed, val_feed, recipe, n_classes, bar)[0]
            val = evaluate([net], val_feed, n_classes)[0]  # the state fit_steps kept: its best on validation
            per_point["lr={:g},wd={:g}".format(lr, wd)] = float(val["top1"])
            if best is None or (val["top1"], -val["loss"]) > (best[0]["top1"], -best[0]["loss"]):
                best = (val, lr, wd, fit, snapshot(net))
    train_time = time.perf_counter() - start
    del feed
    val, lr, wd, fit, state = best
    net.load_state_dict(state)
    test = evaluate([net], Feed([test], y_test, np.arange(len(y_test)), EVAL_BATCH, device, budget), n_classes)[0]
    return {"params": n_params(net), "top1": float(test["top1"]), "top5": test["top5"] and float(test["top5"]),
            "n_test": test["n"], "hits": test["hits"], "val_top1": float(val["top1"]), "n_train": len(train_pos),
            "n_val": len(val_pos), "lr": lr, "weight_decay": wd, "val_top1_per_lr_wd": per_point, **fit,
            "train_time_s": train_time, "device": str(device)}
