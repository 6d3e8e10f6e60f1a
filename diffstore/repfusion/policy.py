"""RepFusion's time-step policy pi(t|x), trained with REINFORCE, and the decoder g that scores a choice.

Departure from the original: the published policy is a 1000-way categorical over every t; here it is a
K-way categorical over the stored t grid (targets.py), because every action must have a precomputed teacher
target. A grid such as 0:50:1,50:1000:50 keeps the fine resolution where the paper's policies concentrate.

The reward of choosing t for sample x is -CE(g(z_t(x)), y): how well the teacher feature at that t tells the
class. g is an MLP fitted once on the cached targets of every t (so it never needs the U-Net) and then frozen,
which makes each step a contextual bandit. The entropy bonus lambda starts at 0.1 and decays linearly to 0,
as in the published code; the optional mean baseline (batch mean reward) only lowers the variance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Categorical


class TimePolicy(nn.Module):
    """pi(t|x): a small conv net, then 3 linear layers to logits over the K grid points."""

    def __init__(self, in_channels: int, k: int, width: int = 16, hidden: int = 128):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, 2 * width, 3, 2, 1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.mlp = nn.Sequential(nn.Linear(2 * width, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, k))
        # zero last layer: the policy starts uniform over the grid, so no t is favoured before any reward
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.conv(x))


class Decoder(nn.Module):
    """g: teacher feature z (standardised) -> class logits."""

    def __init__(self, channels: int, num_classes: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def fit_decoder(batches, channels: int, num_classes: int, lr: float = 1e-3,
                device: str | torch.device = "cpu") -> Decoder:
    """Fit g on cached (z, y) batches (drawn over every sample, view and t); returned frozen, in eval mode."""
    g = Decoder(channels, num_classes).to(device)
    opt = torch.optim.Adam(g.parameters(), lr=lr)
    for z, y in batches:
        loss = F.cross_entropy(g(z), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return g.eval().requires_grad_(False)


def reward(g: Decoder, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-CE(g(z_t), y) per sample: higher when the chosen t's teacher feature tells the class."""
    with torch.no_grad():
        return -F.cross_entropy(g(z), y, reduction="none")


def entropy_weight(step: int, total_steps: int, start: float = 0.1) -> float:
    """lambda: linear decay from `start` to 0 over training."""
    return start * max(0.0, 1.0 - step / max(total_steps, 1))


def reinforce_loss(logits: torch.Tensor, t_index: torch.Tensor, rewards: torch.Tensor, lam: float,
                   baseline: bool = True) -> torch.Tensor:
    """-E[log pi(t|x) (r - b)] - lambda H(pi(.|x)); b = the batch mean reward when `baseline`."""
    dist = Categorical(logits=logits)
    advantage = rewards - rewards.mean() if baseline else rewards
    return -(dist.log_prob(t_index) * advantage.detach()).mean() - lam * dist.entropy().mean()


@torch.no_grad()
def mean_distribution(policy: TimePolicy, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The learned distribution over t: pi(.|x) averaged over `images`, float32 [K]."""
    total = sum(F.softmax(policy(x.float()), 1).sum(0) for x in images.split(batch_size))
    return total / len(images)
