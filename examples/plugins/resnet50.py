"""ResNet-50 in torchvision's layout, as a comparison network: the stem and all 16 bottleneck blocks are blocks.

    DIFFSTORE_RESNET50_WEIGHTS=resnet50-11ad3fa6.pth diffstore extract --model py:examples/plugins/resnet50.py:factory \
        --model-name resnet50-224px --dataset digits --split test --t 0 --blocks all --pools 1
    DIFFSTORE_RESNET50_SIZE=64 diffstore extract --model py:examples/plugins/resnet50.py:factory --random-init 0 ...

Weights: a torchvision resnet50 state_dict (`torchvision.models.resnet50(weights=...).state_dict()`, the .pth files
torchvision downloads, or a safetensors copy), from factory(weights=FILE) or $DIFFSTORE_RESNET50_WEIGHTS. Every
parameter and buffer name and shape equals torchvision's (conv1, bn1, layer1.0.conv1 ... layer4.2.bn3,
layer*.0.downsample.{0,1}, fc), so the file loads strictly; torchvision itself is not needed. --random-init S
builds seeded weights with torchvision's init scheme (Kaiming-normal fan-out convolutions, BatchNorm 1 and 0).
Images: RGB at image_size (factory argument or $DIFFSTORE_RESNET50_SIZE, default 224), normalised with ImageNet's
mean and std inside run. Not a diffusion model: extract it at --t 0.
Blocks, at input size S: stem (after the max-pool, 64 x S/4), layer1.0-2 (256 x S/4), layer2.0-3 (512 x S/8),
layer3.0-5 (1024 x S/16), layer4.0-2 (2048 x S/32); b = 1..17 in forward order.
"""

import torch
from torch import nn

from diffstore.models.classifier import IMAGENET_MEAN, IMAGENET_STD, build, classifier_plugin, setting

STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, stride of the first) per layer
EXPANSION = 4


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (with the stride: "ResNet v1.5", as torchvision), 1x1 expand; a projection shortcut when the
    shape changes."""

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        c_out = width * EXPANSION
        self.conv1, self.bn1 = nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return torch.relu(h + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = 64
        for i, (width, n, stride) in enumerate(STAGES, start=1):
            layer = []
            for j in range(n):
                layer.append(Bottleneck(c_in, width, stride if j == 0 else 1))
                c_in = width * EXPANSION
            setattr(self, f"layer{i}", nn.Sequential(*layer))
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        h = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return self.fc(h.mean((2, 3)))


def make(state: dict | None) -> ResNet50:
    """The network (classes from the file's fc, e.g. a fine-tuned head); seeded init as torchvision's."""
    net = ResNet50(state["fc.weight"].shape[0] if state and "fc.weight" in state else 1000)
    if state is None:
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


def block_units(net: ResNet50) -> list[tuple[str, str]]:
    """(name, module path): the stem's max-pool, then every bottleneck under its torchvision path."""
    layers = [f"layer{i}" for i in range(1, 5)]
    return [("stem", "maxpool")] + [(f"{layer}.{j}",) * 2 for layer in layers for j in range(len(getattr(net, layer)))]


def factory(random_init=None, weights=None, image_size=None):
    image_size = setting(image_size, "DIFFSTORE_RESNET50_SIZE", 224, int)
    if image_size < 32:
        raise ValueError(f"image_size {image_size} is below ResNet-50's total stride of 32")
    net, files = build(make, random_init, setting(weights, "DIFFSTORE_RESNET50_WEIGHTS"), "ResNet-50",
                       "DIFFSTORE_RESNET50_WEIGHTS")
    return classifier_plugin(net, block_units(net), image_size, IMAGENET_MEAN, IMAGENET_STD, files,
                             {"architecture": "torchvision resnet50", "num_classes": net.fc.out_features})
