"""CLI habits: every option says what it does, booleans can be switched both ways, start-up stays light."""

import subprocess
import sys

import typer.main

from diffstore.cli import app

# modes and confirmations: by presence
MODE_FLAGS = {"json", "as_json", "as_csv", "quiet", "list_results", "show_all", "version", "help", "yes"}


def all_commands(cmd, path: str = "diffstore"):
    yield path, cmd
    if hasattr(cmd, "commands"):  # a group (typer's own group class, whatever click it builds on)
        for name, sub in cmd.commands.items():
            yield from all_commands(sub, f"{path} {name}")


def test_every_option_of_every_command_has_help_and_booleans_have_a_no_form():
    missing, one_sided = [], []
    for path, cmd in all_commands(typer.main.get_command(app)):
        for p in cmd.params:
            if p.param_type_name != "option" or p.name == "help":
                continue
            if not (p.help or "").strip():
                missing.append(f"{path} {p.opts[0]}")
            if p.is_flag and p.is_bool_flag and not p.secondary_opts and p.name not in MODE_FLAGS:
                one_sided.append(f"{path} {p.opts[0]}")
    assert sum(1 for _ in all_commands(typer.main.get_command(app))) >= 13  # the walk reached every command
    assert not missing, f"options without help: {missing}"
    assert not one_sided, f"boolean options that cannot be switched off (need --no-x): {one_sided}"


def test_help_and_version_do_not_import_torch_or_matplotlib():
    code = ("import sys\nfrom diffstore.cli import app\n"
            "for argv in (['--help'], ['extract', '--help'], ['repfusion', 'train', '--help'], ['--version']):\n"
            "    try:\n        app(argv, standalone_mode=False)\n    except SystemExit:\n        pass\n"
            "heavy = [m for m in ('torch', 'matplotlib', 'zarr', 'numpy') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
