"""Progress that works in logs: when stderr is not a terminal, plain lines with a time stamp, what is worked on,
done, total, rate and ETA; one task per unit of work; no line wrapped, on stderr or stdout."""

import io
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone

from conftest import subset
from diffstore.extract import extract_features, plan_extraction
from diffstore.progress import LogProgress, duration, progress, working_on
from diffstore.store import Store

STAMP = "2025-06-01T14:03:12+02:00"
ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d"  # datetime.isoformat(timespec="seconds"), local offset


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def wall():
    return datetime(2025, 6, 1, 14, 3, 12, tzinfo=timezone(timedelta(hours=2)))


def test_log_progress_prints_a_line_every_interval_with_rate_and_eta():
    clock, out = Clock(), io.StringIO()
    with LogProgress(unit="img", every=10, stream=out, clock=clock, wall=wall) as bar:
        task = bar.add_task("t=50", total=1000)
        for _ in range(25):  # 25 s at 20 img/s: lines at 10 s and 20 s only
            clock.now += 1
            bar.advance(task, 20)
        assert out.getvalue().splitlines() == [
            f"[progress] {STAMP} t=50: 200/1000 img (20.0%), 20.0 img/s, elapsed 10s, ETA 40s",
            f"[progress] {STAMP} t=50: 400/1000 img (40.0%), 20.0 img/s, elapsed 20s, ETA 30s",
        ]
        clock.now += 25
        bar.advance(task, 500)  # completes: a final line, whatever the interval
    assert out.getvalue().splitlines()[-1] == f"[done] {STAMP} t=50: 1000/1000 img (100.0%), 20.0 img/s, elapsed 50s"


def test_unfinished_task_reports_where_it_stopped_and_disable_prints_nothing():
    clock, out = Clock(), io.StringIO()
    try:
        with LogProgress(unit="row", every=10, stream=out, clock=clock, wall=wall) as bar:
            task = bar.add_task("CKA 3x3", total=90)
            clock.now += 3
            bar.advance(task, 30)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert out.getvalue() == f"[progress] {STAMP} CKA 3x3: 30/90 row (33.3%), 10.0 row/s, elapsed 3s, ETA 6s\n"
    quiet = io.StringIO()
    with LogProgress(every=0, stream=quiet, disable=True) as bar:
        bar.advance(bar.add_task("x", total=2), 2)
    assert quiet.getvalue() == ""


def test_update_renames_and_advances_a_task_as_rich_does():
    """pipelines/train_ddpm.py shows its loss through update(description=...): in a log too."""
    clock, out = Clock(), io.StringIO()
    with LogProgress(unit="step", every=10, stream=out, clock=clock, wall=wall) as bar:
        task = bar.add_task("train", total=100)
        clock.now += 10
        bar.update(task, advance=50, description="train loss 0.0500")
        bar.update(task, description="train loss 0.0400")
        clock.now += 10
        bar.update(task, advance=50)
    assert out.getvalue().splitlines() == [
        f"[progress] {STAMP} train loss 0.0500: 50/100 step (50.0%), 5.0 step/s, elapsed 10s, ETA 10s",
        f"[done] {STAMP} train loss 0.0400: 100/100 step (100.0%), 5.0 step/s, elapsed 20s",
    ]


def test_durations_read_as_a_person_would():
    assert [duration(s) for s in (4.4, 65, 3725)] == ["4s", "1m05s", "1h02m"]


def test_progress_is_plain_lines_when_stderr_is_a_file():
    code = ("from diffstore.progress import progress\n"
            "with progress('img') as bar:\n"
            "    t = bar.add_task('t=10', total=4)\n"
            "    for _ in range(4): bar.advance(t)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == ""
    line = rf"\[done\] {ISO} t=10: 4/4 img \(100\.0%\), [\d.]+ img/s, elapsed 0s\n"
    assert re.fullmatch(line, done.stderr), done.stderr
    assert type(progress()).__name__ == "LogProgress"  # pytest captures stderr: not a terminal


def test_working_on_names_what_every_task_inside_works_on_and_a_rename_keeps_it():
    clock, out = Clock(), io.StringIO()
    with LogProgress(unit="step", every=10, stream=out, clock=clock, wall=wall) as bar:
        with working_on("digits/train digits-ddpm, digits-ddpm.random-init-s0"):
            task = bar.add_task("train 2 head(s)", total=4)
        other = bar.add_task("proxy", total=1)  # outside: its own description only
        bar.update(task, advance=4, description="train loss 0.1")
        bar.advance(other)
    assert out.getvalue().splitlines() == [
        f"[done] {STAMP} train loss 0.1 on digits/train digits-ddpm, digits-ddpm.random-init-s0: 4/4 step (100.0%), "
        "0.0 step/s, elapsed 0s",
        f"[done] {STAMP} proxy: 1/1 step (100.0%), 0.0 step/s, elapsed 0s"]


def test_extraction_logs_one_task_for_all_t_with_split_model_and_time(tmp_path, model, digits100, capsys):
    """Every t of a shard runs in one pass: one line for the work (t listed), not one line per t with the
    same numbers."""
    plan = plan_extraction(Store.open(str(tmp_path / "s.zarr")), model, subset(digits100, 40), t="10,300",
                           blocks="2", pools="1")
    extract_features(plan, batch_size=16, workers=0)
    lines = capsys.readouterr().err.splitlines()
    task = rf"{ISO} extract digits/test {re.escape(model.name)} t=10,300: "
    assert all(re.match(rf"\[progress\] {task}\d+/40 img ", line) for line in lines[:-1]), lines  # a slow machine
    assert re.fullmatch(rf"\[done\] {task}40/40 img \(100\.0%\), [\d.]+ img/s, elapsed \d+s", lines[-1]), lines


def test_nothing_is_wrapped_when_output_is_a_file_even_with_columns_80():
    """rich hard-wraps at 80 columns when it cannot see a terminal: a long recipe name must stay on one line on
    stderr (messages) and stdout (tables), also when COLUMNS says 80."""
    name = "converged-" + "x" * 150
    code = ("from rich.table import Table\n"
            "from diffstore.progress import stderr\n"
            "from diffstore.terminal import console, fold\n"
            f"stderr.print('digits: 3 head(s) to train ({name} recipe, seed 0)')\n"
            "t = Table(title='probe results')\n"
            "for c in ('dataset', 'model', 'recipe', 'top-1 [95% CI]'): t.add_column(c)\n"
            f"t.add_row('digits', 'digits-ddpm.random-init-s0', '{name}', '93.3 [90.8, 95.6]')\n"
            "out = console()\n"
            "out.print(fold(t, out.width))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "80"})
    assert done.returncode == 0, done.stderr
    assert done.stderr == f"digits: 3 head(s) to train ({name} recipe, seed 0)\n"
    row = next(line for line in done.stdout.splitlines() if "digits-ddpm" in line)
    assert name in row and "93.3 [90.8, 95.6]" in row
    assert "…" not in done.stdout


def test_a_slow_unit_shows_its_time_per_unit_rather_than_0_0_per_second():
    clock, out = Clock(), io.StringIO()
    with LogProgress(unit="width", every=10, stream=out, clock=clock, wall=wall) as bar:
        task = bar.add_task("solve 241 linear probe(s)", total=4)
        clock.now += 65
        bar.advance(task)
        assert out.getvalue() == (f"[progress] {STAMP} solve 241 linear probe(s): 1/4 width (25.0%), 1m05s/width, "
                                  "elapsed 1m05s, ETA 3m15s\n")
