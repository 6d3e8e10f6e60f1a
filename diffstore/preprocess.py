"""Images -> model input, as the paper does: resize the short side, center crop, match channels, scale to [-1, 1].

The Preprocess record is part of the dataset fingerprint, so two stores built with different resolutions,
channel conversions or flip views can never be mixed under one name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


@dataclass(frozen=True)
class Preprocess:
    size: int  # output H = W
    channels: int  # 1 (grey) or 3 (RGB)
    resize: str = "bicubic"
    crop: str = "center"
    flip: bool = False  # the horizontal-flip view (RepFusion's view bank)

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.resize not in RESAMPLE:
            raise ValueError(f"resize must be one of {sorted(RESAMPLE)}, got {self.resize!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def one(self, image: np.ndarray) -> np.ndarray:
        """uint8 HxW or HxWxC -> float32 CxSxS in [-1, 1]."""
        arr = np.asarray(self.pil(image), dtype=np.float32) / 127.5 - 1.0
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)

    def pil(self, image: np.ndarray) -> Image.Image:
        """uint8 HxW or HxWxC -> the S x S PIL image: resized, center-cropped, channels matched, flipped if asked."""
        pil = Image.fromarray(image if image.ndim == 2 or image.shape[2] != 1 else image[:, :, 0])
        pil = pil.convert("L" if self.channels == 1 else "RGB")
        w, h = pil.size
        scale = self.size / min(w, h)
        if (w, h) != (self.size, self.size):
            pil = pil.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))),
                             RESAMPLE[self.resize])
            w, h = pil.size
            left, top = (w - self.size) // 2, (h - self.size) // 2
            pil = pil.crop((left, top, left + self.size, top + self.size))
        if self.flip:
            pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
        return pil

    def __call__(self, images) -> "torch.Tensor":
        """A sequence of uint8 images (HxW or HxWxC, any sizes) -> float32 [B, C, S, S] in [-1, 1]."""
        import torch  # here, not at import: a re-run that finds everything stored never loads torch

        if isinstance(images, np.ndarray) and self.ready(images[0]):
            return torch.from_numpy(self.scale(images))
        images = [np.asarray(im) for im in images]
        if all(self.ready(im) for im in images):  # decoded at the model's size: stack the bytes, scale once
            return torch.from_numpy(self.scale(np.stack(images)))
        return torch.from_numpy(np.stack([self.scale(im[None])[0] if self.ready(im) else self.one(im)
                                          for im in images]))

    def ready(self, image: np.ndarray) -> bool:
        """uint8, already size x size, our channels, no flip: PIL would hand the pixels back unchanged."""
        grey = image.ndim == 2
        return (image.dtype == np.uint8 and not self.flip and image.shape[:2] == (self.size, self.size)
                and (grey if self.channels == 1 else image.ndim == 3 and image.shape[2] == 3))

    @staticmethod
    def scale(images: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W(, C)] -> float32 [B, C, H, W] in [-1, 1]: the values one() computes, batched, and the
        same memory layout as stacking one()'s outputs (channels-last for RGB: kernels may pick algorithms by it)."""
        import torch

        # a cast, then in-place divide and subtract: one()'s float32 roundings, 2.3x faster than a 256-entry table
        # gather (numpy widens every uint8 index to 64 bits): 0.35 vs 0.79 ms a 256px RGB image, stack included
        x = torch.from_numpy(np.asarray(images, dtype=np.uint8).astype(np.float32, order="C")).div_(127.5).sub_(1.0)
        arr = x.numpy()  # [B, H, W, C] in memory, as PIL gives
        return arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)
