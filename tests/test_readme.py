"""Every command in README.md and docs/*.md runs as printed: each indented code block's `diffstore ...` lines (and
the From Python block) run in order in a fresh folder, as a reader would paste them, each in its own fresh process
(forked from one that imported torch and diffusers once: conftest.Command), and must exit 0.

Not run: `make ...` and `python pipelines/...` lines (long recipes with their own docs; `make test` is this suite);
lines that need something you provide first, a cluster (`tcp://HOST`) or a downloaded dataset (`--data-root`),
and the later lines that read the store such a line writes.
"""

import re
import shlex
from pathlib import Path

from conftest import run_command

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # README's tour first: docs read its store
SKIP = ("tcp://HOST", "--data-root DIR", "s3://", "...")  # a cluster, your data, a bucket, elided options


def code_blocks(text: str) -> list[tuple[list[str], str]]:
    """Markdown indented code blocks (4 spaces, after a blank line), continuation lines joined, each with the text
    that follows it up to the next block."""
    blocks, current, prev_blank = [], None, True
    for line in text.splitlines():
        if line.startswith("    ") and (current is not None or prev_blank):
            current = current if current is not None else []
            current.append(line[4:])
        elif current is not None and not line.strip():
            current.append("")
        else:
            if current:
                blocks.append((current, ""))
            if blocks:
                blocks[-1] = (blocks[-1][0], blocks[-1][1] + line + "\n")
            current = None
        prev_blank = not line.strip()
    if current:
        blocks.append((current, ""))
    return [("\n".join(b).replace("\\\n", " ").splitlines(), after) for b, after in blocks]


def store_of(args: list[str]) -> str | None:
    return next((b for a, b in zip(args, args[1:]) if a in ("--store", "-s")), None)


def readme_steps() -> list[tuple[str, str, str | None]]:
    """("cli", command line, None) and ("python", code, what it prints) in README order: a Python block whose text
    after it ends with "prints:" must print the next block, as shown."""
    steps, unavailable = [], set()  # stores written by skipped lines
    blocks = [b for page in PAGES for b in code_blocks(page.read_text())]
    for i, (block, after) in enumerate(blocks):
        if block and block[0].startswith("import diffstore"):
            shown = "\n".join(blocks[i + 1][0]).strip() if after.strip().endswith("prints:") else None
            steps.append(("python", "\n".join(block), shown))
            continue
        for line in block:
            if not line.startswith("diffstore "):
                continue
            long = "# minutes of CPU" in line  # a measurement's recipe, not a tour step
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            store = store_of(shlex.split(line))
            if long or any(s in line for s in SKIP) or (store and store in unavailable):
                unavailable.add(store)
                continue
            steps.append(("cli", line, None))
    return steps


def test_readme_has_a_tour_and_a_python_block():
    kinds = [k for k, *_ in readme_steps()]
    assert kinds.count("cli") >= 10 and kinds.count("python") >= 1


def photos(root: Path) -> None:
    """photos/{train,test}/{circle,square}/*.png: what README's own-images quickstart reads."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 6)):
        for c, name in enumerate(("circle", "square")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (24, 24), dtype=np.uint8) + np.uint8(120 * c)
                Image.fromarray(img).save(root / split / name / f"{i}.png")


def test_every_readme_command_runs_as_printed(tmp_path):
    photos(tmp_path / "photos")
    for kind, step, shown in readme_steps():
        if kind == "cli":
            done = run_command(shlex.split(step)[1:], cwd=tmp_path)
        else:
            done = run_command([], cwd=tmp_path, code=step)
        assert done.returncode == 0, f"README step failed (exit {done.returncode}):\n{step}\n{done.stderr[-3000:]}"
        if shown is not None:  # the output a page shows is the output a reader gets
            assert [ln.rstrip() for ln in done.stdout.strip().splitlines()] == shown.splitlines(), done.stdout
    assert list((tmp_path / "data").glob("tour-repfusion/*/policy.png")), "analyze writes its PNGs beside the store"
