"""Datasets, augmentation presets and loaders (see docs/data.md).

>>> from resnetkit.data import build_loader
>>> loader = build_loader("shapes", "train", preset="cifar", batch_size=128, train=True, device="cpu")
"""

from resnetkit.data.datasets import (
    CIFAR,
    CUB200,
    DEFAULT_MAX_PIXELS,
    BadImageError,
    ImageFolder,
    Shapes,
    SkippedSample,
    build_dataset,
    open_image,
    to_rgb,
)
from resnetkit.data.loader import Loader, build_loader, collate_skipping
from resnetkit.data.synthetic import SHAPE_CLASSES, render_shapes
from resnetkit.data.transforms import (
    PRESETS,
    build_transform,
    compute_mean_std,
    eval_transform_from,
    mixup_cutmix,
    preprocess_info,
)

__all__ = [
    "CIFAR",
    "CUB200",
    "DEFAULT_MAX_PIXELS",
    "PRESETS",
    "SHAPE_CLASSES",
    "BadImageError",
    "ImageFolder",
    "Loader",
    "Shapes",
    "SkippedSample",
    "build_dataset",
    "build_loader",
    "build_transform",
    "collate_skipping",
    "compute_mean_std",
    "eval_transform_from",
    "mixup_cutmix",
    "open_image",
    "preprocess_info",
    "render_shapes",
    "to_rgb",
]
