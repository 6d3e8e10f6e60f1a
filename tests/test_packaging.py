"""Packaging: installing diffstore into an environment that already has its own torch keeps that torch."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def dry_run_install(project: Path, fake_site: Path, report: Path) -> list[tuple[str, str]]:
    """What `pip install .` would install, offline, with fake_site first on the path (its torch is the one
    pip sees installed)."""
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-build-isolation", "--no-index",
                           "--quiet", "--report", str(report), "."], cwd=project, capture_output=True, text=True,
                          env={"PYTHONPATH": str(fake_site), "PATH": "/usr/bin:/bin"})
    if not report.exists():
        pytest.fail(f"pip could not resolve the install: {done.stderr[-2000:]}")
    return [(i["metadata"]["name"], i["metadata"]["version"]) for i in json.loads(report.read_text())["install"]]


def test_pip_install_keeps_another_torch_release_that_satisfies_the_range(tmp_path):
    pytest.importorskip("setuptools")
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "diffstore", project / "diffstore", ignore=shutil.ignore_patterns("__pycache__"))
    # Another torch release than the one installed here, as a CUDA machine would have: only its metadata.
    meta = tmp_path / "site" / "torch-2.5.1.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.5.1\n")
    (meta / "RECORD").write_text("")
    assert dry_run_install(project, tmp_path / "site", tmp_path / "report.json") == [("diffstore", "0.1.0")]
