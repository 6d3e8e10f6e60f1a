"""docs/cli.md, the command-line reference, generated from the commands themselves (and so from each stage's
options dataclass): `python -m diffstore.reference > docs/cli.md` (`make docs`). tests/test_docs.py fails when the
file is stale."""

from __future__ import annotations

import typer.main

from .cli import app

HEADER = """# Command-line reference

Generated from the commands' options (`make docs`; do not edit by hand). Every stage command's options come from
one options dataclass (`diffstore/*/options.py`), which also gives the Python API its keywords: `--noise-seed 3` on
the command line is `noise_seed=3` in `ds.extract(...)`. A list option takes a comma list (`--t 10,50`) on the
command line and a scalar, a sequence or the same string from Python.
"""


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def option_row(p) -> str:
    """One parameter (typer's click) as a table row."""
    if p.param_type_name == "argument":
        return f"| `{p.name.upper()}...` (arguments) | | {cell(getattr(p, 'help', '') or '')} |"
    names = " / ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
    default = p.default if not callable(p.default) else ""
    shown = "" if default in (None, "", ()) or p.is_flag and default is False else f"`{default}`"
    return f"| {names} | {shown} | {cell(p.help or '')} |"


def commands(cmd, path: str = "diffstore"):
    if hasattr(cmd, "commands"):  # a group
        for name in cmd.commands:
            yield from commands(cmd.commands[name], f"{path} {name}")
    else:
        yield path, cmd


def render() -> str:
    out = [HEADER]
    for path, cmd in commands(typer.main.get_command(app)):
        out += [f"## `{path}`", "", cell(cmd.help or "").strip(), "", "| option | default | meaning |", "|---|---|---|"]
        out += [option_row(p) for p in cmd.params if p.name != "help"]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
