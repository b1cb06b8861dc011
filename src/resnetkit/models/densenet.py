"""DenseNet (Huang et al. 2017), with torchvision's state-dict layout (`features.denseblockN...`, `classifier`)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from resnetkit.registry import register_model


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (bottleneck to bn_size*growth channels), BN-ReLU-3x3 conv to `growth_rate` new channels."""

    def __init__(self, in_features: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_features, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        x = self.conv2(self.relu2(self.norm2(x)))
        return F.dropout(x, p=self.drop_rate, training=self.training) if self.drop_rate > 0 else x


class DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, in_features: int, bn_size: int, growth_rate: int, drop_rate: float) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = DenseLayer(in_features + i * growth_rate, growth_rate, bn_size, drop_rate)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_features, out_features, 1, bias=False)
        self.pool = nn.AvgPool2d(2, stride=2)


class DenseNet(nn.Module):
    user_options = ("num_classes", "in_chans", "drop_rate")

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(in_chans, num_init_features, 7, stride=2, padding=3, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(num_init_features))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(3, stride=2, padding=1))
        self.feature_info = [dict(name="features.relu0", channels=num_init_features, reduction=2)]
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(
                f"denseblock{i + 1}", DenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate)
            )
            num_features += num_layers * growth_rate
            self.feature_info.append(
                dict(name=f"features.denseblock{i + 1}", channels=num_features, reduction=4 * 2**i)
            )
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(num_features, num_features // 2))
                num_features //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.num_features = num_features
        self.classifier = nn.Linear(num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stem's output and each dense block's output (before its transition), as in `feature_info`."""
        features = []
        for name, module in self.features.named_children():
            x = module(x)
            if name == "relu0" or name.startswith("denseblock"):
                features.append(x)
        return features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.features(x), inplace=True)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


_DENSENET = dict(family="densenet", options=DenseNet.user_options, input_size=224)


@register_model(**_DENSENET)
def densenet121(**kwargs) -> DenseNet:
    """DenseNet-121: 7,978,856 parameters."""
    return DenseNet(32, (6, 12, 24, 16), 64, **kwargs)


@register_model(**_DENSENET)
def densenet169(**kwargs) -> DenseNet:
    """DenseNet-169: 14,149,480 parameters."""
    return DenseNet(32, (6, 12, 32, 32), 64, **kwargs)


@register_model(**_DENSENET)
def densenet201(**kwargs) -> DenseNet:
    """DenseNet-201: 20,013,928 parameters."""
    return DenseNet(32, (6, 12, 48, 32), 64, **kwargs)
