"""ResNet-9: the fast CIFAR-10 network of the DAWNBench entries (Myrtle.ai, D. Page, "How to train your ResNet").

prep conv 64 -> layer1 (conv 128, max-pool, residual of two convs) -> layer2 (conv 256, max-pool)
-> layer3 (conv 512, max-pool, residual of two convs) -> global max-pool -> linear, logits scaled by 0.125.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from resnetkit.models.layers import DropPath, drop_path_rates
from resnetkit.registry import register_model


class ConvBN(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, pool: bool = False) -> None:
        layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        if pool:
            layers.insert(1, nn.MaxPool2d(2))  # pool before BN, as the DAWNBench entry does: 4x cheaper BN
        super().__init__(*layers)


class Residual(nn.Module):
    def __init__(self, channels: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.res1 = ConvBN(channels, channels)
        self.res2 = ConvBN(channels, channels)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.res2(self.res1(x))
        return x + (out if self.drop_path is None else self.drop_path(out))


class ResNet9(nn.Module):
    """drop_path_rate: stochastic depth on the two residual blocks, by the zoo's linear rule (the first gets 0, the
    second the rate).

    width: a multiplier of every layer's channels (64, 128, 256, 512 at 1.0): 0.25 gives 16, 32, 64, 128, about
    1/16 of the multiply-adds, a network shallower and wider per FLOP than the CIFAR ResNet-20 (8 convolutions of
    16-128 channels against 19 of 16-64), which a CPU runs at a better rate."""

    user_options = ("num_classes", "in_chans", "scale", "drop_path_rate", "width")

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        scale: float = 0.125,
        drop_path_rate: float = 0.0,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        c = [max(round(base * width), 1) for base in (64, 128, 256, 512)]
        (rate1,), (rate2,) = drop_path_rates(drop_path_rate, [1, 1])
        self.prep = ConvBN(in_chans, c[0])
        self.layer1 = nn.Sequential(ConvBN(c[0], c[1], pool=True), Residual(c[1], rate1))
        self.layer2 = ConvBN(c[1], c[2], pool=True)
        self.layer3 = nn.Sequential(ConvBN(c[2], c[3], pool=True), Residual(c[3], rate2))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.num_features = c[3]
        self.scale = scale
        self.fc = nn.Linear(c[3], num_classes, bias=False)
        self.feature_info = [
            dict(name="prep", channels=c[0], reduction=1),
            dict(name="layer1", channels=c[1], reduction=2),
            dict(name="layer2", channels=c[2], reduction=4),
            dict(name="layer3", channels=c[3], reduction=8),
        ]

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        x0 = self.prep(x)
        x1 = self.layer1(x0)
        x2 = self.layer2(x1)
        return [x0, x1, x2, self.layer3(x2)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer3(self.layer2(self.layer1(self.prep(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.pool(x), 1)
        return x if pre_logits else self.fc(x) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.num_features, num_classes, bias=False) if num_classes > 0 else nn.Identity()


@register_model(family="cifar", options=ResNet9.user_options, input_size=32)
def resnet9(**kwargs) -> ResNet9:
    """ResNet-9 (DAWNBench): 6.57M parameters with 10 classes."""
    return ResNet9(**kwargs)
