"""The guided-diffusion ADM U-Net (Dhariwal & Nichol 2021), written to load the official checkpoints strictly.

Module names and nesting reproduce the reference's state_dict exactly (time_embed.0, label_emb,
input_blocks.1.0.in_layers.2, middle_block.1.qkv, out.2; its parameter-free pieces - resamplers inside
ResBlocks, QKVAttention - are plain functions here), so an official .pt loads with strict=True. The forward
follows the reference op for op; the conformance vectors in shared/specs/adm/tiny check it to float32 precision.

    x -> input_blocks[0..N-1] -> middle_block -> output_blocks[0..N-1] (each fed cat[h, skip]) -> out

Block b of the paper is the output h of input_blocks.(b-1), then middle_block, then output_blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DiffstoreError

# create_model's channel_mult when the flag is "" (it has no default for other sizes).
DEFAULT_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
NUM_CLASSES = 1000  # ImageNet: every class-conditional guided-diffusion model


@dataclass(frozen=True)
class ADMNetConfig:
    """The network's shape, as the reference's UNetModel receives it from create_model."""

    image_size: int
    model_channels: int
    out_channels: int  # 6 with learn_sigma (eps and the variance interpolation v), else 3
    num_res_blocks: int
    attention_ds: tuple[int, ...]  # downsampling factors (image_size // resolution) that get attention
    channel_mult: tuple[float, ...]
    num_classes: int | None
    num_heads: int
    num_head_channels: int  # -1: use num_heads; else heads = channels // num_head_channels
    num_heads_upsample: int
    use_scale_shift_norm: bool
    resblock_updown: bool
    use_new_attention_order: bool
    dropout: float
    in_channels: int = 3

    @classmethod
    def from_flags(cls, flags: dict) -> "ADMNetConfig":
        """The translation create_model does from the command-line flags."""
        size, mult = int(flags["image_size"]), flags["channel_mult"]
        if isinstance(mult, str) and mult == "":
            if size not in DEFAULT_CHANNEL_MULT:
                raise DiffstoreError(f"ADM image_size {size} has no default channel_mult; set channel_mult "
                                     f"(e.g. \"1,2,2,2\") in the --adm-config JSON")
            mult = DEFAULT_CHANNEL_MULT[size]
        elif isinstance(mult, str):
            mult = tuple(int(m) for m in mult.split(","))
        heads = int(flags["num_heads"])
        return cls(
            image_size=size,
            model_channels=int(flags["num_channels"]),
            out_channels=6 if flags["learn_sigma"] else 3,
            num_res_blocks=int(flags["num_res_blocks"]),
            attention_ds=tuple(size // int(r) for r in str(flags["attention_resolutions"]).split(",") if r.strip()),
            channel_mult=tuple(mult),
            num_classes=NUM_CLASSES if flags["class_cond"] else None,
            num_heads=heads,
            num_head_channels=int(flags["num_head_channels"]),
            num_heads_upsample=heads if int(flags["num_heads_upsample"]) == -1 else int(flags["num_heads_upsample"]),
            use_scale_shift_norm=bool(flags["use_scale_shift_norm"]),
            resblock_updown=bool(flags["resblock_updown"]),
            use_new_attention_order=bool(flags["use_new_attention_order"]),
            dropout=float(flags["dropout"]),
        )


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) time steps, in float32 like the reference."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32 groups) computed in float32 whatever the activations' dtype (fp16 stays stable)."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def upsample(x):
    return F.interpolate(x, scale_factor=2, mode="nearest")


def downsample(x):
    return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv (used between levels when resblock_updown is off)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(upsample(x))


class Downsample(nn.Module):
    """Strided 3x3 conv (used between levels when resblock_updown is off)."""

    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    """norm-act-conv, time embedding (as scale and shift of the second norm, or added), norm-act-drop-conv,
    plus skip. resample "up"/"down" resizes both paths between the first activation and conv."""

    def __init__(self, ch: int, emb_ch: int, out_ch: int, dropout: float, scale_shift: bool,
                 resample: str | None = None):
        super().__init__()
        self.scale_shift, self.resample = scale_shift, {"up": upsample, "down": downsample, None: None}[resample]
        self.in_layers = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, 2 * out_ch if scale_shift else out_ch))
        self.out_layers = nn.Sequential(GroupNorm32(out_ch), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x, emb):
        h = self.in_layers[:-1](x)
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.in_layers[-1](h)
        e = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


def qkv_attention(qkv: torch.Tensor, heads: int, new_order: bool, sdpa: bool = False) -> torch.Tensor:
    """Multi-head self-attention over the spatial positions of qkv [B, 3*heads*ch, T] -> [B, heads*ch, T].

    The two checkpoint families lay qkv out differently: QKVAttention (new order) is [q | k | v] with heads
    inside each, QKVAttentionLegacy is per head [q k v]. Reading a checkpoint with the wrong order still runs,
    silently wrong, so the flag must match the checkpoint (64x64 uses the new order, the others legacy).
    sdpa: the same attention through F.scaled_dot_product_attention (flash / memory-efficient kernels on a
    GPU: the [T, T] weights never reach memory); equal up to rounding, so it is a recipe field (key.Recipe).
    """
    b, width, n = qkv.shape
    ch = width // (3 * heads)
    if sdpa:  # [B, heads, T, ch] with the channels contiguous: the layout the fused (flash) kernels take
        split = (b, 3, heads, ch, n) if new_order else (b, heads, 3, ch, n)
        q, k, v = qkv.reshape(split).permute((1, 0, 2, 4, 3) if new_order else (2, 0, 1, 4, 3)).contiguous().unbind(0)
        return F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, heads * ch, n)
    if new_order:
        q, k, v = (z.reshape(b * heads, ch, n) for z in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(b * heads, 3 * ch, n).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))  # on q and k both rather than 1/sqrt(ch) after: fp16 logits stay in range
    w = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    w = torch.softmax(w.float(), dim=-1).to(w.dtype)
    return torch.einsum("bts,bcs->bct", w, v).reshape(b, heads * ch, n)


class AttentionBlock(nn.Module):
    """Residual self-attention over all H*W positions, with 1x1 Conv1d projections (the reference's shapes)."""

    def __init__(self, ch: int, heads: int, new_order: bool):
        super().__init__()
        self.heads, self.new_order = heads, new_order
        self.sdpa = False  # set by ADMUNet.set_attention
        self.norm = GroupNorm32(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x):
        b, c, height, width = x.shape
        x = x.reshape(b, c, height * width)
        h = self.proj_out(qkv_attention(self.qkv(self.norm(x)), self.heads, self.new_order, self.sdpa))
        return (x + h).reshape(b, c, height, width)


class EmbedSequential(nn.Sequential):
    """A block: layers in sequence, the ResBlocks also get the embedding (the reference's TimestepEmbedSequential)."""

    def forward(self, h, emb):
        for layer in self:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h


class ADMUNet(nn.Module):
    def __init__(self, cfg: ADMNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, emb_ch = cfg.model_channels, 4 * cfg.model_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_ch)

        def res(ch_in, ch_out, resample=None):
            return ResBlock(ch_in, emb_ch, ch_out, cfg.dropout, cfg.use_scale_shift_norm, resample)

        def attention(ch, heads):
            heads = heads if cfg.num_head_channels == -1 else ch // cfg.num_head_channels
            return AttentionBlock(ch, heads, cfg.use_new_attention_order)

        ch = int(cfg.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_chs, ds = [ch], 1  # channels of every skip, consumed in reverse by the output blocks
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, int(mult * mc))]
                ch = int(mult * mc)
                if ds in cfg.attention_ds:
                    layers.append(attention(ch, cfg.num_heads))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_chs.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(res(ch, ch, "down") if cfg.resblock_updown
                                                         else Downsample(ch)))
                skip_chs.append(ch)
                ds *= 2

        self.middle_block = EmbedSequential(res(ch, ch), attention(ch, cfg.num_heads), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_chs.pop(), int(mult * mc))]
                ch = int(mult * mc)
                if ds in cfg.attention_ds:
                    layers.append(attention(ch, cfg.num_heads_upsample))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, "up") if cfg.resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        """The blocks' compute dtype: float16 after convert_to_fp16, else the parameters' dtype."""
        return self.input_blocks[0][0].weight.dtype

    def convert_to_fp16(self) -> "ADMUNet":
        """The reference's use_fp16: only the blocks' conv weights become float16; norms, embeddings and the
        output head stay float32 (GroupNorm32 computes in float32 anyway)."""
        for blocks in (self.input_blocks, self.middle_block, self.output_blocks):
            for m in blocks.modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                    m.half()
        return self

    def set_attention(self, mode: str) -> None:
        """"eager": the reference's einsum attention; "sdpa": F.scaled_dot_product_attention."""
        for m in self.modules():
            if isinstance(m, AttentionBlock):
                m.sdpa = mode == "sdpa"

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(self.time_embed[0].weight.dtype))
        if self.cfg.num_classes is not None:
            if y is None:
                raise DiffstoreError("this ADM model is class-conditional: it needs class labels y")
            emb = emb + self.label_emb(y)
        h, skips = x.to(self.dtype), []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.to(x.dtype))
