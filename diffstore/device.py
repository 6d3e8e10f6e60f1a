"""Device choice, shared by every stage: 'auto' is CUDA when present, else the CPU.

A device the machine does not have is refused here, naming what it has, rather than failing deep inside torch.
"""

from __future__ import annotations

import torch

from .errors import DiffstoreError


def pick_device(device: str | None = "auto") -> torch.device:
    """'auto' (or None): CUDA when present, else the CPU; anything else as torch names it, checked to exist."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DiffstoreError(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DiffstoreError(f"--device {device}: this machine has no CUDA device; use --device cpu (or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DiffstoreError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise DiffstoreError(f"--device {device}: diffstore runs on cpu or cuda (or mps); use --device auto")
    return dev
