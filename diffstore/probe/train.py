"""Train classification heads on cached features: the paper's probes, never running the U-Net.

Follow `diffstore probe`: stage.probe_command -> key_source (a key's train/test arrays, checked complete)
-> run_probes (stored results reused, the rest grouped per dataset) -> train_many here (one pass per epoch over
the shared sample order feeds every head: DDAE's per-key linear heads) -> feed.Feed (rows from RAM or streamed
chunk-wise from the store) -> heads.py.

Data: features are stored float16 and cast to float32. Each head standardises its input per channel with the
mean/std of its own training rows (heads.Standardize), so one learning rate fits every block and t.
Splits: a seeded validation split (recipe.val_frac of train, never test) serves --select, early stopping and
the reported val accuracy; test accuracy is over every test sample (no dropped last batch).
Reproducibility: a head's init is seeded by recipe.seed and the batch order by (seed, epoch), so a key gets the
same accuracy whether it trains alone or side by side with others, as long as both runs hold the rows in RAM
(streaming shuffles in another order) and up to GPU non-determinism.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DiffstoreError
from ..extract import pick_device
from ..progress import progress
from .feed import DEFAULT_BUDGET, Feed, Rows, split_val
from .heads import HeadSpec, build_head, n_params


@dataclass(frozen=True)
class ProbeRecipe:
    """The paper's linear-probe recipe (Adam, 28 epochs, StepLR x0.1 every 8), all of it configurable."""

    epochs: int = 28
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    step_every: int = 8
    gamma: float = 0.1
    val_frac: float = 0.1
    early_stop: bool = False  # keep the weights of the epoch with the best validation top-1
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.step_every < 1:
            raise DiffstoreError("--epochs, --batch-size and --step-every must be >= 1")
        if not 0 <= self.val_frac < 1:
            raise DiffstoreError(f"--val-frac must be in [0, 1), got {self.val_frac}")
        if self.early_stop and self.val_frac == 0:
            raise DiffstoreError("--early-stop selects on the validation split: pass --val-frac > 0")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Job:
    """One head to train: its train/test rows, and how to word a refusal about them."""

    train: Rows
    test: Rows
    spec: HeadSpec
    what: str = "the input"
    fix: str = "Extract it with `--pools full` (or a larger p)."


@torch.no_grad()
def evaluate(heads: list, feed: Feed, n_classes: int) -> list[dict]:
    """top-1 (and top-5 when there are more than 5 classes) of each head over every row of the feed."""
    for h in heads:
        h.eval()
    hit1, hit5 = [0] * len(heads), [0] * len(heads)
    for xs, y in feed.batches():
        for i, h in enumerate(heads):
            top = h(xs[h.source_index]).topk(min(5, n_classes), 1).indices
            hit1[i] += int((top[:, 0] == y).sum())
            hit5[i] += int((top == y[:, None]).any(1).sum())
    n = max(len(feed), 1)
    return [{"top1": hit1[i] / n, "top5": hit5[i] / n if n_classes > 5 else None, "n": len(feed)} for i in range(len(heads))]


def train_many(jobs: list[Job], y_train: np.ndarray, y_test: np.ndarray, n_classes: int, recipe: ProbeRecipe,
               device: str | None = None, budget: int = DEFAULT_BUDGET, show_progress: bool = True) -> list[dict]:
    """Train every job's head with one pass per epoch over the shared sample order; metrics per job."""
    dev = pick_device(device)
    train_pos, val_pos = split_val(len(y_train), recipe.val_frac, recipe.seed)
    sources, source_index = [], {}  # several heads on one array share its rows
    for j in jobs:
        source_index.setdefault(id(j.train), len(sources))
        if len(sources) < len(source_index):
            sources.append((j.train, j.test))
    feed = Feed([s[0] for s in sources], y_train, train_pos, recipe.batch_size, dev, budget)
    stats = feed.channel_stats()
    heads = []
    for j in jobs:
        i = source_index[id(j.train)]
        torch.manual_seed(recipe.seed)
        h = build_head(j.spec, j.train.row_shape, n_classes, *stats[i], what=j.what, fix=j.fix).to(dev)
        h.source_index = i
        heads.append(h)
    # One optimizer and one backward for all heads: their parameters are disjoint, so the summed loss gives each
    # head exactly its own gradient and Adam's per-parameter update is unchanged; Python overhead is paid once.
    opt = torch.optim.Adam([p for h in heads for p in h.parameters()], lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, recipe.step_every, recipe.gamma)
    val_feed = Feed([s[0] for s in sources], y_train, val_pos, 1024, dev, budget) if len(val_pos) else None
    best = [(-1.0, recipe.epochs, None)] * len(heads)  # (val top-1, epoch, state) per head
    history = [[] for _ in heads]  # val top-1 per epoch, with early stopping
    start = time.perf_counter()
    with progress("epoch", disable=not show_progress) as bar:
        task = bar.add_task(f"train {len(heads)} head(s)", total=recipe.epochs)
        for epoch in range(recipe.epochs):
            for h in heads:
                h.train()
            for xs, y in feed.batches(np.random.default_rng([recipe.seed, epoch])):
                if len(y) < 2:  # BatchNorm cannot train on one row
                    continue
                loss = sum(F.cross_entropy(h(xs[h.source_index]), y) for h in heads)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
            if recipe.early_stop:
                for k, m in enumerate(evaluate(heads, val_feed, n_classes)):
                    history[k].append(m["top1"])
                    if m["top1"] > best[k][0]:
                        best[k] = (m["top1"], epoch + 1, {n: v.clone() for n, v in heads[k].state_dict().items()})
            bar.advance(task)
    train_time = time.perf_counter() - start
    del feed  # the train rows leave RAM before the test rows come in
    for h, (_, _, state) in zip(heads, best):
        if state is not None:
            h.load_state_dict(state)
    test = evaluate(heads, Feed([s[1] for s in sources], y_test, np.arange(len(y_test)), 1024, dev, budget), n_classes)
    val = evaluate(heads, val_feed, n_classes) if val_feed else [{"top1": None}] * len(heads)
    return [{"params": n_params(h), "top1": te["top1"], "top5": te["top5"], "n_test": te["n"], "val_top1": va["top1"],
             "n_train": len(train_pos), "n_val": len(val_pos), "epochs_used": b[1], "val_history": hist,
             # side-by-side heads share one wall clock: each is charged an equal part
             "train_time_s": train_time / len(heads), "trained_with": len(heads), "device": str(dev)}
            for h, te, va, b, hist in zip(heads, test, val, best, history)]


def train_probe(x_train, y_train, x_test, y_test, spec: HeadSpec = HeadSpec(), recipe: ProbeRecipe = ProbeRecipe(),
                n_classes: int | None = None, **kw) -> dict:
    """One head on plain arrays (numpy, or store ShardedArrays): the smallest entry point."""
    n_classes = n_classes or int(max(y_train.max(), y_test.max())) + 1
    return train_many([Job(Rows.of(x_train), Rows.of(x_test), spec)], y_train, y_test, n_classes, recipe, **kw)[0]
