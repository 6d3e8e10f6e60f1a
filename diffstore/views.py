"""Augmented views stored as rows: `extract --views flip` or `--views crops:K` (or both, `flip,crops:4`).

The seed paper probes with augmentation (random flips in its main recipe, random-resized crops in Table 6). Here a
view is a fixed transform of the preprocessed S x S image, recorded in the key: the identity (view 0), the
horizontal flip, and K random-resized crops (a box of 35-100% of the area with aspect 3/4-4/3, a random flip, drawn
once from --view-seed and resized back to S x S with the preprocessing's filter), the same on every machine. A split
extracted with views is the split named `{split}+{views}` (e.g. `train+flip`): its rows are (sample, view) pairs,
sample-major, every view of a sample in consecutive rows, each with the sample's id (so its noise) and label; its
source records the base split and the views, so its key can never be mixed with another. An array without views is
unchanged. `probe --augment` trains on those rows and evaluates on the test split's single view.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from .errors import DiffstoreError

AREA, RATIO = (0.35, 1.0), (3 / 4, 4 / 3)  # random-resized-crop ranges (torchvision's ratio; area for small images)


@dataclass(frozen=True)
class View:
    flip: bool = False
    box: tuple[float, float, float, float] | None = None  # (left, top, right, bottom) as fractions of S

    def to_dict(self) -> dict:
        return asdict(self)

    def apply(self, pil):
        """The view of a preprocessed S x S PIL image."""
        from PIL import Image

        if self.box is not None:
            s = pil.size[0]
            pil = pil.resize((s, s), Image.BICUBIC, box=tuple(v * s for v in self.box))
        return pil.transpose(Image.FLIP_LEFT_RIGHT) if self.flip else pil


def view_set(spec: str, seed: int = 0) -> list[View]:
    """'flip' | 'crops:K' | 'flip,crops:K' -> the identity first, then the flip, then K seeded crops."""
    views = [View()]
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item == "flip":
            views.append(View(flip=True))
        elif item.startswith("crops:") and item[6:].isdigit() and int(item[6:]) > 0:
            rng = np.random.default_rng([seed, 11])
            for _ in range(int(item[6:])):
                area = rng.uniform(*AREA)
                ratio = float(np.exp(rng.uniform(*np.log(RATIO))))
                w, h = min(1.0, np.sqrt(area * ratio)), min(1.0, np.sqrt(area / ratio))
                x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
                box = tuple(round(float(v), 6) for v in (x0, y0, x0 + w, y0 + h))
                views.append(View(flip=bool(rng.integers(2)), box=box))
        else:
            raise DiffstoreError(f"--views takes flip and crops:K (K >= 1), comma-separated, got {item!r}")
    if len(views) == 1:
        raise DiffstoreError("--views is empty: pass flip, crops:K or flip,crops:K")
    return views


def view_name(split: str, spec: str) -> str:
    """The split name of a view split: 'train' + 'flip,crops:4' -> 'train+flip+crops4'."""
    return "+".join([split, *(s.strip().replace(":", "") for s in spec.split(",") if s.strip())])


def view_split(split, spec: str, seed: int, preprocess):
    """The (sample, view) rows of `split` as a Split of its own (see the module docstring). Its images are the
    views rendered at the model's size, so the extraction's preprocessing passes them through unchanged."""
    views = view_set(spec, seed)
    v = len(views)
    rows = np.repeat(np.arange(len(split)), v)

    def load(positions):
        positions = np.asarray(positions)
        base = split.load(rows[positions])
        return [np.asarray(views[p % v].apply(preprocess.pil(np.asarray(im)))) for p, im in zip(positions, base)]

    source = {**split.source, "base_split": split.split, "views": [x.to_dict() for x in views], "view_seed": seed}
    return replace(split, split=view_name(split.split, spec), ids=np.repeat(split.ids, v),
                   labels=np.repeat(split.labels, v), source=source, load=load)
