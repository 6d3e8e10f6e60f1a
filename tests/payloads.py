"""A hostile colleague (issue 21): payloads planted in a shared store's attributes, files that announce it (a
marker file) when anything runs, imports, unpickles or reads them, and a guard that records every open of one.

Test-only code (not shipped), used by tests/test_hostile.py and, through hostile.py, bench/bench_faults.py:

    planted = plant(store, marker)   # payloads that write `marker` if anything runs them
    with Guard(planted) as guard:    # records every open of a payload and every network connection
        cli("repair", "--store", ...)
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

MARKER = "PWNED"  # the file every payload writes when it runs

# --- payloads: files that announce it when anything runs, imports, unpickles or reads them -------------------
PY_PAYLOAD = """from pathlib import Path
Path({marker!r}).write_text("imported")


def factory(random_init=None):
    Path({marker!r}).write_text("factory ran")
    raise SystemExit(0)
"""


class Unpickled:
    """Unpickling this writes the marker: what a malicious pickled checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return Path.write_text, (Path(self.marker), "unpickled")


def pickled_model(folder: Path, marker: Path) -> Path:
    """A diffusers model folder (the shipped model's config) whose weights are a pickled .bin holding a payload."""
    from diffstore.models import DEFAULT_DIR

    folder.mkdir(parents=True)
    for name in ("config.json", "scheduler_config.json"):
        shutil.copy(DEFAULT_DIR / name, folder / name)
    (folder / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"conv_in.weight": Unpickled(marker)}))
    return folder


def image_folder(root: Path, good: int = 4, bad: int = 1, kind: str = "png") -> Path:
    """root/test/{a,b}/: `good` readable images and `bad` truncated ones (their first 60 bytes), of format `kind`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(good + bad):
        path = root / "test" / "ab"[i % 2] / f"{'bad' if i >= good else 'ok'}{i}.{kind}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(path)
        if i >= good:
            path.write_bytes(path.read_bytes()[:60])
    return root


@dataclass
class Planted:
    """Payloads planted in a store's attributes; `marker` must never appear."""

    store: Path
    marker: Path
    payloads: list[Path] = field(default_factory=list)  # files and folders nothing may open

    def ran(self) -> bool:
        return self.marker.exists()


def edit_attrs(group: Path, change: Callable[[dict], None]) -> None:
    """Edit a node's attributes in its zarr.json by hand, as anyone with write access to the bucket can."""
    meta_file = group / "zarr.json"
    meta = json.loads(meta_file.read_text())
    change(meta.setdefault("attributes", {}))
    meta_file.write_text(json.dumps(meta))


def plant(store: Path, marker: Path) -> Planted:
    """Payloads in a folder inside `store`, named by every feature array's attributes (name_payloads) and by every
    split's dataset root; every array also loses one done flag, so that verify says `repair`."""
    planted = Planted(store, marker)
    evil = store / "evil"
    evil.mkdir()
    (evil / "plugin.py").write_text(PY_PAYLOAD.format(marker=str(marker)))
    pickled_model(evil / "pickled", marker)
    (evil / "adm.json").write_text(json.dumps({"image_size": 16, "num_channels": 8}))
    image_folder(evil / "images")
    planted.payloads += [evil / "plugin.py", evil / "pickled", evil / "adm.json", evil / "images"]
    for array in name_payloads(planted, "features"):
        (array / "done" / "c" / "0").unlink()
    for split in (p.parent for p in store.glob("datasets/*/*/zarr.json")):
        edit_attrs(split, lambda attrs: attrs["source"].update(root=str(evil / "images")))
    return planted


def name_payloads(planted: Planted, under: str) -> list[Path]:
    """Every array under `under` (features, targets) names a payload in its attributes, one kind per array in turn:
    a py: spec of a file inside the store (absolute, and relative to the store's folder, the working directory), a
    hub id, a pickled .bin folder inside the store, the adm: backend with an ADM config JSON; and all of them a
    dataset root that is a folder of images. Returns the arrays."""
    store, evil = planted.store, planted.store / "evil"
    specs = [f"py:{evil / 'plugin.py'}:factory", f"py:{store.name}/evil/plugin.py:factory", "owner/evil-model",
             str(evil / "pickled"), f"adm:{evil / 'pickled' / 'diffusion_pytorch_model.bin'}"]
    arrays = sorted(p.parent.parent for p in store.glob(f"{under}/**/done/zarr.json"))
    for i, array in enumerate(arrays):
        def change(attrs, spec=specs[i % len(specs)]):
            attrs["model"]["source"] = {"spec": spec, "path": str(evil / "pickled"), "factory": "factory",
                                        "adm_config": str(evil / "adm.json"), "file": str(evil / "plugin.py")}
            attrs["dataset"]["source"]["root"] = str(evil / "images")
            attrs["provenance"]["weights"] = str(evil / "pickled" / "diffusion_pytorch_model.bin")

        edit_attrs(array, change)
    return arrays


class Guard:
    """Within: every open or listing of a payload (nothing can import, unpickle or decode a file without opening it)
    and every network connection or name lookup is recorded (an audit hook: it sees what the interpreter does,
    whichever library does it). `guard.events` lists them."""

    hooked: list["Guard"] = []  # audit hooks cannot be removed: one hook, reporting to the guards now active
    installed = False

    def __init__(self, planted: Planted):
        self.paths = [str(p) for p in planted.payloads]
        self.events: list[tuple] = []

    @staticmethod
    def hook(event: str, args: tuple) -> None:
        for guard in Guard.hooked:
            guard.seen(event, args)

    def seen(self, event: str, args: tuple) -> None:
        if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(args[0]))
            if any(path == p or path.startswith(p + os.sep) for p in self.paths):
                self.events.append((event, path))
        elif event in ("socket.connect", "socket.getaddrinfo"):
            self.events.append((event, *map(str, args[:2])))

    def __enter__(self) -> "Guard":
        if not Guard.installed:
            sys.addaudithook(Guard.hook)
            Guard.installed = True
        Guard.hooked.append(self)
        return self

    def __exit__(self, *_) -> None:
        Guard.hooked.remove(self)
