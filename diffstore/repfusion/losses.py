"""Distillation losses between a student's last feature map and the teacher target z(t).

    hint   FitNets-style: a 1x1 conv projects the student map to the teacher's channels, both sides are
           globally average-pooled and compared with MSE (RepFusion's default, on the pooled mid-block target)
    at     attention transfer (Zagoruyko & Komodakis): channel-mean of |F|^2, L2-normalised per sample,
           compared with MSE; needs the teacher's spatial map (`repfusion targets --maps`)
    rkd    relational KD (Park et al.): distance (weight 25) + angle (weight 50) structure of the batch,
           smooth-L1, on pooled features; channel counts need not match
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DiffstoreError

LOSSES = ("hint", "at", "rkd")
NEEDS_MAP = ("at",)


def hint_loss(projected_map: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(projected_map.mean((2, 3)), z)


def attention_map(feature_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, C, H, W] -> [B, h*w] unit-norm attention; resized to the teacher's h x w when the sides differ."""
    a = feature_map.pow(2).mean(1, keepdim=True)
    if a.shape[-2:] != size:
        a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
    return F.normalize(a.flatten(1), dim=1)


def attention_transfer(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    size = tuple(teacher_map.shape[-2:])
    return (attention_map(student_map, size) - attention_map(teacher_map, size)).pow(2).mean()


def _normalised_distances(x: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(x, x)
    return d / d[d > 0].mean().clamp_min(1e-12)


def _angles(x: torch.Tensor) -> torch.Tensor:
    e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), dim=2)  # e[i, j]: unit vector from x_i to x_j
    return torch.bmm(e, e.transpose(1, 2)).flatten()  # cos of the angle at x_i between x_j and x_k


def rkd_loss(s: torch.Tensor, z: torch.Tensor, w_distance: float = 25.0, w_angle: float = 50.0) -> torch.Tensor:
    distance = F.smooth_l1_loss(_normalised_distances(s), _normalised_distances(z).detach())
    angle = F.smooth_l1_loss(_angles(s), _angles(z).detach())
    return w_distance * distance + w_angle * angle


class Distiller(nn.Module):
    """The student-side part of distillation: the projection (trained with the student) and the loss."""

    def __init__(self, loss: str, student_channels: int, teacher_channels: int):
        super().__init__()
        if loss not in LOSSES:
            raise DiffstoreError(f"unknown distillation loss {loss!r}: choose one of {', '.join(LOSSES)}")
        self.loss = loss
        self.proj = nn.Conv2d(student_channels, teacher_channels, 1) if loss == "hint" else None

    def forward(self, student_map: torch.Tensor, z: torch.Tensor, z_map: torch.Tensor | None = None) -> torch.Tensor:
        if self.loss == "hint":
            return hint_loss(self.proj(student_map), z)
        if self.loss == "at":
            if z_map is None:
                raise DiffstoreError("the 'at' loss needs the teacher's spatial maps: run `diffstore "
                                     "repfusion targets --maps`")
            return attention_transfer(student_map, z_map)
        return rkd_loss(student_map.mean((2, 3)), z)
