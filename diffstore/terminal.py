"""Output that reads well on a terminal and greps well in a file.

A rich Console that cannot detect a width (a pipe, a log file, SLURM) uses 80 columns and hard-wraps every line
there, so a recipe name split over two lines no longer greps. `console()` gives a terminal its own width and
anything else unlimited lines. `fold(table, width)` lets a table on a narrow terminal wrap its cells instead of
cutting the key columns to 'datas…'.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # rich loads on first output, so `diffstore --help` never pays for it
    from rich.console import Console
    from rich.table import Table

UNWRAPPED = 100_000  # columns of a console writing to a file: in effect, no wrapping
KEY_COLUMNS = ("dataset", "split", "model", "input", "t", "block", "pool", "head", "recipe", "features", "rank")
NARROWEST = 4  # a folded column still shows this many characters a line


def console(stderr: bool = False) -> Console:
    """stdout (or stderr) at the terminal's width; at no width limit when it is a file or a pipe."""
    from rich.console import Console

    probe = Console(stderr=stderr)
    return probe if probe.is_terminal else Console(stderr=stderr, width=UNWRAPPED, soft_wrap=True)


def widths(texts) -> tuple[int, int]:
    """(longest line, longest word) of a column's header and cells."""
    texts = [str(t) for t in texts]
    return (max((len(line) for t in texts for line in t.splitlines()), default=1),
            max((len(word) for t in texts for word in t.split()), default=1))


def fold(table: Table, width: int) -> Table:
    """Fit `table` into `width` columns by wrapping cells, never by cutting them to '…'. A table too wide gets
    spaces instead of rules between columns; then the widest columns wrap at spaces ('93.3 [90.8, 95.6]' on three
    lines); then key columns fold inside words, the longest name first (a model name folds, 'dataset' stays
    whole), headers never; numbers fold only when nothing else is left."""
    from rich import box

    cols = table.columns
    for col in cols:
        col.overflow = "fold"
    natural, words = zip(*(widths([col.header, *col.cells]) for col in cols)) if cols else ((), ())
    if sum(natural) + overhead(table) <= width:
        return table
    table.box, table.show_edge, table.padding = box.SIMPLE_HEAD, False, (0, 0)
    spare, fit = width - overhead(table), list(natural)

    def give(i: int, floor: int) -> None:
        while sum(fit) > spare and fit[i] > floor:
            fit[i] -= 1

    while sum(fit) > spare:  # wrap at spaces: a character off the widest column that has one to spare
        wide = [i for i in range(len(cols)) if fit[i] > words[i]]
        if not wide:
            break
        fit[max(wide, key=fit.__getitem__)] -= 1
    for i in sorted((i for i, col in enumerate(cols) if str(col.header) in KEY_COLUMNS), key=lambda i: -words[i]):
        give(i, max(NARROWEST, widths([cols[i].header])[1]))  # a header stays whole
    for i in sorted(range(len(cols)), key=lambda i: -fit[i]):
        give(i, 1)
    for col, w in zip(cols, fit):
        col.width = w
    return table


def overhead(table: Table) -> int:
    """Columns taken by rules and cell padding."""
    n, (_, right, _, left) = len(table.columns), table.padding
    rules = (n - 1 + 2 * table.show_edge) if table.box else 0
    return rules + n * (left + right) - (0 if table.pad_edge else left + right)


def emit(rows: list[dict], title: str, as_json: bool, show: Callable[[dict], dict] | None = None) -> None:
    """Print a command's rows on stdout as JSON (the data as it is), or as a rich table (through `show`, which
    formats for people). Cells are Text: a name or path holding brackets is shown as it is, never read as markup."""
    if as_json:
        print(json.dumps(rows, indent=1, default=str))
        return
    from rich.table import Table
    from rich.text import Text

    rows = [show(r) for r in rows] if show else rows
    table = Table(title=Text(title))
    for col in (rows[0] if rows else {}):
        table.add_column(Text(str(col)), justify="right" if isinstance(rows[0][col], (int, float)) else "left")
    for row in rows:
        table.add_row(*[Text(f"{v:.4g}" if isinstance(v, float) else str(v)) for v in row.values()])
    out = console()
    out.print(fold(table, out.width))


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
