"""Progress bars for long work: rich, on stderr, so stdout stays clean for results."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

stderr = Console(stderr=True)


class RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text(f"{task.speed:8.1f} {self.unit}/s" if task.speed else f"{'?':>8} {self.unit}/s")


def progress(unit: str = "img", disable: bool = False) -> Progress:
    """A Progress with count, rate (`unit`/s) and ETA columns."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=stderr, disable=disable)
