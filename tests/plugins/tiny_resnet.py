"""Example plugin: a small ResNet-like classifier CNN (not a diffusion model), for CKA against diffusion features.

    diffstore extract --model py:tests/plugins/tiny_resnet.py:factory --t 0 --blocks all ...

Not a diffusion model, so alphas_cumprod = [1.0]: T = 1, the only time step is t = 0 and x_t = x_0; run
ignores t. Weights: tiny_resnet.safetensors next to this file.
"""

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

WEIGHTS = Path(__file__).with_suffix(".safetensors")


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = nn.Identity() if stride == 1 and c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.skip(x))


class TinyResNet(nn.Module):
    def __init__(self, widths=(8, 16, 32), n_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.layer1 = BasicBlock(widths[0], widths[0], 1)
        self.layer2 = BasicBlock(widths[0], widths[1], 2)
        self.layer3 = BasicBlock(widths[1], widths[2], 2)
        self.fc = nn.Linear(widths[2], n_classes)

    def forward(self, x):
        h = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(h.mean((2, 3)))


def factory(random_init=None):
    if random_init is None:
        net = TinyResNet()
        net.load_state_dict(load_file(WEIGHTS))
    else:
        with torch.random.fork_rng():
            torch.manual_seed(random_init)
            net = TinyResNet()
    return {
        "module": net,
        "blocks": ["stem", "layer1", "layer2", "layer3"],
        "alphas_cumprod": [1.0],
        "image_size": 16,
        "image_channels": 3,
        "weight_files": [] if random_init is not None else [WEIGHTS],
        "config": {"widths": [8, 16, 32]},
        "run": lambda x, t, labels: net(x),
    }
