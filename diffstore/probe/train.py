"""Train classification heads on cached features by gradient steps, many side by side, never running the U-Net.

Follow `diffstore probe`: stage.probe_command -> key_source (a key's train/test arrays, checked complete)
-> run_probes (stored results reused, the rest grouped per dataset) -> train_many here (one pass over the shared
sample order feeds every head: DDAE's per-key heads) -> feed.Feed (rows from RAM or streamed chunk-wise from the
store) -> heads.py. The converged linear probe does not come here: solve.py solves it.

Two recipes (recipe.py). paper: Adam, epochs, StepLR, exactly as the paper (and earlier diffstore releases).
converged: AdamW for a budget of optimizer steps whatever the dataset size; every (lr, weight decay) of the grid
is one more head in the same pass; validation top-1 is measured every eval_every steps, each head keeps its best
state and stops after `patience` evaluations without a better one (never before min_steps); per job the grid point
with the best validation top-1 is reported, with its final train loss and whether the budget sufficed (convergence():
otherwise the result says converged: false and the stage warns).

Data: features are stored float16 and cast to float32. Each head standardises its input per channel with the
mean/std of its own training rows (heads.Standardize), so one learning rate fits every block and t.
Splits: a seeded validation split (recipe.val_frac of train, never test); test accuracy counts every test row.
Reproducibility: a head's init is seeded by recipe.seed and the batch order by (seed, epoch), so a key gets the
same accuracy whether it trains alone or side by side with others, as long as both runs hold the rows in RAM
(streaming shuffles in another order) and up to GPU non-determinism.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..device import pick_device
from ..progress import progress
from .feed import DEFAULT_BUDGET, Feed, Rows, split_val
from .heads import HeadSpec, build_head, n_params, top_hits
from .intervals import hits_record, validation_record
from .recipe import ProbeRecipe

LATE = 0.2  # the last fifth of the evaluations: still improving there at the budget means not converged
EVAL_ROWS = 1024  # rows per forward when heads are evaluated (validation, test, a fitted estimator's predict)


@dataclass
class Job:
    """One head to train: its train/test rows, and how to word a refusal about them."""

    train: Rows
    test: Rows | None  # None: fit only (an estimator's fit)
    spec: HeadSpec
    what: str = "the input"
    fix: str = "Extract it with `--pools full` (or a larger p)."


@torch.no_grad()
def head_logits(heads: list, feed: Feed):
    """(logits of every head, labels) per batch the feed yields, in order, the heads in eval mode."""
    for h in heads:
        h.eval()
    for xs, y in feed.batches():
        yield [h(xs[h.source_index]) for h in heads], y


def evaluate(heads: list, feed: Feed, n_classes: int) -> list[dict]:
    """Per head over every row the feed yields, in order: top-1 and top-5 hit vectors, mean cross-entropy, and n,
    the number of rows actually evaluated."""
    hit1, hit5, loss = [[] for _ in heads], [[] for _ in heads], [0.0] * len(heads)
    for logits, y in head_logits(heads, feed):
        for i, z in enumerate(logits):
            h1, h5 = top_hits(z, y)
            hit1[i].append(h1.cpu())
            hit5[i].append(h5.cpu())
            loss[i] += float(F.cross_entropy(z, y, reduction="sum"))
    out = []
    for i in range(len(heads)):
        h1, h5 = torch.cat(hit1[i]).numpy(), torch.cat(hit5[i]).numpy()
        n = len(h1)
        out.append({"top1": h1.mean() if n else 0.0, "top5": h5.mean() if n and n_classes > 5 else None, "n": n,
                    "hits": h1, "hits5": h5, "loss": loss[i] / max(n, 1)})
    return out


def snapshot(head) -> dict:
    return {n: v.detach().clone() for n, v in head.state_dict().items()}


def fit_paper(heads, feed: Feed, val_feed, recipe: ProbeRecipe, n_classes: int, bar) -> list[dict]:
    """The paper's recipe: Adam, epochs, StepLR; with --early-stop the epoch of best validation top-1."""
    # One optimizer and one backward for all heads: their parameters are disjoint, so the summed loss gives each
    # head exactly its own gradient and Adam's per-parameter update is unchanged; Python overhead is paid once.
    opt = torch.optim.Adam([p for h in heads for p in h.parameters()], lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, recipe.step_every, recipe.gamma)
    best = [(-1.0, recipe.epochs, None)] * len(heads)  # (val top-1, epoch, state) per head
    history = [[] for _ in heads]  # val top-1 per epoch, with early stopping
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
                history[k].append(float(m["top1"]))
                if m["top1"] > best[k][0]:
                    best[k] = (m["top1"], epoch + 1, snapshot(heads[k]))
        bar.advance(task)
    for h, (_, _, state) in zip(heads, best):
        if state is not None:
            h.load_state_dict(state)
    return [{"epochs_used": b[1], "val_history": hist} for b, hist in zip(best, history)]


def fit_steps(heads, grid: list[tuple], feed: Feed, val_feed: Feed, recipe: ProbeRecipe, n_classes: int,
              bar) -> list[dict]:
    """The converged recipe: AdamW, a step budget, every head its own (lr, weight decay), early stopping on
    validation top-1 (ties: lower validation loss); each head ends holding its best state."""
    opt = torch.optim.AdamW([{"params": list(h.parameters()), "lr": lr, "weight_decay": wd}
                             for h, (lr, wd) in zip(heads, grid)])
    best = [(-1.0, float("inf"), 0, None)] * len(heads)  # (val top-1, val loss, step, state)
    evals = [[] for _ in heads]  # (step, val loss, val top-1, mean train loss since the last evaluation)
    active, running = [True] * len(heads), [[] for _ in heads]
    step, epoch = 0, 0
    task = bar.add_task(f"train {len(heads)} head(s)", total=recipe.steps)
    while step < recipe.steps and any(active):
        for xs, y in feed.batches(np.random.default_rng([recipe.seed, epoch])):
            if len(y) < 2:  # BatchNorm cannot train on one row
                continue
            live = [k for k in range(len(heads)) if active[k]]
            for k in live:
                heads[k].train()
            losses = [F.cross_entropy(heads[k](xs[heads[k].source_index]), y) for k in live]
            opt.zero_grad(set_to_none=True)  # stopped heads get no gradient, so AdamW leaves them alone
            sum(losses).backward()
            opt.step()
            for k, v in zip(live, losses):
                running[k].append(float(v.detach()))
            step += 1
            bar.advance(task)
            if step % recipe.eval_every == 0 or step == recipe.steps:
                for k, m in zip(live, evaluate([heads[k] for k in live], val_feed, n_classes)):
                    evals[k].append((step, m["loss"], float(m["top1"]), float(np.mean(running[k]))))
                    running[k] = []
                    if (m["top1"], -m["loss"]) > (best[k][0], -best[k][1]):
                        best[k] = (float(m["top1"]), m["loss"], step, snapshot(heads[k]))
                    stale = sum(1 for e in evals[k] if e[0] > best[k][2]) >= recipe.patience
                    active[k] = not (stale and step >= recipe.min_steps)
            if step >= recipe.steps or not any(active):
                break
        epoch += 1
    out = []
    for h, b, ev, still in zip(heads, best, evals, active):
        h.load_state_dict(b[3])
        out.append({"steps": ev[-1][0], "best_step": b[2], "early_stopped": not still, "final_train_loss": ev[-1][3],
                    **convergence(ev, b[2], still),
                    "val_history": [[e[0], round(e[1], 5), round(e[2], 5)] for e in ev]})
    return out


def convergence(evals: list[tuple], best_step: int, still_active: bool) -> dict:
    """Did the step budget suffice? evals: (step, val loss, val top-1, ...) per evaluation. A head that early-stopped
    did; one still training at the budget did not if, over the last fifth of its evaluations, its validation loss
    reached a new low or its best validation top-1 (the state it reports) was found."""
    late = evals[int(len(evals) * (1 - LATE)):] if len(evals) >= 5 else evals
    early_min = min((e[1] for e in evals[:len(evals) - len(late)]), default=float("inf"))
    falling = bool(still_active) and min(e[1] for e in late) < early_min
    rising = bool(still_active) and best_step >= late[0][0]
    return {"val_loss_falling_late": falling, "val_top1_best_late": rising, "converged": not (falling or rising)}


def train_many(jobs: list[Job], y_train: np.ndarray, y_test: np.ndarray, n_classes: int, recipe: ProbeRecipe,
               device: str | None = None, budget: int = DEFAULT_BUDGET, show_progress: bool = True) -> list[dict]:
    """Train every job's head(s) side by side over the shared sample order; metrics per job, with the chosen head
    ("fitted", an nn.Module). Jobs without test rows (y_test None) are fitted only."""
    dev = pick_device(device)
    train_pos, val_pos = split_val(len(y_train), recipe.val_frac, recipe.seed, recipe.views)
    sources, source_index = [], {}  # several heads on one array share its rows
    for j in jobs:
        source_index.setdefault(id(j.train), len(sources))
        if len(sources) < len(source_index):
            sources.append((j.train, j.test))
    feed = Feed([s[0] for s in sources], y_train, train_pos, recipe.batch_size, dev, budget)
    stats = feed.channel_stats()
    paper = recipe.name == "paper"
    grid = ([(recipe.lr, recipe.weight_decay)] if paper
            else [(lr, wd) for lr in recipe.lrs for wd in recipe.weight_decays])
    heads, owner = [], []  # one head per (job, grid point)
    for j_index, j in enumerate(jobs):
        for _ in grid:
            torch.manual_seed(recipe.seed)
            h = build_head(j.spec, j.train.row_shape, n_classes, *stats[source_index[id(j.train)]], what=j.what,
                           fix=j.fix).to(dev)
            h.source_index = source_index[id(j.train)]
            heads.append(h)
            owner.append(j_index)
    val_feed = Feed([s[0] for s in sources], y_train, val_pos, EVAL_ROWS, dev, budget) if len(val_pos) else None
    start = time.perf_counter()
    with progress("epoch" if paper else "step", disable=not show_progress) as bar:
        fits = (fit_paper(heads, feed, val_feed, recipe, n_classes, bar) if paper
                else fit_steps(heads, grid * len(jobs), feed, val_feed, recipe, n_classes, bar))
    train_time = time.perf_counter() - start
    del feed  # the train rows leave RAM before the test rows come in
    val = evaluate(heads, val_feed, n_classes) if val_feed else [{"top1": None, "loss": None}] * len(heads)
    chosen = []  # per job: the grid point with the best validation top-1 (ties: lower validation loss)
    for j_index in range(len(jobs)):
        mine = [k for k in range(len(heads)) if owner[k] == j_index]
        chosen.append(mine[0] if paper else max(mine, key=lambda k: (val[k]["top1"], -val[k]["loss"])))
    test = None if y_test is None else evaluate([heads[k] for k in chosen], Feed(
        [s[1] for s in sources], y_test, np.arange(len(y_test)), EVAL_ROWS, dev, budget), n_classes)
    out = []
    for j_index, k in enumerate(chosen):
        lr, wd = grid[k % len(grid)]
        out.append({"params": n_params(heads[k]), "val_top1": None,
                    **(validation_record(val[k]["hits"], val[k]["hits5"], y_train[val_pos], n_classes)
                       if val_feed else {}),
                    **({} if test is None else hits_record(test[j_index]["hits"], test[j_index]["hits5"], n_classes)),
                    "n_train": len(train_pos), "n_val": len(val_pos), "lr": lr, "weight_decay": wd,
                    **({} if paper else {"val_top1_per_lr_wd": {
                        "lr={:g},wd={:g}".format(*grid[i % len(grid)]): float(val[i]["top1"])
                        for i in range(len(heads)) if owner[i] == owner[k]}}),
                    **fits[k],
                    # side-by-side heads share one wall clock: each job is charged an equal part
                    "train_time_s": train_time / len(jobs), "trained_with": len(jobs), "device": str(dev),
                    "fitted": heads[k]})
    return out


def train_probe(x_train, y_train, x_test, y_test, spec: HeadSpec = HeadSpec(), recipe: ProbeRecipe = ProbeRecipe(),
                n_classes: int | None = None, **kw) -> dict:
    """One head on plain arrays (numpy, or store ShardedArrays): the smallest entry point. A linear head under
    the converged recipe is solved (solve.py), any other head trained here."""
    n_classes = n_classes or int(max(y_train.max(), y_test.max())) + 1
    if spec.kind == "linear" and recipe.name == "converged":
        from .solve import solve_many

        return solve_many([Rows.of(x_train)], [Rows.of(x_test)], [spec.pool], y_train, y_test, n_classes, recipe,
                          **kw)[0]
    return train_many([Job(Rows.of(x_train), Rows.of(x_test), spec)], y_train, y_test, n_classes, recipe, **kw)[0]
