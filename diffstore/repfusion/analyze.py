"""RepFusion's analyses of the teacher features per t (its Fig. 2 and 3), from the stored targets:

    singular values   of the centred N x C feature matrix at each t (identity view), normalised by the largest
    effective rank    exp(H(p)), p = singular values / their sum (Roy & Vetterli): how many directions carry
                      the features; RepFusion observes it varies with t, which is why t must be chosen
    t-SNE             2-D embedding per t of a seeded subset, coloured by class
    policy            the learned distribution over t of every distill run on these targets

PNGs (spectra, effective_rank, tsne, policy) go to OUT/{targets fingerprint[:12]}/ (OUT: beside the store),
matplotlib's object API as in plots.py; the numbers go to the store as a result.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from ..plots import curves, save
from ..progress import progress
from ..store import Store
from .config import AnalyzeConfig
from .distill import KIND, run_results
from .targets import open_targets


def spectrum(x: np.ndarray) -> np.ndarray:
    """Singular values of the centred [N, C] matrix, descending, float64."""
    x = x.astype(np.float64)
    return np.linalg.svd(x - x.mean(0), compute_uv=False)


def effective_rank(s: np.ndarray) -> float:
    p = s / max(s.sum(), 1e-300)
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def plot_spectra(ts: list[int], spectra: list[np.ndarray], path: Path) -> Path:
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    colors = matplotlib.colormaps["viridis"](np.linspace(0, 1, len(ts)))
    for t, s, col in zip(ts, spectra, colors):
        ax.semilogy(np.arange(1, len(s) + 1), s / max(s[0], 1e-300), color=col, lw=1, label=f"t={t}")
    ax.set(xlabel="index", ylabel="singular value / largest", title="Singular values of z(t), one line per t")
    ax.legend(fontsize=6, ncol=2 if len(ts) > 8 else 1)
    return save(fig, path)


def plot_tsne(ts: list[int], embeddings: list[np.ndarray], labels: np.ndarray, class_names: list[str],
              path: Path) -> Path:
    fig = Figure(figsize=(3.2 * len(ts) + 0.8, 3.4))
    axes = fig.subplots(1, len(ts), squeeze=False)[0]
    for ax, t, e in zip(axes, ts, embeddings):
        sc = ax.scatter(e[:, 0], e[:, 1], c=labels, cmap="tab10", s=4, vmin=0, vmax=max(9, len(class_names) - 1))
        ax.set(title=f"t={t}", xticks=[], yticks=[])
    bar = fig.colorbar(sc, ax=list(axes), ticks=range(len(class_names)), fraction=0.02, pad=0.01)
    bar.ax.set_yticklabels(class_names)
    fig.savefig(path, dpi=120)  # not save(): tight_layout fights the shared colorbar
    return Path(path)


def plot_policy(ts: list[int], runs: dict[str, list[float]], path: Path) -> Path:
    """The learned pi(t) of each run against the uniform policy (dashed). The y-axis starts at 0 and spans at
    least twice the uniform mass, so a near-uniform policy looks flat rather than steep."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    uniform = 1 / len(ts)
    ax.axhline(uniform, color="grey", ls="--", lw=1, label=f"uniform (1/{len(ts)})")
    for name, dist in runs.items():
        ax.plot(ts, dist, marker="o", ms=3, label=name)
    top = max([2 * uniform, *(1.1 * max(d) for d in runs.values())])
    ax.set(xlabel="t", ylabel="mean pi(t | x)", ylim=(0, top), title="Learned distribution over t")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, path)


def analyze(cfg: AnalyzeConfig, show_progress: bool = True) -> dict:
    from sklearn.manifold import TSNE

    store = Store.open(cfg.store, "a")
    arr = open_targets(store, cfg.targets)
    base, ts = arr.path.rsplit("/", 1)[0], arr.attrs["t_grid"]
    z = arr.read()[:, 0]  # identity view, [N, K, C]
    labels = store.split(arr.attrs["dataset"]["name"], arr.attrs["dataset"]["split"]).labels[:len(z)]
    folder = cfg.out_dir() / arr.attrs["fingerprint"][:12]
    folder.mkdir(parents=True, exist_ok=True)

    spectra = [spectrum(z[:, k]) for k in range(len(ts))]
    ranks = [effective_rank(s) for s in spectra]
    pngs = [plot_spectra(ts, spectra, folder / "spectra.png"),
            save(curves(ts, {"effective rank": ranks}, "t", "effective rank", "Effective rank of z(t)"),
                 folder / "effective_rank.png")]

    rng = np.random.default_rng(cfg.seed)
    rows = np.sort(rng.choice(len(z), size=min(cfg.tsne_points, len(z)), replace=False))
    picks = sorted(set(np.linspace(0, len(ts) - 1, min(cfg.tsne_ts, len(ts))).round().astype(int).tolist()))
    embeddings = []
    with progress("t", disable=not show_progress) as bar:  # t-SNE is the slow part: minutes on a CPU
        task = bar.add_task(f"t-SNE of {len(rows)} points on {base}", total=len(picks))
        for k in picks:
            embeddings.append(TSNE(2, init="pca", perplexity=min(30.0, (len(rows) - 1) / 3), random_state=cfg.seed)
                              .fit_transform(z[rows, k].astype(np.float32)))
            bar.advance(task)
    pngs.append(plot_tsne([ts[k] for k in picks], embeddings, labels[rows], arr.attrs["dataset"]["class_names"],
                          folder / "tsne.png"))

    runs = {r["run"]: r["distribution"] for r in run_results(store, "distill") if r["targets"] == base}
    if runs:
        pngs.append(plot_policy(ts, runs, folder / "policy.png"))
    result = {"stage": "analyze", "targets": base, "targets_fingerprint": arr.attrs["fingerprint"], "t_grid": ts,
              "effective_rank": ranks, "top_singular_value": [float(s[0]) for s in spectra],
              "tsne_t": [ts[k] for k in picks], "tsne_points": len(rows), "runs": sorted(runs),
              "pngs": [str(p) for p in pngs]}
    store.put_result(KIND, f"analysis-{arr.attrs['fingerprint'][:12]}", result)
    return result
