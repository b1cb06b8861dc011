"""What the later ResNets add to the 2016 blocks: channel attention (squeeze-and-excitation, ECA) and stochastic depth.

Module and parameter names follow timm's (`se.fc1 se.fc2` for SE, `se.conv` for ECA), so its checkpoints load
unchanged; the arithmetic follows it too (reduced widths, kernel sizes, the drop rule), so outputs agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

ATTENTION = ("se", "eca")


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018, https://arxiv.org/abs/1709.01507): each channel of the block's output
    is scaled by a gate computed from all channels' means, through a bottleneck of two 1x1 convolutions (reduction
    16, ReLU) and a sigmoid. In ResNet-50 it adds 10% to the parameters and 0.06% to the multiply-adds (`resnetkit
    models`: 28.09M vs 25.56M parameters, 4.092 vs 4.089 GMACs)."""

    def __init__(self, channels: int, reduction: int = 16, divisor: int = 8) -> None:
        super().__init__()
        # timm's make_divisible(channels / 16, 8, round_limit=0): the nearest multiple of 8, at least 8.
        hidden = max(divisor, int(channels / reduction + divisor / 2) // divisor * divisor)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(self.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * gate.sigmoid()


class EfficientChannelAttention(nn.Module):
    """ECA (Wang et al. 2020, https://arxiv.org/abs/1910.03151): the gate of squeeze-and-excitation without its
    bottleneck, a 1-D convolution across the channel means instead. Its size k grows with log2(channels) (the
    paper's eq. 12 with gamma=2, b=1, rounded to odd: 5 for 256 to 1024 channels, 7 for 2048), so a whole ResNet-50
    gains 86 parameters."""

    def __init__(self, channels: int, gamma: int = 2, beta: int = 1) -> None:
        super().__init__()
        t = int(abs(math.log(channels, 2) + beta) / gamma)
        k = max(t if t % 2 else t + 1, 3)
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.mean((2, 3)).view(x.shape[0], 1, -1))  # the channels as a 1-D sequence
        return x * y.sigmoid().view(x.shape[0], -1, 1, 1)


def attention_layer(kind: str | None, channels: int) -> nn.Module | None:
    """The channel attention a block applies to its residual branch before the addition: None, "se" or "eca"."""
    if kind is None:
        return None
    if kind == "se":
        return SqueezeExcite(channels)
    if kind == "eca":
        return EfficientChannelAttention(channels)
    raise ValueError(f"attention must be None or one of {ATTENTION}, got {kind!r}")


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016, https://arxiv.org/abs/1603.09382) on a residual branch: in training,
    each sample's branch is dropped with probability `p` and the kept ones are scaled by 1/(1-p), so that the
    expected output is the eval-mode one; in eval mode it is the identity. It let the paper train a 1202-layer ResNet
    to 4.91% error on CIFAR-10 (its abstract)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        # The same draws as timm's drop_path (one Bernoulli per sample, scaled in place), so that with the same seed
        # training-mode outputs agree with timm's too.
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


def drop_path_rates(rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Each block's drop probability, stage by stage: linear in the block's index over the whole network, from 0 for
    the first block to `rate` for the last (the paper's linear decay rule, as timm spreads it)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {rate}")
    total = sum(depths)
    flat = [rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
    starts = [sum(depths[:i]) for i in range(len(depths))]
    return [flat[s : s + d] for s, d in zip(starts, depths)]
