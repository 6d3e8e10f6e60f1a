"""Figures of probe and CKA results, read from the Figure objects (not from pixels): one colour scale for the
heatmaps that belong together, a trained-minus-twin heatmap marking exactly the cells whose paired interval
excludes 0, legends only for what is drawn, every requested format at the requested dpi."""

import sys

import numpy as np
import pytest
from PIL import Image

from diffstore.cka.report import draw
from diffstore.cli import main
from diffstore.errors import DiffstoreError
from diffstore.probe.figures import figures, write_plots
from diffstore.probe.intervals import bootstrap_interval, pack
from diffstore.probe.options import ProbeOptions

N_TEST = 200
TS, BLOCKS = (10, 50), (3, 8)


def hits(n_right: int, offset: int = 0) -> np.ndarray:
    """N_TEST hits with n_right of them right, starting at test sample `offset` (wrapping round)."""
    h = np.zeros(N_TEST, bool)
    h[(offset + np.arange(n_right)) % N_TEST] = True
    return h


def result(model: str, t, block, h: np.ndarray, val_top1: float, kind: str = "store", pool="2") -> dict:
    return {"dataset": "digits", "model": model, "input": "noised" if kind == "store" else "-", "t": t, "block": block,
            "block_name": "mid" if block == 8 else str(block), "pool": pool, "head_label": "linear", "kind": kind,
            "recipe": {"name": "converged"}, "top1": float(h.mean()), "ci95": bootstrap_interval(h),
            "val_top1": val_top1, "n_test": N_TEST, "test_hits": pack(h)}


def constructed(with_pixels: bool = True) -> list[dict]:
    """Trained 'm' and its twin on a 2 x 2 (t, block) grid. Trained minus twin: (10, 3) +50 points and (50, 8)
    -40 points (intervals exclude 0); (10, 8) identical hits and (50, 3) one sample apart (intervals hold 0)."""
    trained = {(10, 3): hits(180), (10, 8): hits(150), (50, 3): hits(121), (50, 8): hits(60)}
    twin = {(10, 3): hits(80, 50), (10, 8): hits(150), (50, 3): hits(120), (50, 8): hits(140)}
    val = {(10, 3): 0.95, (10, 8): 0.7, (50, 3): 0.6, (50, 8): 0.3}
    out = [result("m", t, b, h, val[t, b]) for (t, b), h in trained.items()]
    out += [result("m.random-init-s0", t, b, h, val[t, b] - 0.1) for (t, b), h in twin.items()]
    return out + ([result("pixels", "-", "-", hits(190), 0.9, kind="pixels", pool="16")] if with_pixels else [])


def legend(fig) -> list[str]:
    return [t.get_text() for lg in fig.legends for t in lg.get_texts()]


def marked(fig, label: str) -> set:
    """(row, col) of the cells a Mark labelled `label` sits on (markers are drawn 0.3 below the cell centre)."""
    line = next((ln for ln in fig.axes[0].lines if ln.get_label() == label), None)
    return set() if line is None else {(round(y - 0.3), round(x)) for x, y in zip(line.get_xdata(), line.get_ydata())}


def test_model_twin_and_pixels_share_one_colour_scale_and_the_curves_one_y_range():
    figs = figures(constructed())
    trained = figs["digits_m_noised_p2_linear_converged_heatmap"]
    twin = figs["digits_m.random-init-s0_noised_p2_linear_converged_heatmap"]
    clim = trained.axes[0].images[0].get_clim()
    assert twin.axes[0].images[0].get_clim() == clim
    values = [100 * r["top1"] for r in constructed()]
    assert clim[0] <= min(values) and clim[1] >= 95.0  # the cells (30 .. 90) and the pixels' 95 are all on the scale
    colorbar = trained.axes[1]
    assert [ln.get_ydata()[0] for ln in colorbar.lines] == [95.0]  # the pixels' top-1, drawn on the colour bar
    assert colorbar.get_ylim() == pytest.approx(clim)
    curves = [figs[f"digits_{m}_noised_p2_linear_converged_vs_t"].axes[0].get_ylim() for m in ("m", "m.random-init-s0")]
    assert curves[0] == curves[1]
    alone = figures([r for r in constructed() if r["model"] == "m"])  # another group: its own range
    assert alone["digits_m_noised_p2_linear_converged_heatmap"].axes[0].images[0].get_clim() != clim


def test_difference_heatmap_marks_exactly_the_cells_whose_paired_interval_excludes_0():
    fig = figures(constructed())["digits_m_noised_p2_linear_converged_minus_random-init-s0"]
    image = fig.axes[0].images[0]
    np.testing.assert_allclose(image.get_array().filled(np.nan), [[50.0, 0.0], [0.5, -40.0]])
    lo, hi = image.get_clim()
    assert lo == -hi and hi >= 50.0  # symmetric about 0: white means no difference
    assert marked(fig, "paired 95% interval excludes 0") == {(0, 0), (1, 1)}
    assert legend(fig) == ["paired 95% interval excludes 0"]
    same = [r if "random-init" not in r["model"] else {**r, "test_hits": next(
        s["test_hits"] for s in constructed() if s["model"] == "m" and (s["t"], s["block"]) == (r["t"], r["block"]))}
        for r in constructed()]
    tie = figures(same)["digits_m_noised_p2_linear_converged_minus_random-init-s0"]
    assert marked(tie, "paired 95% interval excludes 0") == set() and legend(tie) == []  # nothing marked, no legend
    assert tie.axes[0].images[0].get_clim() == (-10.0, 10.0)  # no difference: white, on a scale of +-10 points


def test_legend_lists_only_the_marks_and_lines_that_are_drawn():
    figs = figures(constructed())
    fig = figs["digits_m_noised_p2_linear_converged_heatmap"]
    best = "best validation top-1"
    assert marked(fig, best) == {(0, 0)}  # t=10, block 3: the best validation top-1
    # no other cell's test top-1 (75, 60.5, 30) is inside the best cell's interval around 90: no circle, no entry
    assert len(legend(fig)) == 2 and legend(fig)[0] == best and legend(fig)[1].startswith("pixels 16x16: 95.0 [")
    near = [{**r, "ci95": [0.0, 1.0]} if r["model"] == "m" else r for r in constructed(with_pixels=False)]
    fig = figures(near)["digits_m_noised_p2_linear_converged_heatmap"]
    assert legend(fig) == [best, "test top-1 inside the best cell's 95% interval"]  # no pixels: no line for them
    assert marked(fig, "test top-1 inside the best cell's 95% interval") == {(0, 1), (1, 0), (1, 1)}


def test_every_requested_format_is_written_at_the_requested_dpi(tmp_path):
    results = [r for r in constructed() if r["t"] in (10, "-")]  # one t: heatmaps, no curves
    paths = write_plots(results, str(tmp_path / "a"), formats=("png", "pdf", "svg"), dpi=100)
    assert sorted(p.rsplit(".", 1)[1] for p in paths) == ["pdf"] * 3 + ["png"] * 3 + ["svg"] * 3
    magic = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml"}
    assert all(open(p, "rb").read(5).startswith(magic[p.rsplit(".", 1)[1]]) for p in paths)
    sharp = write_plots(results, str(tmp_path / "b"), formats=("png",), dpi=200)
    small = {p.rsplit("/", 1)[1]: Image.open(p).size for p in paths if p.endswith(".png")}
    for p in sharp:
        w, h = Image.open(p).size
        w1, h1 = small[p.rsplit("/", 1)[1]]
        assert 1.9 < w / w1 < 2.1 and 1.9 < h / h1 < 2.1  # twice the dots per inch, twice the pixels (text hints)


def test_cka_heatmap_in_each_format_keeps_its_fixed_0_1_scale(tmp_path):
    entry = [{"label": f"b{b} x", "key": {"model": "m", "block": b, "t": 10, "pool": "2"}} for b in (1, 2)]
    payload = {"kernel": "linear", "method": "unbiased", "n": 100, "title": "digits",
               "matrix": [[1.0, 0.4], [0.4, 1.0]], "rows": entry, "cols": entry}
    paths = draw(payload, tmp_path / "cka", ("svg", "png"), dpi=80)
    assert [p.name for p in paths] == ["cka.svg", "cka.png"] and all(p.stat().st_size > 1000 for p in paths)


def test_bad_format_or_dpi_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    o = ProbeOptions.build(plot_format="png,svg", dpi=300)
    assert (o.plot_format, o.dpi) == (("png", "svg"), 300)
    assert ProbeOptions.build(plot_format=["pdf"]).plot_format == ("pdf",)
    for bad, word in (({"plot_format": "gif"}, "plot_format= must be one of png, pdf, svg"),
                      ({"dpi": 0}, "dpi= must be >= 10")):
        with pytest.raises(DiffstoreError, match=word):
            ProbeOptions.build(bad)
    monkeypatch.setattr(sys, "argv", ["diffstore", "probe", "--store", str(tmp_path / "absent.zarr"),
                                      "--plot", str(tmp_path / "p"), "--plot-format", "png,gif"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and "--plot-format must be one of png, pdf, svg" in capsys.readouterr().err
    assert not (tmp_path / "p").exists() and not (tmp_path / "absent.zarr").exists()


def test_ds_cka_writes_its_heatmap_in_each_requested_format(tmp_path):
    """The API takes the CLI's options: plot_format and dpi reach the same drawing code."""
    from test_cka import make_store

    import diffstore as ds

    make_store(tmp_path / "s.zarr")
    matrix = ds.cka(str(tmp_path / "s.zarr"), by="block", t=90, plot=str(tmp_path / "plot"),
                    plot_format=["svg", "pdf"], dpi=100, show_progress=False)
    assert sorted(p.name for p in (tmp_path / "plot").iterdir()) == [f"{matrix.name}.pdf", f"{matrix.name}.svg"]
