"""The options of `diffstore repfusion targets|train|finetune|analyze`: one dataclass per command, each field
with its help text (the CLI builds its options from these, so names and help live in one place).

Torch-free on purpose: `diffstore --help` and `diffstore repfusion train --help` read these without importing
the modules that run the work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..key import DEFAULT_STORE
from ..options import Options, device_opt, opt, progress_opt

DEFAULT_LAYER = "mid-conv"


def targets_opt():
    return opt(None, "Targets path in the store (default: the store's only targets).")


@dataclass(frozen=True)
class TargetsConfig(Options):
    store: str = opt(DEFAULT_STORE, "Store path or fsspec URL.")
    dataset: str = opt("digits", "digits | mnist | fashion-mnist | cifar10 | imagefolder.")
    split: str = opt("train", "The split whose targets are computed.", choices=("train", "test"))
    data_root: str | None = opt(None, "Dataset directory (default: $DIFFSTORE_DATA/<dataset>).")
    limit: int | None = opt(None, "Only the first N samples of the split (recorded in the fingerprint; "
                                  "the split keeps its name).", min=1)
    model: str = opt("default", "Teacher: default | FOLDER | owner/name | adm:PATH.pt | py:FILE.py:FACTORY.")
    layer: str = opt(DEFAULT_LAYER, "mid-conv (the mid block's last conv, the paper code's choice), a block index "
                                    "or name, or a module path.")
    t_grid: str = opt("0:1000:50", "Grid of t the policy picks from: start:stop:step ranges and "
                                   "integers (K = 20 by default).")
    views: str = opt("flip", "View bank: none | flip | flip,crops:N (identity first, then the "
                             "flip, then N seeded crops).")
    input: str = opt("clean", "clean (x_0, t only in the time embedding, as RepFusion's code) | noised (x_t).",
                     choices=("clean", "noised"))
    noise_seed: int = opt(0, "Noise seed (noised input).", min=0)
    noise_draws: int = opt(1, "Average the targets over this many noise draws.", min=1)
    maps: bool = opt(False, "Also store the spatial maps (needed by --loss at).")
    view_seed: int = opt(0, "Seed of the view bank (crop offsets).", min=0)
    batch_size: int = opt(128, "Images per forward step (does not change values).", min=1)
    shard_rows: int | None = opt(None, "Rows per shard (default: sized to the target row).", min=1)
    compute_dtype: str = opt("float32", "float32 | bfloat16 | float16 (autocast).",
                             choices=("float32", "bfloat16", "float16"))
    dtype: str = opt("float16", "Storage dtype: float16 | float32.", choices=("float16", "float32"))
    device: str = device_opt()
    show_progress: bool = progress_opt()


@dataclass(frozen=True)
class DistillConfig(Options):
    store: str = opt(DEFAULT_STORE, "Store holding the targets.")
    targets: str | None = targets_opt()
    student: str = opt("resnet18", "resnet18 | wrn28-2 | mobilenetv2.", choices=("resnet18", "wrn28-2", "mobilenetv2"))
    width: float = opt(0.25, "Channel multiplier of the student (1.0 = the published student; CPU default a quarter).",
                       min=0.01)
    loss: str = opt("hint", "hint | at (attention transfer, needs targets with --maps) | rkd.",
                    choices=("hint", "at", "rkd"))
    epochs: int = opt(3, "Distillation epochs.", min=1)
    batch_size: int = opt(64, "Images per step.", min=2)
    lr: float = opt(0.05, "Student learning rate.", min=1e-12)
    policy_lr: float = opt(1e-3, "Policy learning rate.", min=1e-12)
    entropy: float = opt(0.1, "Entropy bonus of the policy at the start; decays linearly to 0.", min=0)
    baseline: bool = opt(True, "Subtract the batch-mean reward in REINFORCE (--no-baseline: plain REINFORCE).")
    decoder_steps: int = opt(500, "Steps fitting the frozen decoder g on the stored targets.", min=1)
    seed: int = opt(0, "Seed of initialisation, data order and policy samples.", min=0)
    device: str = device_opt()
    run: str | None = opt(None, "Name of the run (default: derived from the settings).")
    show_progress: bool = progress_opt()

    def run_name(self, targets_fingerprint: str) -> str:
        import dataclasses

        from ..key import fingerprint

        settings = {k: v for k, v in dataclasses.asdict(self).items()
                    if k not in ("store", "targets", "device", "run", "show_progress")}
        return self.run or f"{self.student}-{self.loss}-{fingerprint([settings, targets_fingerprint])[:8]}"


@dataclass(frozen=True)
class FinetuneConfig(Options):
    store: str = opt(DEFAULT_STORE, "Store holding the distill run.")
    run: str | None = opt(None, "Distill run to fine-tune (default: the latest one).")
    epochs: int = opt(3, "Fine-tuning epochs (the no-distillation baseline gets the same).", min=1)
    batch_size: int = opt(64, "Images per step.", min=2)
    lr: float = opt(0.05, "Learning rate.", min=1e-12)
    seed: int = opt(0, "Seed shared by the distilled student and the baseline.", min=0)
    device: str = device_opt()
    show_progress: bool = progress_opt()


@dataclass(frozen=True)
class AnalyzeConfig(Options):
    store: str = opt(DEFAULT_STORE, "Store holding the targets.")
    targets: str | None = targets_opt()
    out: str | None = opt(None, "Folder for the PNGs (default: beside the store, STORE-repfusion/).")
    tsne_ts: int = opt(4, "t-SNE at this many grid points, evenly spread.", min=1)
    tsne_points: int = opt(500, "Samples in each t-SNE.", min=2)
    seed: int = opt(0, "Seed of the t-SNE sample and embedding.", min=0)
    show_progress: bool = progress_opt()

    def out_dir(self) -> Path:
        """Where the PNGs go: --out, else a folder beside a local store
        (data/default.zarr -> data/default-repfusion)."""
        return Path(self.out) if self.out else beside_store(self.store, "repfusion")


def beside_store(url: str, what: str) -> Path:
    """A folder next to a local store for its plots: data/default.zarr -> data/default-{what}/. An object-store
    URL has no local neighbour, so the caller must name a folder."""
    from ..errors import DiffstoreError

    if "://" in url and not url.startswith("file://"):
        raise DiffstoreError(f"{url} is not a local path, so its plots have no folder beside it: pass --out DIR")
    p = Path(url.removeprefix("file://")).expanduser()
    return p.with_name(f"{p.name.removesuffix('.zarr')}-{what}")
