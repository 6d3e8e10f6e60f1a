"""The default linear probe: multinomial logistic regression on standardised features, solved to convergence.

The protocol of most linear-evaluation studies of frozen features:
- each feature is z-scored with the mean/std of the fit rows (the train split minus a seeded validation carve);
- the objective is mean cross-entropy + lam/2 ||W||^2 (bias not penalised), with lam = 1 / (C * n_fit), so C means
  what it means in scikit-learn's LogisticRegression;
- it is solved by L-BFGS until the gradient's largest entry is below tol * lam, clamped to [1e-5, 1e-4] (the
  convergence test: a weak penalty has a flat optimum, where the predictions need a finer solve; float32 sums
  over the rows set the floor);
- C is chosen on the validation split from a log grid (recipe.C_GRID: 1e-4 .. 1e2, half a decade apart; best val
  top-1, ties to the smaller C: stronger regularisation), walking the grid from small to large C with warm starts;
  a chosen C at an end of the grid is recorded (C_at_grid_end) and the stage warns: the optimum may lie beyond;
- the reported head is the fit on the train part at the chosen C; with recipe.refit, the fit on train + val at that
  C, warm-started from it (val is then no longer held out: its top-1 is the train-part fit's);
- the head is folded back to the standardised features (logits = (x - mean) / std @ coef + bias): test hits, saved
  heads and the LinearProbe estimator all apply that one form (linear_logits).

Many keys solve side by side: arrays of one width are stacked into one [G, n, D+1] tensor (last column 1, the bias)
and a batched L-BFGS (per-key curvature pairs, step sizes and convergence) runs them in one matmul per step, on the
GPU when there is one. Rows are held in RAM up to the memory budget, else every step streams them from the store.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from ..device import pick_device
from ..progress import progress
from .feed import DEFAULT_BUDGET, Feed, Rows, split_val
from .heads import top_hits
from .intervals import hits_record, validation_record

STREAM_ROWS = 4096  # rows per block when the design streams from the store


def flat(x: torch.Tensor, pool: int | None) -> torch.Tensor:
    """[n, C, H, W] -> [n, D], average-pooled to pool x pool first when the head asks for it."""
    if pool is not None and pool < min(x.shape[2:]):
        x = F.adaptive_avg_pool2d(x, pool)
    return x.flatten(1)


class Design:
    """Rows of several sources of one width as [G, n, D+1] blocks: standardised, rotated onto the eigenvectors of
    the fit rows' correlation matrix (an orthogonal change of basis: the L2 penalty and the optimum are unchanged,
    but L-BFGS, preconditioned by the eigenvalues, no longer crawls along correlated channels), then a column of
    ones for the bias. Held on the device when they fit the budget, else re-read block by block at every pass."""

    def __init__(self, sources: list[Rows], labels: np.ndarray, positions: np.ndarray, pool: int | None,
                 device: torch.device, budget: int = DEFAULT_BUDGET, stats: tuple | None = None):
        self.feed = Feed(sources, labels, positions, STREAM_ROWS, device, budget)
        self.pool, self.n = pool, len(positions)
        self.stats = stats or self.moments()
        self.held = list(self.prepared()) if self.feed.cache is not None else None
        self.subsets: dict = {}  # indices -> held blocks of those sources: copies the still-moving problems read
        if self.held is not None:
            self.feed = None  # the prepared copy is all that is needed

    def raw(self):
        if self.feed.cache is not None:
            yield [flat(x, self.pool) for x in self.feed.cache], self.feed.cache_y
            return
        for xs, y in self.feed.batches():
            yield [flat(x, self.pool) for x in xs], y

    def moments(self) -> tuple[torch.Tensor, ...]:
        """Per-feature mean and std [G, D], eigenvectors [G, D, D] and eigenvalues [G, D] of the correlation
        matrix, over these rows (float64 sums)."""
        s = xtx = 0.0
        for xs, _ in self.raw():
            x = torch.stack(xs).double()
            s, xtx = s + x.sum(1), xtx + x.transpose(1, 2) @ x
        mean = s / self.n
        cov = xtx / self.n - mean[:, :, None] * mean[:, None, :]
        std = cov.diagonal(dim1=1, dim2=2).clamp_min(1e-12).sqrt()
        eig, rot = torch.linalg.eigh(cov / (std[:, :, None] * std[:, None, :]))
        return mean.float(), std.float(), rot.float(), eig.clamp_min(0).float()

    def prepared(self):
        mean, std, rot, _ = self.stats
        for xs, y in self.raw():
            x = torch.bmm((torch.stack(xs) - mean[:, None]) / std[:, None], rot)
            yield torch.cat([x, x.new_ones(*x.shape[:2], 1)], 2), y

    def blocks(self, idx: torch.Tensor | None = None):
        """The blocks of every source, or of the sources idx (held copies are kept while idx stays the same)."""
        if idx is None:
            return self.held if self.held is not None else self.prepared()
        if self.held is None:
            return ((x[idx], y) for x, y in self.prepared())
        if len(idx) == len(self.held[0][0]):  # every source: the held blocks themselves
            return self.held
        key = tuple(idx.tolist())
        blocks = self.subsets.pop(key, None)
        if blocks is None:
            if len(self.subsets) >= 2:  # least recently used out: the moving set outlives each backtracking set
                self.subsets.pop(next(iter(self.subsets)))
            blocks = [(x[idx], y) for x, y in self.held]
        self.subsets[key] = blocks
        return blocks


def weights(u: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The weights [G, D+1, K] (rotated basis; bias last) of the solver's variables: u = W / scale row-wise."""
    return torch.cat([u[:, :-1] * scale[..., None], u[:, -1:]], 1)


def objective(design: Design, u: torch.Tensor, lam: torch.Tensor, scale: torch.Tensor, idx: torch.Tensor | None = None):
    """Per-key mean cross-entropy + lam/2 |W|^2 (bias row free) and its gradient in u; u [G, D+1, K], lam [G]
    (of the design's sources idx, or all). W = scale * u row-wise with scale = 1/sqrt(eigenvalue / K + lam): the
    diagonal preconditioner."""
    w = weights(u, scale)
    f = w.new_zeros(len(w))
    g = torch.zeros_like(w)
    for x, y in design.blocks(idx):
        z = torch.bmm(x, w)  # [G, n, K]
        logp = z - torch.logsumexp(z, 2, keepdim=True)  # = log_softmax, whose CPU kernel is ~4x slower for K ~ 10
        f -= logp.gather(2, y.view(1, -1, 1).expand(len(w), -1, 1)).sum((1, 2))
        p = logp.exp_()
        p[:, torch.arange(len(y), device=y.device), y] -= 1
        g += torch.bmm(p.transpose(1, 2), x).transpose(1, 2)  # (p^T x)^T: 2-3x faster than x^T p on CPU BLAS
    reg = w[:, :-1]
    f = f / design.n + lam / 2 * (reg * reg).sum((1, 2))
    g /= design.n
    g[:, :-1] += lam[:, None, None] * reg
    g[:, :-1] *= scale[..., None]
    return f, g


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum((1, 2))


def lbfgs(fun, w: torch.Tensor, gap, max_iter: int, memory: int = 10) -> tuple[torch.Tensor, dict]:
    """Batched L-BFGS: G independent problems stacked on dim 0, each with its own curvature pairs, Armijo
    backtracking step and convergence test (gap(g) <= 1). fun(w[sel], sel) evaluates the problems sel only, so
    converged problems cost nothing and a backtracking step re-evaluates only the problems that rejected theirs."""
    everyone = torch.arange(len(w), device=w.device)
    f, g = fun(w, everyone)
    hist: list[tuple] = []  # (s, y, rho) with rho = 0 where a pair lacks positive curvature (a no-op pair)
    gamma = torch.ones_like(f)
    done = gap(g) <= 1
    iters = torch.zeros(len(w), dtype=torch.long, device=w.device)
    it = 0
    while it < max_iter and not bool(done.all()):
        it += 1
        iters += ~done
        q, alphas = g.clone(), []
        for s, y, rho in reversed(hist):
            a = rho * dot(s, q)
            q -= a[:, None, None] * y
            alphas.append(a)
        d = gamma[:, None, None] * q
        for (s, y, rho), a in zip(hist, reversed(alphas)):
            d += (a - rho * dot(y, d))[:, None, None] * s
        d = -d
        slope = dot(g, d)
        bad = slope >= 0  # not a descent direction: restart that problem from steepest descent
        d[bad], slope[bad] = -g[bad], -dot(g, g)[bad]
        d[done], slope[done] = 0, 0
        # the first step is scaled down to a unit-sized move; later ones start at 1 (L-BFGS's natural step)
        step = (1 / g.abs().sum((1, 2)).clamp_min(1e-12)).clamp(max=1.0) if not hist else torch.ones_like(f)
        pending = ~done
        w_new, f_new, g_new = w.clone(), f.clone(), g.clone()
        for _ in range(30):  # backtracking until every moving problem accepts its step
            sel = pending.nonzero().flatten()
            trial = w[sel] + step[sel, None, None] * d[sel]
            ft, gt = fun(trial, sel)
            f0, d0, slope0 = f[sel], d[sel], slope[sel]
            # Armijo's sufficient decrease; or, near the optimum where float32 losses cannot resolve a decrease,
            # Hager-Zhang's approximate Wolfe test: the slope did not overshoot and the loss did not grow visibly
            approx = (dot(gt, d0) <= -0.8 * slope0) & (ft <= f0 + 1e-6 * f0.abs())
            ok = (ft <= f0 + 1e-4 * step[sel] * slope0) | approx
            acc = sel[ok]
            w_new[acc], f_new[acc], g_new[acc] = trial[ok], ft[ok], gt[ok]
            pending[acc] = False
            if not bool(pending.any()):
                break
            step = torch.where(pending, step / 2, step)
        s, y = w_new - w, g_new - g
        sy = dot(s, y)
        good = sy > 1e-10 * dot(y, y).clamp_min(1e-30).sqrt() * dot(s, s).sqrt()
        hist.append((s, y, torch.where(good, 1 / sy.clamp_min(1e-30), torch.zeros_like(sy))))
        hist = hist[-memory:]
        gamma = torch.where(good, sy / dot(y, y).clamp_min(1e-30), gamma)
        w, f, g = w_new, f_new, g_new
        done |= (gap(g) <= 1) | pending  # pending: no step length helps any more (float32's floor)
    left = gap(g)
    return w, {"iterations": iters.tolist(), "grad_over_tol": left.tolist(), "converged": (left <= 1).tolist(),
               "loss": f.tolist()}


@torch.no_grad()
def predict_hits(design: Design, w: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-key hit vectors (top-1, top-5) over every row of the design, in row order: [G, n] bools each."""
    top1, top5 = [], []
    for x, y in design.blocks():
        h1, h5 = top_hits(torch.bmm(x, w), y)
        top1.append(h1)
        top5.append(h5)
    return torch.cat(top1, 1), torch.cat(top5, 1)


def solve_at(design: Design, u: torch.Tensor, scale: torch.Tensor, lam: torch.Tensor, n_classes: int, recipe):
    """Every source's L-BFGS solve at its L2 strength lam [G], warm-started from the weights W = weights(u, scale)
    of the previous solve; returns the solution as (u, scale) and the solver's record."""
    # the softmax's curvature along a feature is ~ p (1 - p) ~ 1/K times its variance at the uniform start: the
    # diagonal preconditioner weighs data against the penalty so (~40% fewer passes than eig + lam at K = 10)
    scale_new = (design.stats[3] / n_classes + lam[:, None]).rsqrt()
    u = u.clone()
    u[:, :-1] *= (scale / scale_new)[..., None]  # the same W: a warm start
    # converged: every entry of the gradient in W (not u) within min(tol * lam, 1e-4): weak penalties solve
    # finer, down to 1e-5, where float32 sums over the rows stop resolving it
    bound = (recipe.tol * lam).clamp(1e-5, 1e-4)
    gap = lambda g: torch.cat([g[:, :-1] / scale_new[..., None], g[:, -1:]], 1).abs().amax((1, 2)) / bound  # noqa: E731
    u, info = lbfgs(lambda v, sel: objective(design, v, lam[sel], scale_new[sel], sel), u, gap, recipe.max_iter)
    return u, scale_new, info


def c_path(fit: Design, val: Design | None, Cs: list[float], n_classes: int, recipe):
    """Solve every source at each C, small to large (each solve warm-starts the next, weaker-regularised one); per
    source keep the fit with the best validation top-1 (strictly better: ties keep the smaller C, stronger
    regularisation). Returns its weights W [G, D+1, K] (rotated basis), C, the val top-1 per C, solver records."""
    G, dev = len(fit.stats[0]), fit.stats[0].device
    u = torch.zeros(G, fit.stats[0].shape[1] + 1, n_classes, device=dev)
    scale = torch.ones_like(fit.stats[3])
    best, best_w = torch.full((G,), -1.0, device=dev), torch.zeros_like(u)
    chosen, records, curve = [None] * G, [{}] * G, [[] for _ in range(G)]
    for C in Cs:
        u, scale, info = solve_at(fit, u, scale, torch.full((G,), 1 / (C * fit.n), device=dev), n_classes, recipe)
        w = weights(u, scale)
        score = predict_hits(val, w, n_classes)[0].float().mean(1) if val else torch.ones(G, device=dev)
        for i in range(G):
            curve[i].append(float(score[i]))
            if score[i] > best[i]:
                best[i], best_w[i], chosen[i] = score[i], w[i], C
                records[i] = {name: v[i] for name, v in info.items()}
    return best_w, chosen, curve, records


def fold(w: torch.Tensor, stats: tuple) -> dict[str, torch.Tensor]:
    """Rotated-basis weights W [G, D+1, K] -> the head on standardised features, logits = (x - mean) / std @ coef
    + bias (scikit-learn's StandardScaler + LogisticRegression layout): what is reported, saved and applied."""
    mean, std, rot, _ = stats
    return {"mean": mean, "std": std, "coef": torch.bmm(rot.double(), w[:, :-1].double()).float(),
            "bias": w[:, -1].clone()}


def unfold(head: dict[str, torch.Tensor], stats: tuple) -> torch.Tensor:
    """A folded head as weights W [G, D+1, K] of another design (other rows: other mean, std and rotation) that
    compute the same logits: the refit's warm start."""
    mean, std, rot, _ = stats
    coef = head["coef"] * (std / head["std"])[..., None]
    bias = head["bias"] + torch.bmm(((mean - head["mean"]) / head["std"])[:, None], head["coef"])[:, 0]
    return torch.cat([torch.bmm(rot.transpose(1, 2), coef), bias[:, None]], 1)


@torch.no_grad()
def linear_logits(sources: list[Rows], head: dict[str, torch.Tensor], pool: int | None, device: torch.device,
                  budget: int = DEFAULT_BUDGET, labels: np.ndarray | None = None):
    """(logits [G, rows, K], labels) of each source's folded head over every row of its source, in row order,
    STREAM_ROWS rows at a time (the same blocks whether held or streamed: the stage and a loaded head compute the
    same numbers)."""
    n = sources[0].n_rows
    for xs, y in Feed(sources, np.zeros(n, np.int64) if labels is None else labels, np.arange(n), STREAM_ROWS, device,
                      budget).batches():
        x = torch.stack([flat(x, pool) for x in xs])
        yield torch.baddbmm(head["bias"][:, None], (x - head["mean"][:, None]) / head["std"][:, None], head["coef"]), y


def solve_group(sources: list[Rows], tests: list[Rows] | None, pool: int | None, y_train: np.ndarray,
                y_test: np.ndarray | None, n_classes: int, recipe, dev: torch.device, budget: int) -> list[dict]:
    """Every source of one width: the C path on train/val, the chosen C's fit (refit on train + val with
    recipe.refit) as a folded head ("fitted": numpy arrays), and the test hits of that head when tests are given."""
    fit_pos, val_pos = split_val(len(y_train), recipe.val_frac, recipe.seed, recipe.views)
    fit = Design(sources, y_train, fit_pos, pool, dev, budget)
    val = Design(sources, y_train, val_pos, pool, dev, budget, fit.stats) if len(val_pos) else None
    Cs = sorted(recipe.Cs) if val else [1.0]  # nothing to choose on: scikit-learn's default C
    w, chosen, curve, records = c_path(fit, val, Cs, n_classes, recipe)
    val_hits = predict_hits(val, w, n_classes) if val else None
    head, n_fit, width = fold(w, fit.stats), fit.n, fit.stats[0].shape[1]
    del fit, val, w  # their rows leave memory before the refit's and the test's come in
    if recipe.refit and val_hits is not None:
        full = Design(sources, y_train, np.arange(len(y_train)), pool, dev, budget)
        lam = torch.tensor([1 / (C * full.n) for C in chosen], device=dev)
        u, scale, info = solve_at(full, unfold(head, full.stats), torch.ones_like(full.stats[3]), lam, n_classes,
                                  recipe)
        head, n_fit = fold(weights(u, scale), full.stats), full.n
        records = [{name: v[i] for name, v in info.items()} for i in range(len(sources))]
    if tests is not None:
        blocks = linear_logits(tests, head, pool, dev, budget, y_test)
        hits = [torch.cat(h, 1) for h in zip(*(top_hits(z, y) for z, y in blocks))]
    out = []
    for i in range(len(sources)):
        m = {"C": chosen[i], "C_at_grid_end": grid_end(chosen[i], Cs), "val_top1": None,
             "val_top1_per_C": dict(zip(map(str, Cs), curve[i])) if val_hits is not None else None,
             "train_loss": records[i]["loss"], "iterations": records[i]["iterations"],
             "grad_over_tol": records[i]["grad_over_tol"], "converged": records[i]["converged"],
             "n_train": n_fit, "n_val": len(val_pos), "params": (width + 1) * n_classes,
             "fitted": {name: v[i].cpu().numpy() for name, v in head.items()}}
        if val_hits is not None:
            m.update(validation_record(*(h[i].cpu().numpy() for h in val_hits), y_train[val_pos], n_classes))
        if tests is not None:
            m.update(hits_record(*(h[i].cpu().numpy() for h in hits), n_classes))
        out.append(m)
    return out


def grid_end(C: float, Cs: list[float]) -> str | None:
    """'smallest' or 'largest' when the chosen C is an end of a grid of several: the optimum may lie beyond it."""
    return None if len(Cs) < 2 else "smallest" if C == Cs[0] else "largest" if C == Cs[-1] else None


def solve_many(sources: list[Rows], tests: list[Rows] | None, pools: list[int | None], y_train: np.ndarray,
               y_test: np.ndarray | None, n_classes: int, recipe, device: str | None = None,
               budget: int = DEFAULT_BUDGET, show_progress: bool = True) -> list[dict]:
    """Converged linear probes of every (train source, its test rows, head pool), side by side per width;
    metrics in input order. tests=None: fit only (an estimator's fit), no test metrics."""
    dev = pick_device(device)
    widths = [flat(torch.zeros(1, *r.row_shape), p).shape[1] for r, p in zip(sources, pools)]
    groups: dict = {}
    for i, key in enumerate(zip(widths, pools)):
        groups.setdefault(key, []).append(i)
    out: list = [None] * len(sources)
    with progress("probe", disable=not show_progress) as bar:  # advanced a group of one feature width at a time
        task = bar.add_task(f"solve {len(sources)} linear probe(s)", total=len(sources))
        for (width, pool), idx in groups.items():
            start = time.perf_counter()
            metrics = solve_group([sources[i] for i in idx], None if tests is None else [tests[i] for i in idx], pool,
                                  y_train, y_test, n_classes, recipe, dev, budget)
            spent = time.perf_counter() - start
            for i, m in zip(idx, metrics):
                out[i] = {**m, "train_time_s": spent / len(idx), "trained_with": len(idx), "device": str(dev)}
            bar.advance(task, len(idx))
    return out
