"""Progress for long work, on stderr so stdout stays clean for results.

On a terminal: a rich bar per task (count, rate, ETA). Elsewhere (SLURM, nohup, CI, a pipe) a redrawn bar
is invisible until the end, so each task prints a plain line instead every `every` seconds, and once when it
finishes, with the wall-clock time (ISO 8601) so a log lines up with other logs:

    [progress] 2025-06-01T14:03:12+02:00 extract digits/train digits-ddpm t=10,50: 512/1437 img (35.6%), ...

A task is a unit of work as a person names it (all t of an extraction, all heads of one training), and its
description says what it works on (dataset/split, model), so a line is understood without its neighbours.

Both have the same interface (`with progress(unit) as bar: task = bar.add_task(desc, total=n);
bar.advance(task, k)`, `bar.update(task, advance=k, description=...)`), so a stage never asks which one it got.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, TextIO

from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from .terminal import console

LOG_EVERY_S = float(os.environ.get("DIFFSTORE_PROGRESS_EVERY", 10.0))  # seconds between plain lines
stderr = console(stderr=True)  # messages and bars; never hard-wrapped in a log file
WORK: ContextVar[str] = ContextVar("diffstore_progress_work", default="")


@contextmanager
def working_on(what: str):
    """Tasks started inside name `what` after their own description ('train 9 head(s) on digits/train
    digits-ddpm'): a stage says once what its helpers (solvers, trainers) work on."""
    token = WORK.set(what)
    try:
        yield
    finally:
        WORK.reset(token)


def described(description: str, on: str) -> str:
    return f"{description} on {on}" if on else description


def duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m: short enough for a log line."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclass
class LogTask:
    description: str
    total: float | None
    started: float
    on: str = ""  # what the task works on (working_on), kept when update() renames it
    completed: float = 0.0
    last_line: float = 0.0
    finished: bool = False


@dataclass
class LogProgress:
    """Plain progress lines for a stderr that is not a terminal: time stamp, done, total, rate and ETA every
    `every` seconds (measured with `clock`; `wall` gives the stamp: both injectable for tests), and a last line
    when a task completes."""

    unit: str = "img"
    every: float = LOG_EVERY_S
    stream: TextIO | None = None
    disable: bool = False
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], datetime] = lambda: datetime.now().astimezone()
    tasks: list[LogTask] = field(default_factory=list)

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc) -> None:
        for task in self.tasks:  # a task left unfinished (an error, a partial total): say where it stopped
            if not task.finished and task.completed:
                self.line(task)

    def add_task(self, description: str, total: float | None = None, **_) -> int:
        now = self.clock()
        self.tasks.append(LogTask(description, total, started=now, on=WORK.get(), last_line=now))
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        task = self.tasks[task_id]
        task.completed += advance
        now = self.clock()
        done = task.total is not None and task.completed >= task.total
        if done and not task.finished:
            task.finished = True
            self.line(task)
        elif now - task.last_line >= self.every:
            self.line(task)

    def update(self, task_id: int, advance: float = 0, description: str | None = None, **_) -> None:
        """rich's Progress.update, the part stages use: a new description (e.g. the current loss), an advance."""
        if description is not None:
            self.tasks[task_id].description = description
        if advance:
            self.advance(task_id, advance)

    def line(self, task: LogTask) -> None:
        now = self.clock()
        task.last_line = now
        if self.disable:
            return
        elapsed = now - task.started
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        count = f"{task.completed:g}"
        if task.total:
            count += f"/{task.total:g} {self.unit} ({100 * task.completed / task.total:.1f}%)"
        else:
            count += f" {self.unit}"
        eta = ""
        if task.total and not task.finished:
            eta = f", ETA {duration((task.total - task.completed) / rate)}" if rate > 0 else ", ETA ?"
        state = "done" if task.finished else "progress"
        stream = self.stream or sys.stderr
        stamp = self.wall().isoformat(timespec="seconds")
        speed = f"{duration(1 / rate)}/{self.unit}" if 0 < rate < 0.1 else f"{rate:.1f} {self.unit}/s"  # not 0.0/s
        print(f"[{state}] {stamp} {described(task.description, task.on)}: {count}, {speed}, "
              f"elapsed {duration(elapsed)}{eta}", file=stream, flush=True)


def progress(unit: str = "img", disable: bool = False):
    """A progress display with count, rate (`unit`/s) and ETA: a rich bar on a terminal, else LogProgress."""
    if not stderr.is_terminal:
        return LogProgress(unit=unit, disable=disable)
    return Bars(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
                TimeElapsedColumn(), TimeRemainingColumn(), console=stderr, disable=disable)


class Bars(Progress):
    """rich's Progress, its tasks named as LogProgress names them."""

    def add_task(self, description: str, *args, **kwargs) -> int:
        return super().add_task(escape(described(description, WORK.get())), *args, on=WORK.get(), **kwargs)

    def update(self, task_id, *, description: str | None = None, **kwargs) -> None:
        if description is not None:
            on = next(t.fields["on"] for t in self.tasks if t.id == task_id)
            description = escape(described(description, on))
        super().update(task_id, description=description, **kwargs)


class RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text(f"{task.speed:8.1f} {self.unit}/s" if task.speed else f"{'?':>8} {self.unit}/s")


def write_csv(rows: list[dict], columns, stream: TextIO | None = None) -> None:
    """Rows as CSV on stdout (None as an empty cell): what --csv prints."""
    import csv

    writer = csv.DictWriter(stream or sys.stdout, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
