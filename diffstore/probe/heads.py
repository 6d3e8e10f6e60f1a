"""The paper's four classification heads on cached feature maps [N, C, H, W] (H = W = p for pooled keys).

    linear     adaptive avg pool (to the stored size unless HeadSpec.pool says smaller), flatten, [BatchNorm], linear
    mlp        the same pooling and flattening, then Linear-ReLU per hidden size, linear
    cnn        2 x (2x2 conv + ReLU + 2x2 max-pool), 2x2 adaptive avg pool, flatten, linear; each conv is
               zero-padded right/bottom so it keeps the map size and a 4x4 map survives both pools
    attention  adaptive avg pool to at most 8x8 tokens, project to dim, learned CLS + position embeddings,
               N pre-LayerNorm Transformer blocks (multi-head attention + MLP), classify from CLS
    fusion     the attention head over the tokens of several keys (t, block) at once (FusionHead; which keys and
               the comparison table: fusion.py)
    knn        no weights: DINO's weighted k-nearest-neighbour vote over the training rows: knn.py

Every head starts with a Standardize layer holding the per-channel mean/std of its training features, so a
saved head carries its own normalisation and heads on very different blocks train with one learning rate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import DiffstoreError
from .options import FUSION, HEADS, KINDS, KNN  # noqa: F401 (HEADS: re-exported)

# The smallest stored map side each head can use: conv+pool twice needs 4x4, attention needs several tokens;
# fusion reads a 1x1 key as one token.
MIN_SIDE = {"linear": 1, "mlp": 1, "cnn": 4, "attention": 2, FUSION: 1, KNN: 1}
MAX_TOKENS_SIDE = 8


@dataclass(frozen=True)
class HeadSpec:
    kind: str = "linear"
    pool: int | None = None  # linear/mlp/knn: pool the map to pool x pool first; None keeps the stored size
    batchnorm: bool = False  # linear: BatchNorm1d (no affine) before the linear layer, as MAE's linear probe
    hidden: tuple[int, ...] = (512,)  # mlp
    channels: tuple[int, ...] = (64, 64)  # cnn: the two conv blocks
    dim: int = 128  # attention, fusion: token width
    depth: int = 1  # attention, fusion: Transformer blocks
    n_heads: int = 4  # attention, fusion
    keys: tuple = ()  # fusion: (channels, token side, t, block) of each fused key, in token order

    def __post_init__(self):
        if self.kind not in KINDS:
            raise DiffstoreError(f"unknown head {self.kind!r}: choose one of {', '.join(KINDS)}")
        if self.kind == "cnn" and len(self.channels) != 2:
            raise DiffstoreError(f"the cnn head has 2 conv blocks: pass 2 channel counts, got {self.channels}")
        if self.kind in ("attention", FUSION) and self.dim % self.n_heads:
            raise DiffstoreError(f"attention dim {self.dim} must be divisible by the number of heads {self.n_heads}")

    def to_dict(self) -> dict:
        """Only the fields this kind of head uses: the dict names a result, so unused options must not split it."""
        used = {"linear": ("pool", "batchnorm"), "mlp": ("pool", "hidden"), "cnn": ("channels",),
                "attention": ("dim", "depth", "n_heads"), FUSION: ("pool", "dim", "depth", "n_heads", "keys"),
                KNN: ("pool",)}[self.kind]
        d = asdict(self)
        return {"kind": self.kind, **{k: [list(v) if isinstance(v, tuple) else v for v in d[k]]
                                      if isinstance(d[k], tuple) else d[k] for k in used}}

    @classmethod
    def from_dict(cls, d: dict) -> "HeadSpec":
        """The spec to_dict wrote (lists back to tuples; a fusion head's keys to tuples of tuples)."""
        keys = tuple(tuple(k) for k in d.get("keys", ()))
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k != "keys"}, keys=keys)

    def label(self) -> str:
        return self.kind + ("+bn" if self.kind == "linear" and self.batchnorm else "")


class Standardize(nn.Module):
    """(x - mean) / std per channel, with the statistics of the training features as buffers."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float().view(1, -1, 1, 1))
        self.register_buffer("std", std.float().clamp_min(1e-6).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def pooled_flat(channels: int, side: int, pool: int | None) -> tuple[nn.Module, int]:
    p = side if pool is None else min(pool, side)
    return nn.Sequential(nn.AdaptiveAvgPool2d(p), nn.Flatten()), channels * p * p


class CNNHead(nn.Module):
    def __init__(self, c: int, n_classes: int, channels: tuple[int, int]):
        super().__init__()
        c1, c2 = channels
        self.body = nn.Sequential(
            nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(c, c1, 2), nn.ReLU(), nn.MaxPool2d(2),
            nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(c1, c2, 2), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(c2 * 4, n_classes))

    def forward(self, x):
        return self.body(x)


def transformer(dim: int, depth: int, n_heads: int) -> nn.TransformerEncoder:
    """`depth` pre-LayerNorm Transformer blocks (attention + 4x MLP, GELU, no dropout) over [B, tokens, dim]."""
    layer = nn.TransformerEncoderLayer(dim, n_heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class AttentionHead(nn.Module):
    def __init__(self, c: int, side: int, n_classes: int, dim: int, depth: int, n_heads: int):
        super().__init__()
        self.side = min(side, MAX_TOKENS_SIDE)
        self.proj = nn.Linear(c, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + self.side ** 2, dim) * 0.02)
        self.blocks = transformer(dim, depth, n_heads)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, n_classes)

    def forward(self, x):
        tokens = self.proj(nn.functional.adaptive_avg_pool2d(x, self.side).flatten(2).transpose(1, 2))
        h = torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1) + self.pos
        return self.out(self.norm(self.blocks(h))[:, 0])


class FusionHead(nn.Module):
    """Tokens of every key (channels, token side, t, block), projected to `dim`, + t, block and position
    embeddings; CLS + Transformer blocks; linear classifier on CLS."""

    def __init__(self, keys: tuple, n_classes: int, dim: int, depth: int, n_heads: int):
        super().__init__()
        if len(keys) < 2:
            raise DiffstoreError("the fusion head needs at least two keys: pass --fuse KEYS or --fuse auto --select K")
        self.keys = [tuple(k) for k in keys]
        ts, blocks, sides = (sorted({k[i] for k in self.keys}) for i in (2, 3, 1))
        self.index = [(ts.index(t), blocks.index(b), sides.index(s)) for _, s, t, b in self.keys]
        self.proj = nn.ModuleList(nn.Linear(c, dim) for c, *_ in self.keys)
        self.t_emb = nn.Parameter(torch.randn(len(ts), dim) * 0.02)
        self.block_emb = nn.Parameter(torch.randn(len(blocks), dim) * 0.02)
        self.pos = nn.ParameterList(nn.Parameter(torch.randn(s * s, dim) * 0.02) for s in sides)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = transformer(dim, depth, n_heads)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, n_classes)

    def forward(self, x):
        flat, start, tokens = x.flatten(1), 0, [self.cls.expand(len(x), -1, -1)]
        for (c, s, _, _), proj, (ti, bi, si) in zip(self.keys, self.proj, self.index):
            part = flat[:, start:start + c * s * s].view(len(x), c, s * s).transpose(1, 2)
            start += c * s * s
            tokens.append(proj(part) + self.pos[si] + self.t_emb[ti] + self.block_emb[bi])
        return self.out(self.norm(self.blocks(torch.cat(tokens, 1)))[:, 0])


def check_spatial(spec: HeadSpec, row_shape: tuple, what: str, fix: str) -> None:
    """Refuse a head that needs spatial maps on a key that stores only small pooled maps; `fix` names the extract."""
    side = min(row_shape[1:])
    need = MIN_SIDE[spec.kind]
    if side < need:
        raise DiffstoreError(
            f"the {spec.kind} head needs spatial maps of at least {need}x{need}, but {what} holds "
            f"{row_shape[1]}x{row_shape[2]} pooled maps. {fix}")


def build_head(spec: HeadSpec, row_shape: tuple, n_classes: int, mean: torch.Tensor, std: torch.Tensor,
               what: str = "the input", fix: str = "Extract it with `--pools full` (or a larger p).") -> nn.Module:
    """A head for rows of shape [C, H, W]; `what`/`fix` word the refusal when the map is too small."""
    if len(row_shape) != 3:
        raise DiffstoreError(f"{what} has rows of shape {tuple(row_shape)}; heads need [C, H, W] maps")
    check_spatial(spec, row_shape, what, fix)
    c, side = row_shape[0], min(row_shape[1:])
    if spec.kind == "linear":
        flat, d = pooled_flat(c, side, spec.pool)
        head = nn.Sequential(flat, *([nn.BatchNorm1d(d, affine=False)] if spec.batchnorm else []),
                             nn.Linear(d, n_classes))
    elif spec.kind == "mlp":
        flat, d = pooled_flat(c, side, spec.pool)
        layers = [flat]
        for h in spec.hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        head = nn.Sequential(*layers, nn.Linear(d, n_classes))
    elif spec.kind == "cnn":
        head = CNNHead(c, n_classes, spec.channels)
    elif spec.kind == "attention":
        head = AttentionHead(c, side, n_classes, spec.dim, spec.depth, spec.n_heads)
    else:
        head = FusionHead(spec.keys, n_classes, spec.dim, spec.depth, spec.n_heads)
    return nn.Sequential(Standardize(mean, std), head)


def top_hits(scores: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 and top-5 hits (bool [..., n] each) of scores [..., n, K] against the labels y [n]."""
    top = scores.topk(min(5, scores.shape[-1]), -1).indices
    return top[..., 0] == y, (top == y[:, None]).any(-1)


def n_params(head: nn.Module) -> int:
    return sum(p.numel() for p in head.parameters() if p.requires_grad)
