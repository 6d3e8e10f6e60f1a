"""What `diffstore probe` prints: the pixel baseline's resolution, hints that name the twin seed to extract, and
tables that fold their cells on an 80-column terminal instead of cutting the key columns to 'datas…'."""

import io

from rich.console import Console
from test_figures import constructed

from diffstore.probe.report import results_table, summary, summary_lines
from diffstore.terminal import fold


def rendered(table, width: int) -> str:
    out = io.StringIO()
    Console(file=out, width=width).print(fold(table, width))
    return out.getvalue()


def test_summary_says_the_pixel_resolution_and_the_table_row_too():
    text = "\n".join(summary_lines(summary(constructed()), []))
    assert "vs pixels at 16x16, the model's input size (95.0 [" in text
    rows = [{**r, "params": 10, "C": 0.1, "train_time_s": 1.0} for r in constructed()]
    assert "pixels 16x16" in rendered(results_table(rows), 200)


def test_missing_twin_hint_names_the_seed_the_store_holds_or_make_demos():
    results = constructed()
    no_twin = [r for r in results if "random-init" not in r["model"]]
    text = "\n".join(summary_lines(summary(no_twin), []))
    assert ("vs its random-init twin: not in this run (extract the twin with `--random-init 0`, as make demo does"
            in text)
    other_key = [r for r in results if not ("random-init" in r["model"] and (r["t"], r["block"]) == (10, 3))]
    text = "\n".join(summary_lines(summary(other_key), []))  # best key t=10/b3; the s0 twin holds other keys only
    assert ("its random-init-s0 twin lacks this key: extract it with `--random-init 0 --t 10 --blocks 3 --pools 2`"
            in text)
    assert "--random-init 1" not in text


def test_results_table_on_80_columns_folds_cells_and_keeps_key_columns_whole():
    rows = [{**r, "model": r["model"].replace("m", "digits-ddpm", 1) if r["kind"] == "store" else r["model"],
             "params": 10250, "C": 0.1, "train_time_s": 1.0} for r in constructed()]
    table = rendered(results_table(rows), 80)
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in table
    header = next(line for line in lines if " model " in line)
    assert header.split()[:7] == ["dataset", "model", "t", "block", "pool", "head", "recipe"]
    first = lines[lines.index(header) + 2].split()
    assert first[0] == "digits" and first[5:8] == ["linear", "converged", "10,250"]  # key cells whole
    assert "digits-ddp" in first[1]  # the longest key, the model name, is the one that folds
    wide = rendered(results_table(rows), 400)  # room enough: one line per result, the usual rules
    assert len([line for line in wide.splitlines() if "digits-ddpm" in line]) == len(rows) - 1 and "┃" in wide
