"""Provenance a paper can cite: which command, code, machine and person produced an array or a result, and when.

Recorded on every array group (at creation; `finished` when this process completes it) and every stored result
(`finished` at write time). Credentials never land in a store: URLs lose their user:password@ part and secret-named
query parameters, and --storage-options its secret values. Nothing here runs git or imports torch: the commit is
read from .git, the device from a torch this process has already imported.
"""

from __future__ import annotations

import datetime
import getpass
import json
import platform
import re
import shlex
import socket
import sys
import time
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..errors import redact

PACKAGES = ("diffstore", "torch", "diffusers", "zarr", "numpy")
IMPORTED = time.time()  # start time when the process's own is unknown (no psutil)
SECRET_NAME = r"secret|token|passw|key|credential|signature|sig|auth"
SECRET_OPTIONS = ("--storage-options",)  # options whose value is a JSON dict of filesystem settings


def redact_options(value: str) -> str:
    """A --storage-options value with the values of secret-named keys replaced by ***; all of it when unreadable."""
    def hide(v):
        if isinstance(v, dict):
            return {k: "***" if re.search(SECRET_NAME, str(k), re.IGNORECASE) and not isinstance(x, (dict, list))
                    else hide(x) for k, x in v.items()}
        if isinstance(v, list):
            return [hide(x) for x in v]
        return redact(v) if isinstance(v, str) else v

    try:
        return json.dumps(hide(json.loads(value)), sort_keys=True)
    except ValueError:
        return "***"


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed (program name without its folder), credentials redacted."""
    argv = list(sys.argv if argv is None else argv) or [""]
    out, secret_next = [Path(argv[0]).name], False
    for arg in argv[1:]:
        flag, eq, value = arg.partition("=")
        if secret_next:
            out.append(redact_options(arg))
        elif flag in SECRET_OPTIONS and eq:
            out.append(f"{flag}={redact_options(value)}")
        else:
            out.append(redact(arg))
        secret_next = arg in SECRET_OPTIONS
    return shlex.join(out)


@cache
def git_commit() -> str | None:
    """The commit of the git checkout diffstore runs from (read from .git without running git); None otherwise."""
    root = Path(__file__).resolve().parents[2]
    git = root / ".git"
    try:
        if not (root / "pyproject.toml").is_file():
            return None
        if git.is_file():  # a worktree or submodule: "gitdir: PATH"
            git = (root / git.read_text().split("gitdir:", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            common = (git / (git / "commondir").read_text().strip()) if (git / "commondir").is_file() else git
            loose = [base / ref for base in (git, common) if (base / ref).is_file()]
            packed = [line.split()[0] for line in (common / "packed-refs").read_text().splitlines()
                      if line.endswith(f" {ref}")] if not loose and (common / "packed-refs").is_file() else []
            head = loose[0].read_text().strip() if loose else (packed[0] if packed else "")
    except (OSError, IndexError, ValueError):
        return None
    return head if re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", head) else None


@cache
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_name() -> str:
    """The accelerator this process computed on: a CUDA device once torch initialised one, else the CPU."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return f"cuda: {torch.cuda.get_device_name()}"
    return f"cpu: {cpu_name()}"


def started() -> float:
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - no psutil, or a platform it cannot read: the import time is close
        return IMPORTED


def user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a name
        return None


def iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def provenance(finished: bool = False) -> dict:
    """This process's provenance; `finished`: the record is written when the work is done (results)."""
    now, packages = time.time(), versions()
    return {"command": command_line(), "diffstore": packages.get("diffstore"), "git_commit": git_commit(),
            "packages": packages, "python": platform.python_version(), "device": device_name(),
            "host": socket.gethostname(), "user": user(), "started": iso(started()), "time": iso(now),
            **({"finished": iso(now)} if finished else {})}
