"""ResNet (He et al. 2016, "Deep Residual Learning for Image Recognition"), ResNeXt and Wide ResNet.

One `ResNet` class builds the whole family, the ImageNet models and the CIFAR models of section 4.2 alike.
The state-dict layout is torchvision's (`conv1 bn1 layer1..4 fc`, `downsample.0/1`), so torchvision and timm
checkpoints load unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from resnetkit.registry import register_model

NormLayer = Callable[[int], nn.Module]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; ReLU after the addition."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand. The stride sits on the 3x3 ("ResNet v1.5", as torchvision), which is about
    0.5% more accurate on ImageNet than the paper's stride on the first 1x1."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ShortcutA(nn.Module):
    """Parameter-free shortcut ("option A", He et al. section 4.2): subsample by the stride, zero-pad the channels."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))


class ResNet(nn.Module):
    """The ResNet family in one class.

    Stages: `layer1..layerN`, one per entry of `layers`, with widths `widths` (64/128/256/512 for ImageNet,
    16/32/64 for the CIFAR models). The stem is `conv1 bn1 relu maxpool`: a 7x7 stride-2 conv and a max-pool
    for "imagenet", a 3x3 stride-1 conv and no pool for "cifar" (32x32 inputs).
    """

    user_options = ("num_classes", "in_chans", "zero_init_residual", "stem", "norm_layer", "drop_rate")

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        in_chans: int = 3,
        zero_init_residual: bool = False,
        stem: str = "imagenet",
        norm_layer: NormLayer | None = None,
        drop_rate: float = 0.0,
        groups: int = 1,
        width_per_group: int = 64,
        widths: tuple[int, ...] = (64, 128, 256, 512),
        shortcut: str = "B",
    ) -> None:
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' (parameter-free) or 'B' (1x1 projection), got {shortcut!r}")
        norm_layer = norm_layer or nn.BatchNorm2d
        self._norm_layer = norm_layer
        self.groups = groups
        self.base_width = width_per_group
        self.shortcut = shortcut
        self.stem = stem
        self.inplanes = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_chans, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()

        stem_reduction = 4 if stem == "imagenet" else 1
        self.feature_info = [dict(name="relu", channels=self.inplanes, reduction=stem_reduction // 2 or 1)]
        stages = []
        for i, (width, depth) in enumerate(zip(widths, layers)):
            stage = self._make_layer(block, width, depth, stride=1 if i == 0 else 2)
            self.add_module(f"layer{i + 1}", stage)
            stages.append(stage)
            reduction = stem_reduction * 2**i
            self.feature_info.append(dict(name=f"layer{i + 1}", channels=self.inplanes, reduction=reduction))
        self.stages = stages  # plain list: the modules are registered as layerN above, this keeps state-dict keys
        self.num_features = self.inplanes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.drop_rate = drop_rate
        self.fc = nn.Linear(self.num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        # Zero-initialise the last BN in each residual branch, so that each block starts as an identity:
        # improves the model by 0.2~0.3% according to Goyal et al., https://arxiv.org/abs/1706.02677
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        out_planes = planes * block.expansion
        if stride != 1 or self.inplanes != out_planes:
            if self.shortcut == "A":
                downsample = ShortcutA(stride, out_planes - self.inplanes)
            else:
                downsample = nn.Sequential(conv1x1(self.inplanes, out_planes, stride), norm_layer(out_planes))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, norm_layer)]
        self.inplanes = out_planes
        for _ in range(1, blocks):
            layers.append(
                block(self.inplanes, planes, groups=self.groups, base_width=self.base_width, norm_layer=norm_layer)
            )
        return nn.Sequential(*layers)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of the stem and of every stage, described in order by `self.feature_info`."""
        x = self.forward_stem(x)
        features = [x]
        x = self.maxpool(x)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (N, num_features, H/32, W/32 for the ImageNet stem)."""
        x = self.maxpool(self.forward_stem(x))
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialised head with `num_classes` outputs (0 gives an identity: embeddings)."""
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def _resnet(block, layers: list[int], **kwargs) -> ResNet:
    return ResNet(block, layers, **kwargs)


_IMAGENET = dict(family="imagenet", options=ResNet.user_options, input_size=224)
_CIFAR = dict(family="cifar", options=tuple(o for o in ResNet.user_options if o != "stem"), input_size=32)


@register_model(**_IMAGENET)
def resnet18(**kwargs) -> ResNet:
    """ResNet-18: 11,689,512 parameters with 1000 classes."""
    return _resnet(BasicBlock, [2, 2, 2, 2], **kwargs)


@register_model(**_IMAGENET)
def resnet34(**kwargs) -> ResNet:
    """ResNet-34: 21,797,672 parameters."""
    return _resnet(BasicBlock, [3, 4, 6, 3], **kwargs)


@register_model(**_IMAGENET)
def resnet50(**kwargs) -> ResNet:
    """ResNet-50: 25,557,032 parameters."""
    return _resnet(Bottleneck, [3, 4, 6, 3], **kwargs)


@register_model(**_IMAGENET)
def resnet101(**kwargs) -> ResNet:
    """ResNet-101: 44,549,160 parameters."""
    return _resnet(Bottleneck, [3, 4, 23, 3], **kwargs)


@register_model(**_IMAGENET)
def resnet152(**kwargs) -> ResNet:
    """ResNet-152: 60,192,808 parameters."""
    return _resnet(Bottleneck, [3, 8, 36, 3], **kwargs)


@register_model(**_IMAGENET)
def resnext50_32x4d(**kwargs) -> ResNet:
    """ResNeXt-50 32x4d (Xie et al. 2017): 32 groups of width 4 in the first stage."""
    return _resnet(Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4, **kwargs)


@register_model(**_IMAGENET)
def resnext101_32x8d(**kwargs) -> ResNet:
    """ResNeXt-101 32x8d."""
    return _resnet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=8, **kwargs)


@register_model(**_IMAGENET)
def resnext101_64x4d(**kwargs) -> ResNet:
    """ResNeXt-101 64x4d."""
    return _resnet(Bottleneck, [3, 4, 23, 3], groups=64, width_per_group=4, **kwargs)


@register_model(**_IMAGENET)
def wide_resnet50_2(**kwargs) -> ResNet:
    """Wide ResNet-50-2 (Zagoruyko & Komodakis 2016): bottleneck width doubled, outer widths unchanged."""
    return _resnet(Bottleneck, [3, 4, 6, 3], width_per_group=128, **kwargs)


@register_model(**_IMAGENET)
def wide_resnet101_2(**kwargs) -> ResNet:
    """Wide ResNet-101-2."""
    return _resnet(Bottleneck, [3, 4, 23, 3], width_per_group=128, **kwargs)


# The CIFAR family of He et al. section 4.2: 6n+2 layers, three stages of 16/32/64 channels on 32x32 inputs,
# parameter-free option-A shortcuts. Parameters (paper table 6): 0.27M, 0.46M, 0.66M, 0.85M, 1.7M.
def _cifar_resnet(n: int, num_classes: int = 10, **kwargs) -> ResNet:
    return ResNet(
        BasicBlock, [n, n, n], num_classes=num_classes, stem="cifar", widths=(16, 32, 64), shortcut="A", **kwargs
    )


@register_model(**_CIFAR)
def resnet20(**kwargs) -> ResNet:
    """ResNet-20 for CIFAR (n=3): 0.27M parameters."""
    return _cifar_resnet(3, **kwargs)


@register_model(**_CIFAR)
def resnet32(**kwargs) -> ResNet:
    """ResNet-32 for CIFAR (n=5): 0.46M parameters."""
    return _cifar_resnet(5, **kwargs)


@register_model(**_CIFAR)
def resnet44(**kwargs) -> ResNet:
    """ResNet-44 for CIFAR (n=7): 0.66M parameters."""
    return _cifar_resnet(7, **kwargs)


@register_model(**_CIFAR)
def resnet56(**kwargs) -> ResNet:
    """ResNet-56 for CIFAR (n=9): 0.85M parameters."""
    return _cifar_resnet(9, **kwargs)


@register_model(**_CIFAR)
def resnet110(**kwargs) -> ResNet:
    """ResNet-110 for CIFAR (n=18): 1.7M parameters."""
    return _cifar_resnet(18, **kwargs)
