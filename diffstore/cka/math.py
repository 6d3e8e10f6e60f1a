"""Centered kernel alignment (CKA) between row-aligned feature arrays, streamed from any array-like.

Inputs are anything with `.shape`, `.dtype` and `x[a:b] -> ndarray` (zarr arrays, numpy); rows are samples
and are flattened to vectors. Three estimators:

exact       linear CKA of Kornblith et al. 2019 on all N rows, through feature-space Grams:
                CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F),   Xc = X - mean(X)
            One pass over row chunks accumulates X^T X, Y^T Y, X^T Y and column sums in float64, then
            centers: Xc^T Yc = X^T Y - s_x s_y^T / N. Exact, memory O(D^2), never O(N^2) and never all of X.
unbiased    the same pass, debiased: unbiased HSIC_1 (Song et al. 2012) of the linear Grams on all N rows
            (Nguyen et al. 2021's estimator without minibatches). With K = X X^T, K~ = K with a zero diagonal,
            q_r = |x_r|^2 and s = X^T 1, every term of HSIC_1 has a feature-space form:
                tr(K~L~)  = ||X^T Y||_F^2 - sum_r q_r p_r          1'K~1 = |s_x|^2 - sum_r q_r
                1'K~L~1   = s_x^T X^T Y s_y - s_x^T X^T p - s_y^T Y^T q + sum_r q_r p_r
            so it streams like `exact`: memory O(D^2) plus a few vectors.
minibatch   Nguyen et al. 2021: the unbiased HSIC_1 of Song et al. 2012 averaged over minibatches of n rows,
                CKA = mean HSIC(K, L) / sqrt(mean HSIC(K, K) mean HSIC(L, L)),
            memory independent of N. Linear or RBF kernel (sigma = a fraction of the median distance).
            Minibatches come from contiguous blocks read in a seeded random order and shuffled together
            per window, so each row is read once; batch size and seed change the estimate slightly.

They estimate different things at finite N: the full-batch `exact` value is biased upwards (two independent
arrays of D features score about D / (N + D): ~0.1 at D = 1024, N = 8192; ~0.4 at D = 256, N = 360), the
unbiased and minibatch estimates are not (they scatter around 0 for independent features).

Many arrays at once reuse per-array work: one pass computes each array's Gram once and only the cross
terms per pair (exact), or each array's n x n Gram once per minibatch and every pair from those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.linalg.blas import dgemm, dsyrk

from ..errors import DiffstoreError
from .options import KERNELS, METHODS

STREAMED = ("exact", "unbiased")  # one pass through feature-space Grams: linear kernel only


@dataclass
class CKAConfig:
    method: str = "exact"  # exact | unbiased | minibatch | auto
    kernel: str = "linear"  # linear | rbf (rbf: minibatch only)
    batch_size: int = 256  # n, rows per minibatch
    seed: int = 0  # sample order of the minibatches
    sigma_frac: float = 1.0  # rbf: sigma = sigma_frac * median pairwise distance within the minibatch
    chunk_rows: int = 4096  # exact: rows read per step
    block_rows: int = 256  # minibatch: rows per contiguous read; blocks are visited in random order
    window_rows: int = 8192  # minibatch: rows shuffled together (from window_rows / block_rows random blocks)
    max_window_gib: float = 1.0  # minibatch: fewer window rows when the arrays' rows would exceed this
    max_gram_gib: float = 8.0  # exact: refuse when the D x D accumulators would exceed this

    def __post_init__(self):
        if self.method not in METHODS:
            raise DiffstoreError(f"unknown CKA method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.kernel not in KERNELS:
            raise DiffstoreError(f"unknown kernel {self.kernel!r}: use one of {', '.join(KERNELS)}")
        if self.kernel == "rbf" and self.method in STREAMED:
            raise DiffstoreError("the rbf kernel needs N x N Grams, so it is streamed only: pass --method minibatch")
        if self.batch_size < 4:
            raise DiffstoreError(f"--batch-size {self.batch_size} is too small: unbiased HSIC needs at least 4 rows")


def rows_of(x, a: int, b: int, out: np.ndarray | None = None) -> np.ndarray:
    """Rows a:b of an array-like as a float64 [b - a, D] matrix: a new one, or written into `out` (reusing one
    buffer per array saves the page faults of a fresh allocation per chunk, a visible cost at large D)."""
    rows = np.asarray(x[a:b]).reshape(b - a, -1)
    if out is None:
        return rows.astype(np.float64)
    out[: b - a] = rows
    return out[: b - a]


def row_count(arrays: list) -> int:
    counts = {int(x.shape[0]) for x in arrays}
    if len(counts) != 1:
        raise DiffstoreError(f"CKA needs row-aligned arrays over the same samples, got row counts {sorted(counts)}: "
                             "compare features extracted from the same dataset split")
    return counts.pop()


def width(x) -> int:
    return int(np.prod(x.shape[1:], dtype=np.int64))


def gram_terms(arrays: list, pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The D x D products exact CKA accumulates: each array's own Gram once, plus one cross term per pair."""
    return sorted({(i, i) for i in range(len(arrays))} | {(min(p), max(p)) for p in pairs})


def exact_gib(arrays: list, pairs: list[tuple[int, int]], chunk_rows: int) -> float:
    dims = [width(x) for x in arrays]
    return 8 * (sum(dims[i] * dims[j] for i, j in gram_terms(arrays, pairs)) + chunk_rows * sum(dims)) / 2**30


def accumulate(g: np.ndarray, zi: np.ndarray, zj: np.ndarray) -> None:
    """g += zi^T zj in place (BLAS with beta = 1): no D x D temporary per chunk, whose allocation and add
    cost ~15% of the products at D = 4096. For zi is zj, syrk: half the flops, upper triangle only."""
    if zi is zj:
        out = dsyrk(1.0, zi.T, beta=1.0, c=g, trans=0, lower=0, overwrite_c=1)
    else:
        out = dgemm(1.0, zi.T, zj.T, beta=1.0, c=g, trans_b=1, overwrite_c=1)
    assert out is g, "BLAS copied the accumulator: it must be a Fortran-ordered float64 array"


def bias_floor(n: int, d1: int, d2: int) -> float:
    """What full-batch (biased) linear CKA gives two independent Gaussian arrays of d1 and d2 features over n
    rows, to leading order: sqrt(d1 d2 / ((n + d1)(n + d2))). Near 0 only when n >> d."""
    return float(np.sqrt(d1 * d2 / ((n + d1) * (n + d2))))


def exact_linear(arrays: list, pairs: list[tuple[int, int]], cfg: CKAConfig,
                 on_rows: Callable[[int], None] | None = None, unbiased: bool = False) -> dict[tuple[int, int], float]:
    """Linear CKA for each (i, j) in `pairs`, in one streamed pass over the rows of all arrays: the full-batch
    value, or with unbiased=True the debiased one (HSIC_1 terms, see the module docstring)."""
    n = row_count(arrays)
    if unbiased and n < 4:
        raise DiffstoreError(f"unbiased CKA needs at least 4 rows, got {n}")
    dims = [width(x) for x in arrays]
    terms = gram_terms(arrays, pairs)
    gib = exact_gib(arrays, pairs, cfg.chunk_rows)
    if gib > cfg.max_gram_gib:
        raise DiffstoreError(f"exact CKA would hold {gib:.1f} GiB of D x D accumulators (D = {max(dims)}): "
                             "use --method minibatch, a smaller --pool, or fewer arrays per matrix")
    # Shift by the first chunk's mean: centering is shift-invariant, and it keeps X^T X - s s^T / N from
    # cancelling catastrophically when the features have a large mean.
    shift = [rows_of(x, 0, min(cfg.chunk_rows, n)).mean(0) for x in arrays]
    sums = [np.zeros(d) for d in dims]
    grams = {(i, j): np.zeros((dims[i], dims[j]), order="F") for i, j in terms}  # Fortran: BLAS writes in place
    buffers = [np.empty((min(cfg.chunk_rows, n), d)) for d in dims]
    # unbiased only: per array sum_r q_r; per term sum_r q_r p_r, X^T p and Y^T q (q, p: squared row norms)
    sq_sum = np.zeros(len(arrays))
    qq = {t: 0.0 for t in terms}
    xp = {t: (np.zeros(dims[t[0]]), np.zeros(dims[t[1]])) for t in terms}
    for a in range(0, n, cfg.chunk_rows):
        b = min(a + cfg.chunk_rows, n)
        z = [rows_of(x, a, b, buf) for x, buf in zip(arrays, buffers)]
        for i, zi in enumerate(z):
            zi -= shift[i]
            sums[i] += zi.sum(0)
        for i, j in terms:
            accumulate(grams[i, j], z[i], z[j])
        if unbiased:
            q = [np.einsum("rd,rd->r", zi, zi) for zi in z]
            sq_sum += [qi.sum() for qi in q]
            for i, j in terms:
                qq[i, j] += float(q[i] @ q[j])
                xp[i, j][0][:] += z[i].T @ q[j]
                xp[i, j][1][:] += z[j].T @ q[i]
        if on_rows:
            on_rows(b - a)
    for i in range(len(arrays)):
        grams[i, i] = np.triu(grams[i, i]) + np.triu(grams[i, i], 1).T  # syrk filled the upper triangle
    if unbiased:  # HSIC_1 is invariant to the shift above (tested against the n x n formula)
        def hsic_1(i: int, j: int) -> float:
            g, (x_p, y_q), si, sj = grams[i, j], xp[i, j], sums[i], sums[j]
            trace = float(np.sum(g ** 2)) - qq[i, j]
            ones_k, ones_l = float(si @ si) - sq_sum[i], float(sj @ sj) - sq_sum[j]
            cross = float(si @ g @ sj) - float(si @ x_p) - float(sj @ y_q) + qq[i, j]
            return (trace + ones_k * ones_l / ((n - 1) * (n - 2)) - 2 / (n - 2) * cross) / (n * (n - 3))

        hsic = {(i, j): hsic_1(i, j) for i, j in terms}
    else:
        hsic = {(i, j): float(np.sum((grams[i, j] - np.outer(sums[i], sums[j]) / n) ** 2)) for i, j in terms}
    return {(i, j): _ratio(hsic[min(i, j), max(i, j)], hsic[i, i], hsic[j, j]) for i, j in pairs}


def _ratio(kl: float, kk: float, ll: float) -> float:
    denom = np.sqrt(kk * ll) if kk > 0 and ll > 0 else 0.0
    return float(kl / denom) if denom > 0 else float("nan")  # a constant feature array has no CKA


def minibatch_windows(n_rows: int, cfg: CKAConfig, window_rows: int):
    """Yield (blocks, batches): contiguous row slices to read, and index arrays of `batch_size` rows into
    their concatenation. Blocks are visited in a seeded random order and shuffled together per window, so a
    minibatch mixes rows from window_rows / block_rows places in the dataset while every read stays contiguous
    and every row is read once. Rows left over in a window (fewer than batch_size) are dropped."""
    rng = np.random.default_rng(cfg.seed)
    starts = rng.permutation(np.arange(0, n_rows, cfg.block_rows))
    per_window = max(1, -(-max(window_rows, cfg.batch_size) // cfg.block_rows))
    for w in range(0, len(starts), per_window):
        blocks = [slice(int(a), min(int(a) + cfg.block_rows, n_rows)) for a in starts[w:w + per_window]]
        order = rng.permutation(sum(s.stop - s.start for s in blocks))
        yield blocks, [order[k:k + cfg.batch_size] for k in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size)]


def read_window(x, blocks: list[slice]) -> np.ndarray:
    """The rows of `blocks`, concatenated, in the stored dtype (float16: a quarter of float64; minibatches
    are converted one at a time)."""
    out = np.empty((sum(s.stop - s.start for s in blocks), width(x)), dtype=x.dtype)
    at = 0
    for s in blocks:
        out[at:at + s.stop - s.start] = np.asarray(x[s]).reshape(s.stop - s.start, -1)
        at += s.stop - s.start
    return out


def gram(x: np.ndarray, cfg: CKAConfig) -> np.ndarray:
    """n x n kernel matrix of the rows of x."""
    k = x @ x.T
    if cfg.kernel == "rbf":
        sq = np.diag(k)
        dist2 = np.maximum(sq[:, None] + sq[None, :] - 2 * k, 0)
        median2 = np.median(dist2[~np.eye(len(x), dtype=bool)])  # off-diagonal: self-distances are not data
        k = np.exp(-dist2 / (2 * cfg.sigma_frac**2 * median2)) if median2 > 0 else np.ones_like(k)
    return k


def unbiased_hsic_all(grams: list[np.ndarray]) -> np.ndarray:
    """m x m matrix of unbiased HSIC_1 (Song et al. 2012) between every pair of n x n Grams.

    HSIC_1(K, L) = [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)),  K~ = K, diag 0.
    Per Gram once: K~, its row sums r and total s; per pair: tr(K~L~) = <K~, L~> and 1'K~L~1 = r_K . r_L,
    all pairs at once as two small matrix products.
    """
    n = grams[0].shape[0]
    flat = np.stack([g.ravel() for g in grams])
    flat[:, :: n + 1] = 0  # the diagonal of every Gram
    r = flat.reshape(len(grams), n, n).sum(2)
    s = r.sum(1)
    return (flat @ flat.T + np.outer(s, s) / ((n - 1) * (n - 2)) - 2 / (n - 2) * (r @ r.T)) / (n * (n - 3))


def minibatch(arrays: list, pairs: list[tuple[int, int]], cfg: CKAConfig,
              on_rows: Callable[[int], None] | None = None) -> tuple[dict[tuple[int, int], float], int]:
    """Minibatch CKA for each (i, j) in `pairs`; returns the values and the number of rows used."""
    n_rows = row_count(arrays)
    if n_rows < cfg.batch_size:
        raise DiffstoreError(f"--batch-size {cfg.batch_size} exceeds the {n_rows} rows: pass a smaller batch size")
    total, batches = np.zeros((len(arrays), len(arrays))), 0
    row_bytes = sum(width(x) * np.dtype(x.dtype).itemsize for x in arrays)
    window_rows = min(cfg.window_rows, int(cfg.max_window_gib * 2**30 // row_bytes))  # many wide arrays: fewer rows
    for blocks, window_batches in minibatch_windows(n_rows, cfg, window_rows):
        window = [read_window(x, blocks) for x in arrays]
        for idx in window_batches:
            total += unbiased_hsic_all([gram(w[idx].astype(np.float64), cfg) for w in window])
            batches += 1
        del window  # before the next window is read: one window in memory, not two
        if on_rows:
            on_rows(sum(s.stop - s.start for s in blocks))
    if batches == 0:
        raise DiffstoreError("no complete minibatch fits a window: lower --batch-size")
    h = total / batches
    return {(i, j): _ratio(h[i, j], h[i, i], h[j, j]) for i, j in pairs}, batches * cfg.batch_size


@dataclass
class CKAResult:
    matrix: np.ndarray  # [len(rows), len(cols)]
    method: str  # the estimator that ran ("auto" resolved)
    n_used: int  # rows the estimate used (minibatch: whole minibatches only)


def cka_matrix(rows: list, cols: list | None = None, cfg: CKAConfig | None = None,
               on_rows: Callable[[int], None] | None = None) -> CKAResult:
    """CKA of every row array against every column array (cols=None: rows x rows, symmetric, computed once
    per unordered pair). Arrays passed in both lists (the same object) are read once."""
    cfg = cfg or CKAConfig()
    cols = rows if cols is None else cols
    arrays, where = [], {}
    for x in [*rows, *cols]:
        if id(x) not in where:
            where[id(x)] = len(arrays)
            arrays.append(x)
    cells = {(r, c): (where[id(x)], where[id(y)]) for r, x in enumerate(rows) for c, y in enumerate(cols)}
    pairs = sorted({(min(p), max(p)) for p in cells.values()})
    method = cfg.method
    if method == "auto":
        fits = cfg.kernel == "linear" and exact_gib(arrays, pairs, cfg.chunk_rows) <= cfg.max_gram_gib
        method = "exact" if fits else "minibatch"
    if method in STREAMED:
        values, used = exact_linear(arrays, pairs, cfg, on_rows, unbiased=method == "unbiased"), row_count(arrays)
    else:
        values, used = minibatch(arrays, pairs, cfg, on_rows)
    out = np.empty((len(rows), len(cols)))
    for (r, c), (i, j) in cells.items():
        out[r, c] = values[min(i, j), max(i, j)]
    return CKAResult(out, method, used)


def cka(x, y, cfg: CKAConfig | None = None) -> float:
    """CKA between two row-aligned array-likes."""
    return float(cka_matrix([x], [y], cfg).matrix[0, 0])
