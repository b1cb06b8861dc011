"""ResNet (He et al. 2016, "Deep Residual Learning for Image Recognition"), ResNeXt, Wide ResNet, and the refinements
practitioners pick for more accuracy per FLOP: ResNet-C/D ("Bag of Tricks for Image Classification", He et al. 2019),
squeeze-and-excitation and ECA blocks, pre-activation ResNets ("Identity Mappings in Deep Residual Networks", He et
al. 2016) and stochastic depth.

One `ResNet` class builds the whole family, the ImageNet models and the CIFAR models of section 4.2 alike;
`PreActResNet` reuses its machinery and changes only the layout. The 2016 models have torchvision's state-dict layout
(`conv1 bn1 layer1..4 fc`, `downsample.0/1`), the later ones timm's (`conv1.0..6` for the deep stem, `downsample.1/2`
after the average pool, `se.*`; `stem.conv stages.N.blocks.M norm head.fc` for the pre-activation ResNetV2), so
torchvision and timm checkpoints load unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from resnetkit.models.layers import ATTENTION, DropPath, attention_layer, drop_path_rates
from resnetkit.registry import register_model

NormLayer = Callable[[int], nn.Module]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


def _drop_path(p: float) -> DropPath | None:
    return DropPath(p) if p > 0 else None  # None keeps the 2016 models' module tree exactly torchvision's


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; ReLU after the addition.

    attention: None, "se" or "eca", applied to the branch before the addition (`se`, where timm has it).
    drop_path: the probability of dropping the branch, per sample, in training (stochastic depth).
    """

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
        attention: str | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.se = attention_layer(attention, planes)
        self.downsample = downsample
        self.stride = stride
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        if self.drop_path is not None:
            out = self.drop_path(out)
        return self.relu(out + identity)

    def zero_init_last(self) -> None:
        if getattr(self.bn2, "weight", None) is not None:
            nn.init.constant_(self.bn2.weight, 0)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand. The stride sits on the 3x3 ("ResNet v1.5", as torchvision; ResNet-B in "Bag of
    Tricks"), which is about 0.5% more accurate on ImageNet than the paper's stride on the first 1x1.
    `attention` and `drop_path` as in BasicBlock."""

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
        attention: str | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.se = attention_layer(attention, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        if self.drop_path is not None:
            out = self.drop_path(out)
        return self.relu(out + identity)

    def zero_init_last(self) -> None:
        if getattr(self.bn3, "weight", None) is not None:
            nn.init.constant_(self.bn3.weight, 0)


class PreActBasicBlock(nn.Module):
    """Pre-activation basic block ("Identity Mappings", fig. 4e): BN-ReLU-conv3x3 twice and nothing after the
    addition, so that the identity path runs from the stem to the last stage unchanged. A projection shortcut reads
    the pre-activated input, as timm's ResNetV2 does. Module order and names are timm's (`downsample norm1 conv1
    norm2 conv2`)."""

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
        attention: str | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64 or attention is not None:
            raise ValueError("PreActBasicBlock supports only groups=1, base_width=64 and no attention")
        self.downsample = downsample
        self.norm1 = norm_layer(inplanes)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.norm2 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes)
        self.relu = nn.ReLU(inplace=True)
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = self.relu(self.norm1(x))
        shortcut = x if self.downsample is None else self.downsample(preact)
        out = self.conv2(self.relu(self.norm2(self.conv1(preact))))
        if self.drop_path is not None:
            out = self.drop_path(out)
        return out + shortcut

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv2.weight)  # no BN ends the branch: its last convolution starts at zero instead


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck ("Identity Mappings", the ResNet-164/1001 unit): BN-ReLU before each of the 1x1
    reduce, 3x3 (with the stride, as timm's) and 1x1 expand convolutions. Names as timm's ResNetV2."""

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
        attention: str | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if attention is not None:
            raise ValueError("PreActBottleneck has no attention option")
        width = int(planes * (base_width / 64.0)) * groups
        self.downsample = downsample
        self.norm1 = norm_layer(inplanes)
        self.conv1 = conv1x1(inplanes, width)
        self.norm2 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.norm3 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = self.relu(self.norm1(x))
        shortcut = x if self.downsample is None else self.downsample(preact)
        out = self.conv2(self.relu(self.norm2(self.conv1(preact))))
        out = self.conv3(self.relu(self.norm3(out)))
        if self.drop_path is not None:
            out = self.drop_path(out)
        return out + shortcut

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv3.weight)


_BLOCKS = (BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck)


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


class PreActProjection(nn.Module):
    """The projection shortcut of a pre-activation block: a strided 1x1 convolution, no BN after it (the next block's
    BN-ReLU normalises the sum). timm's `DownsampleConv(preact=True)`: `downsample.conv`."""

    def __init__(self, inplanes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.conv = conv1x1(inplanes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ResNetStage(nn.Module):
    """One stage of the pre-activation layout: its blocks under `blocks` (timm's `stages.N.blocks.M`)."""

    def __init__(self, blocks: nn.Sequential) -> None:
        super().__init__()
        self.blocks = blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ConvClassifierHead(nn.Module):
    """Global average pool, dropout, and a 1x1 convolution as the classifier. A Linear would do the same; the
    convolution is timm's ResNetV2 head (`head.fc.weight` is (classes, features, 1, 1)), kept so that its
    checkpoints load unchanged."""

    def __init__(self, num_features: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.drop_rate = drop_rate
        self.fc = self.classifier(num_features, num_classes)

    @staticmethod
    def classifier(num_features: int, num_classes: int) -> nn.Module:
        """A freshly initialised classifier (timm's init: N(0, 0.01) weights, zero bias); 0 classes: an identity."""
        if num_classes <= 0:
            return nn.Identity()
        fc = nn.Conv2d(num_features, num_classes, 1)
        nn.init.normal_(fc.weight, std=0.01)
        nn.init.zeros_(fc.bias)
        return fc

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 1)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return torch.flatten(x if pre_logits else self.fc(x), 1)


class ResNet(nn.Module):
    """The ResNet family in one class.

    Stages: `layer1..layerN`, one per entry of `layers`, with widths `widths` (64/128/256/512 for ImageNet,
    16/32/64 for the CIFAR models). The stem is `conv1 bn1 relu maxpool`: a 7x7 stride-2 conv and a max-pool
    for "imagenet", a 3x3 stride-1 conv and no pool for "cifar" (32x32 inputs).

    What the builders fix besides `block layers groups width_per_group widths`:
    shortcut: "A" (parameter-free, the CIFAR models), "B" (strided 1x1 conv + BN, torchvision's) or "D" (ResNet-D:
        a 2x2 average pool, then a 1x1 conv + BN).
    deep_stem: ResNet-C's stem, three 3x3 convolutions of widths[0]/2, widths[0]/2 and widths[0] channels (`conv1`
        becomes a Sequential, timm's layout) in place of the 7x7 one; with stem="cifar" the first loses its stride.
    attention: None, "se" or "eca" in every block.
    drop_path_rate (a user option): stochastic depth; the last block's drop probability, the earlier ones linearly
    less down to 0 for the first. Off in eval mode.
    """

    user_options = (
        "num_classes",
        "in_chans",
        "zero_init_residual",
        "stem",
        "norm_layer",
        "drop_rate",
        "drop_path_rate",
    )

    def __init__(
        self,
        block: type[nn.Module],
        layers: Sequence[int],
        num_classes: int = 1000,
        in_chans: int = 3,
        zero_init_residual: bool = False,
        stem: str = "imagenet",
        norm_layer: NormLayer | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        groups: int = 1,
        width_per_group: int = 64,
        widths: tuple[int, ...] = (64, 128, 256, 512),
        shortcut: str = "B",
        deep_stem: bool = False,
        attention: str | None = None,
    ) -> None:
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        if shortcut not in ("A", "B", "D"):
            raise ValueError(
                "shortcut must be 'A' (parameter-free), 'B' (1x1 projection) or 'D' (average pool, then 1x1 "
                f"projection), got {shortcut!r}"
            )
        if attention is not None and attention not in ATTENTION:
            raise ValueError(f"attention must be None or one of {ATTENTION}, got {attention!r}")
        rates = drop_path_rates(drop_path_rate, layers)  # checks the rate first, before any module is built
        norm_layer = norm_layer or nn.BatchNorm2d
        self._norm_layer = norm_layer
        self.groups = groups
        self.base_width = width_per_group
        self.shortcut = shortcut
        self.attention = attention
        self.stem_type = stem
        self.inplanes = widths[0]
        stem_feature = self._make_stem(in_chans, stem, deep_stem)

        stem_reduction = 4 if stem == "imagenet" else 1
        self.feature_info = [dict(name=stem_feature, channels=self.inplanes, reduction=stem_reduction // 2 or 1)]
        stages = []
        for i, (width, depth) in enumerate(zip(widths, layers)):
            stages.append(self._make_layer(block, width, depth, stride=1 if i == 0 else 2, drop_path=rates[i]))
            self.feature_info.append(dict(name="", channels=self.inplanes, reduction=stem_reduction * 2**i))
        for info, name in zip(self.feature_info[1:], self._register_stages(stages)):
            info["name"] = name
        self.num_features = self.inplanes
        self.drop_rate = drop_rate
        self._make_head(num_classes)

        classifier = self.get_classifier()
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not classifier:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        # Zero-initialise the last BN in each residual branch (the last conv in a pre-activation one), so that each
        # block starts as an identity: improves the model by 0.2~0.3% according to Goyal et al.,
        # https://arxiv.org/abs/1706.02677
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, _BLOCKS):
                    m.zero_init_last()

    # --- the layout: torchvision's here, timm's ResNetV2 in PreActResNet

    def _make_stem(self, in_chans: int, stem: str, deep_stem: bool) -> str:
        """Build the stem; returns the name of the module whose output is the stem's feature map."""
        norm_layer = self._norm_layer
        if deep_stem:
            # ResNet-C ("Bag of Tricks" section 4.2): three 3x3 convolutions see the 7x7 one's field with two more
            # non-linearities; 0.36 GMACs at 224 px where the 7x7 costs 0.12 (`resnetkit summary resnet50d`).
            # timm's layout: conv1.0 conv1.1 conv1.3 conv1.4 conv1.6.
            half = self.inplanes // 2
            self.conv1 = nn.Sequential(
                nn.Conv2d(in_chans, half, 3, stride=2 if stem == "imagenet" else 1, padding=1, bias=False),
                norm_layer(half),
                nn.ReLU(inplace=True),
                conv3x3(half, half),
                norm_layer(half),
                nn.ReLU(inplace=True),
                conv3x3(half, self.inplanes),
            )
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_chans, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        return "relu"

    def _register_stages(self, stages: list[nn.Sequential]) -> list[str]:
        """Register the stages as submodules; returns their names."""
        names = [f"layer{i + 1}" for i in range(len(stages))]
        for name, stage in zip(names, stages):
            self.add_module(name, stage)
        self.stages = stages  # plain list: the modules are registered as layerN above, this keeps state-dict keys
        return names

    def _make_head(self, num_classes: int) -> None:
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.num_features, num_classes)

    def _shortcut(self, inplanes: int, out_planes: int, stride: int) -> nn.Module:
        """The shortcut of a block whose input and output shapes differ."""
        if self.shortcut == "A":
            return ShortcutA(stride, out_planes - inplanes)
        if self.shortcut == "D":
            # ResNet-D ("Bag of Tricks" section 4.2, fig. 2c): a strided 1x1 convolution reads a quarter of its input;
            # averaging 2x2 first lets every position count, at no cost in multiply-adds (77.16% top-1 for
            # ResNet-50-D in the paper's table 5). timm's layout: the pool is downsample.0, an identity at stride 1.
            pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride != 1 else nn.Identity()
            return nn.Sequential(pool, conv1x1(inplanes, out_planes), self._norm_layer(out_planes))
        return nn.Sequential(conv1x1(inplanes, out_planes, stride), self._norm_layer(out_planes))

    def _make_layer(
        self, block, planes: int, blocks: int, stride: int = 1, drop_path: Sequence[float] | None = None
    ) -> nn.Sequential:
        """`blocks` blocks of `block`, the first with the stride and the shortcut; drop_path: each one's rate."""
        drop_path = drop_path or [0.0] * blocks
        downsample = None
        out_planes = planes * block.expansion
        if stride != 1 or self.inplanes != out_planes:
            downsample = self._shortcut(self.inplanes, out_planes, stride)
        norm_layer, attention = self._norm_layer, self.attention
        options = dict(groups=self.groups, base_width=self.base_width, norm_layer=norm_layer, attention=attention)
        layers = [block(self.inplanes, planes, stride, downsample, **options, drop_path=drop_path[0])]
        self.inplanes = out_planes
        for i in range(1, blocks):
            layers.append(block(self.inplanes, planes, **options, drop_path=drop_path[i]))
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


class PreActResNet(ResNet):
    """Pre-activation ResNets ("Identity Mappings in Deep Residual Networks", He et al. 2016): BN-ReLU before every
    convolution, identity shortcuts left untouched from block to block, and one BN-ReLU after the last stage: it let
    the paper train a 1001-layer ResNet to 4.62% error on CIFAR-10 (its abstract).

    `ResNet`'s machinery (`_make_layer`, stochastic depth, the init, feature_info) in timm's ResNetV2 layout:
    `stem.conv stem.pool stages.N.blocks.M norm head.fc`. The stem is a bare convolution: the first block's BN-ReLU
    pre-activates it. Projection shortcuts ("B") only; no deep stem, no attention.
    """

    def _make_stem(self, in_chans: int, stem: str, deep_stem: bool) -> str:
        if deep_stem:
            raise ValueError("PreActResNet has no deep stem")
        if stem == "imagenet":
            conv = nn.Conv2d(in_chans, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
            pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            conv, pool = conv3x3(in_chans, self.inplanes), nn.Identity()
        self.stem = nn.Sequential(OrderedDict(conv=conv, pool=pool))
        return "stem.conv"

    def _register_stages(self, stages: list[nn.Sequential]) -> list[str]:
        self.stages = nn.Sequential(*(ResNetStage(s) for s in stages))
        return [f"stages.{i}" for i in range(len(stages))]

    def _make_head(self, num_classes: int) -> None:
        self.norm = self._norm_layer(self.num_features)  # the closing BN-ReLU: the last block's output is a raw sum
        self.relu = nn.ReLU(inplace=True)
        self.head = ConvClassifierHead(self.num_features, num_classes, self.drop_rate)

    def _shortcut(self, inplanes: int, out_planes: int, stride: int) -> nn.Module:
        if self.shortcut != "B":
            raise ValueError(f"PreActResNet has projection shortcuts ('B') only, got {self.shortcut!r}")
        return PreActProjection(inplanes, out_planes, stride)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem.conv(x)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of the stem and of every stage, described by `self.feature_info`; the last one after the
        closing BN-ReLU (`norm`), as `forward_features` returns it, so that a backbone uses every parameter."""
        x = self.forward_stem(x)
        features = [x]
        x = self.stem.pool(x)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        features[-1] = self.relu(self.norm(x))
        return features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.norm(self.stages(self.stem(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits)

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.head.fc = ConvClassifierHead.classifier(self.num_features, num_classes)


def _resnet(block, layers: list[int], **kwargs) -> ResNet:
    return ResNet(block, layers, **kwargs)


def _resnet_d(block, layers: list[int], **kwargs) -> ResNet:
    """ResNet-D as timm builds it: ResNet-C's deep stem (32, 32, 64 channels) and average-pool shortcuts."""
    return ResNet(block, layers, deep_stem=True, shortcut="D", **kwargs)


def _preact_resnet(block, layers: list[int], **kwargs) -> PreActResNet:
    return PreActResNet(block, layers, **kwargs)


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


# The later refinements, with timm's names, state-dict layouts and outputs (tests/test_zoo_variants.py).
@register_model(**_IMAGENET)
def resnet18d(**kwargs) -> ResNet:
    """ResNet-18-D: 11,708,744 parameters (timm's)."""
    return _resnet_d(BasicBlock, [2, 2, 2, 2], **kwargs)


@register_model(**_IMAGENET)
def resnet34d(**kwargs) -> ResNet:
    """ResNet-34-D: 21,816,904 parameters."""
    return _resnet_d(BasicBlock, [3, 4, 6, 3], **kwargs)


@register_model(**_IMAGENET)
def resnet50d(**kwargs) -> ResNet:
    """ResNet-50-D: 25,576,264 parameters."""
    return _resnet_d(Bottleneck, [3, 4, 6, 3], **kwargs)


@register_model(**_IMAGENET)
def resnet101d(**kwargs) -> ResNet:
    """ResNet-101-D: 44,568,392 parameters."""
    return _resnet_d(Bottleneck, [3, 4, 23, 3], **kwargs)


@register_model(**_IMAGENET)
def resnet152d(**kwargs) -> ResNet:
    """ResNet-152-D: 60,212,040 parameters."""
    return _resnet_d(Bottleneck, [3, 8, 36, 3], **kwargs)


@register_model(**_IMAGENET)
def seresnet50(**kwargs) -> ResNet:
    """SE-ResNet-50 (Hu et al. 2018): 28,088,024 parameters."""
    return _resnet(Bottleneck, [3, 4, 6, 3], attention="se", **kwargs)


@register_model(**_IMAGENET)
def seresnet101(**kwargs) -> ResNet:
    """SE-ResNet-101: 49,326,872 parameters."""
    return _resnet(Bottleneck, [3, 4, 23, 3], attention="se", **kwargs)


@register_model(**_IMAGENET)
def seresnext50_32x4d(**kwargs) -> ResNet:
    """SE-ResNeXt-50 32x4d: 27,559,896 parameters."""
    return _resnet(Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4, attention="se", **kwargs)


@register_model(**_IMAGENET)
def seresnext101_32x8d(**kwargs) -> ResNet:
    """SE-ResNeXt-101 32x8d: 93,569,048 parameters."""
    return _resnet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=8, attention="se", **kwargs)


@register_model(**_IMAGENET)
def ecaresnet50d(**kwargs) -> ResNet:
    """ECA-ResNet-50-D (Wang et al. 2020): 25,576,350 parameters."""
    return _resnet_d(Bottleneck, [3, 4, 6, 3], attention="eca", **kwargs)


@register_model(**_IMAGENET)
def ecaresnet101d(**kwargs) -> ResNet:
    """ECA-ResNet-101-D: 44,568,563 parameters."""
    return _resnet_d(Bottleneck, [3, 4, 23, 3], attention="eca", **kwargs)


@register_model(**_IMAGENET)
def resnetv2_50(**kwargs) -> PreActResNet:
    """Pre-activation ResNet-50 (timm's ResNetV2 with BatchNorm): 25,549,352 parameters."""
    return _preact_resnet(PreActBottleneck, [3, 4, 6, 3], **kwargs)


@register_model(**_IMAGENET)
def resnetv2_101(**kwargs) -> PreActResNet:
    """Pre-activation ResNet-101: 44,541,480 parameters."""
    return _preact_resnet(PreActBottleneck, [3, 4, 23, 3], **kwargs)


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


# The pre-activation CIFAR networks of "Identity Mappings" (section 5, table 3): 16/32/64 planes on 32x32 inputs,
# n blocks per stage, projection shortcuts where the shape changes (the paper's code, resnet-1k-layers). The paper
# prints 1.7M parameters for ResNet-110 and -164 and 10.2M for ResNet-1001; those are the convolutions' and the
# classifier's, without the BN parameters: all included, 1,730,522 / 1,703,258 / 10,327,706 (as osmr/imgclsmob).
def _cifar_preact_resnet(block, n: int, num_classes: int = 10, **kwargs) -> PreActResNet:
    return PreActResNet(block, [n, n, n], num_classes=num_classes, stem="cifar", widths=(16, 32, 64), **kwargs)


@register_model(**_CIFAR)
def preact_resnet110(**kwargs) -> PreActResNet:
    """Pre-activation ResNet-110 for CIFAR (basic blocks, n=18): 1.7M parameters."""
    return _cifar_preact_resnet(PreActBasicBlock, 18, **kwargs)


@register_model(**_CIFAR)
def preact_resnet164(**kwargs) -> PreActResNet:
    """Pre-activation ResNet-164 for CIFAR (bottlenecks, n=18): 1.7M parameters."""
    return _cifar_preact_resnet(PreActBottleneck, 18, **kwargs)


@register_model(**_CIFAR)
def preact_resnet1001(**kwargs) -> PreActResNet:
    """Pre-activation ResNet-1001 for CIFAR (bottlenecks, n=111): 10.2M parameters."""
    return _cifar_preact_resnet(PreActBottleneck, 111, **kwargs)
