"""Progress that works in logs: when stderr is not a terminal, plain lines with done, total, rate and ETA."""

import io
import re
import subprocess
import sys

from diffstore.progress import LogProgress, duration, progress


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_log_progress_prints_a_line_every_interval_with_rate_and_eta():
    clock, out = Clock(), io.StringIO()
    with LogProgress(unit="img", every=10, stream=out, clock=clock) as bar:
        task = bar.add_task("t=50", total=1000)
        for _ in range(25):  # 25 s at 20 img/s: lines at 10 s and 20 s only
            clock.now += 1
            bar.advance(task, 20)
        assert out.getvalue().splitlines() == [
            "[progress] t=50: 200/1000 img (20.0%), 20.0 img/s, elapsed 10s, ETA 40s",
            "[progress] t=50: 400/1000 img (40.0%), 20.0 img/s, elapsed 20s, ETA 30s",
        ]
        clock.now += 25
        bar.advance(task, 500)  # completes: a final line, whatever the interval
    assert out.getvalue().splitlines()[-1] == "[done] t=50: 1000/1000 img (100.0%), 20.0 img/s, elapsed 50s"


def test_unfinished_task_reports_where_it_stopped_and_disable_prints_nothing():
    clock, out = Clock(), io.StringIO()
    try:
        with LogProgress(unit="row", every=10, stream=out, clock=clock) as bar:
            task = bar.add_task("CKA 3x3", total=90)
            clock.now += 3
            bar.advance(task, 30)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert out.getvalue() == "[progress] CKA 3x3: 30/90 row (33.3%), 10.0 row/s, elapsed 3s, ETA 6s\n"
    quiet = io.StringIO()
    with LogProgress(every=0, stream=quiet, disable=True) as bar:
        bar.advance(bar.add_task("x", total=2), 2)
    assert quiet.getvalue() == ""


def test_update_renames_and_advances_a_task_as_rich_does():
    """pipelines/train_ddpm.py shows its loss through update(description=...): in a log too."""
    clock, out = Clock(), io.StringIO()
    with LogProgress(unit="step", every=10, stream=out, clock=clock) as bar:
        task = bar.add_task("train", total=100)
        clock.now += 10
        bar.update(task, advance=50, description="train loss 0.0500")
        bar.update(task, description="train loss 0.0400")
        clock.now += 10
        bar.update(task, advance=50)
    assert out.getvalue().splitlines() == [
        "[progress] train loss 0.0500: 50/100 step (50.0%), 5.0 step/s, elapsed 10s, ETA 10s",
        "[done] train loss 0.0400: 100/100 step (100.0%), 5.0 step/s, elapsed 20s",
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
    assert re.fullmatch(r"\[done\] t=10: 4/4 img \(100\.0%\), [\d.]+ img/s, elapsed 0s\n", done.stderr), done.stderr
    assert type(progress()).__name__ == "LogProgress"  # pytest captures stderr: not a terminal
