"""The students RepFusion distils into, randomly initialised: ResNet-18 (CIFAR stem), WRN-28-2, MobileNetV2.

Every student splits into `features(x)` (the last feature map, the layer RepFusion distils into) and
`classify(map)` (global average pool + linear), so distillation and fine-tuning share one network.
`in_channels` adapts them to grey images (the default digits model is 1 x 16 x 16); `width` / `widen` /
`width_mult` shrink them for tests and CPU runs. CIFAR variants: no stride or max-pool in the stem, so a
16x16 or 32x32 image keeps enough spatial resolution.
"""

from __future__ import annotations

from torch import nn

from ..errors import DiffstoreError

STUDENTS = ("resnet18", "wrn28-2", "mobilenetv2")


class Student(nn.Module):
    """`layers` up to the distilled feature map (`channels` wide), then global average pool + linear."""

    def __init__(self, layers: list[nn.Module], channels: int, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(*layers)
        self.feature_channels = channels
        self.fc = nn.Linear(channels, num_classes)

    def features(self, x):
        return self.body(x)

    def classify(self, feature_map):
        return self.fc(feature_map.mean((2, 3)))

    def forward(self, x):
        return self.classify(self.features(x))


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


def stages(block, cin: int, widths: list[int], per_stage: int) -> tuple[list[nn.Module], int]:
    """`per_stage` blocks per width; every stage after the first halves the resolution in its first block."""
    layers = []
    for i, w in enumerate(widths):
        for j in range(per_stage):
            layers.append(block(cin, w, 2 if i > 0 and j == 0 else 1))
            cin = w
    return layers, cin


# --- ResNet-18 (He et al.), CIFAR stem: 3x3 conv, stride 1, no max-pool ---------------------------------

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*conv_bn(cin, cout, 3, stride), nn.ReLU(inplace=True), *conv_bn(cout, cout))
        self.shortcut = nn.Sequential(*conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return (self.body(x) + self.shortcut(x)).relu()


class ResNet18(Student):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64):
        stem = [*conv_bn(in_channels, width), nn.ReLU(inplace=True)]  # built first: the seeded init order of before
        blocks, channels = stages(BasicBlock, width, [width, 2 * width, 4 * width, 8 * width], 2)
        super().__init__([*stem, *blocks], channels, num_classes)


# --- Wide ResNet (Zagoruyko & Komodakis), pre-activation blocks -----------------------------------------

class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.pre = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                                  nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, 1, 1, bias=False))
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        o = self.pre(x)
        # the projection shortcut reads the pre-activated input, as in the reference WRN
        return self.body(o) + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(Student):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, depth: int = 28, widen: int = 2, base: int = 16):
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4 (10, 16, 22, 28, ...), got {depth}")
        stem = nn.Conv2d(in_channels, base, 3, 1, 1, bias=False)  # built first: the seeded init order of before
        blocks, c = stages(WideBlock, base, [base * widen, 2 * base * widen, 4 * base * widen], (depth - 4) // 6)
        super().__init__([stem, *blocks, nn.BatchNorm2d(c), nn.ReLU(inplace=True)], c, num_classes)


# --- MobileNetV2 (Sandler et al.), CIFAR strides: stem and the 24-channel stage keep the resolution ------

class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [*conv_bn(cin, hidden, 1), nn.ReLU6(inplace=True)] if expand != 1 else []
        layers += [*conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True),
                   *conv_bn(hidden, cout, 1)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


MBV2_STAGES = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
               (6, 320, 1, 1)]


class MobileNetV2(Student):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0):
        scale = lambda c: max(8, int(c * width_mult + 4) // 8 * 8)  # noqa: E731 -- channels rounded to 8
        cin = scale(32)
        layers = [*conv_bn(in_channels, cin), nn.ReLU6(inplace=True)]
        for expand, c, n, s in MBV2_STAGES:
            for j in range(n):
                layers.append(InvertedResidual(cin, scale(c), s if j == 0 else 1, expand))
                cin = scale(c)
        last = max(1280, scale(1280)) if width_mult > 1 else scale(1280)
        layers += [*conv_bn(cin, last, 1), nn.ReLU6(inplace=True)]
        super().__init__(layers, last, num_classes)


def build_student(name: str, num_classes: int, in_channels: int, width: float = 1.0) -> Student:
    """`width` scales every student's channels (1.0 = the published sizes; tests and CPU runs use less)."""
    if name == "resnet18":
        return ResNet18(num_classes, in_channels, width=max(1, round(64 * width)))
    if name == "wrn28-2":
        return WideResNet(num_classes, in_channels, depth=28, widen=2, base=max(1, round(16 * width)))
    if name == "mobilenetv2":
        return MobileNetV2(num_classes, in_channels, width_mult=width)
    raise DiffstoreError(f"unknown student {name!r}: choose one of {', '.join(STUDENTS)}")
