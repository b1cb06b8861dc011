"""Large JPEGs decoded at reduced scale (libjpeg's DCT scaling) when the output allows it: the same crops' geometry
as a full decode, pixel values within JPEG tolerance, and full-size decoding whenever the output needs the pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from resnetkit.data import build_loader, eval_transform_from, preprocess_info
from resnetkit.data.image import decode_image
from resnetkit.data.transforms import RandomResizedCropPlan


def photo(path, width=1600, height=1200, seed=0):
    """A photo-like JPEG: smooth colour gradients, a few soft blobs, mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([120 + 80 * np.sin(xx / 170 + c) * np.cos(yy / 230 - c) for c in range(3)], -1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(80, 300)
        pixels += rng.uniform(-60, 60, 3) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
    pixels += rng.normal(0, 3, pixels.shape)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def close(a: torch.Tensor, b: torch.Tensor, preprocess: dict) -> tuple[float, float]:
    """Mean and 99th-percentile absolute difference of two normalised images, in 0-255 pixel units."""
    std = torch.tensor(preprocess["std"]).view(3, 1, 1)
    diff = ((a - b) * std * 255).abs()
    return diff.mean().item(), diff.flatten().quantile(0.99).item()


def test_evaluation_resize_decodes_at_the_scale_it_allows(tmp_path):
    path = photo(tmp_path / "big.jpg")
    full, reduced = decode_image(path), decode_image(path, min_size=256)
    assert full.shape == (3, 1200, 1600) and reduced.shape == (3, 300, 400)  # 1/4: the shorter side stays >= 256
    assert decode_image(path, min_size=700).shape == (3, 1200, 1600)  # 1/2 would give 600 < 700: full size
    pre = preprocess_info("imagenet")
    transform = eval_transform_from(pre)
    mean, p99 = close(transform(full), transform(reduced), pre)
    assert mean < 1.5 and p99 < 6, (mean, p99)  # within JPEG tolerance (quality 90 itself errs by ~2 levels)
    small = photo(tmp_path / "small.jpg", 480, 360)
    assert decode_image(small, min_size=256).shape == (3, 360, 480)  # no scale keeps 256: decoded whole


@pytest.mark.parametrize("seed", range(6))
def test_planned_random_crop_has_the_full_decodes_geometry(tmp_path, seed):
    path = photo(tmp_path / "big.jpg", seed=seed)
    plan = RandomResizedCropPlan(224)
    torch.manual_seed(seed)
    box, min_size = plan(1600, 1200)
    top, left, h, w = box
    fixed = lambda width, height: (box, min_size)  # noqa: E731 - the same crop for both decodes
    full_only = lambda width, height: (box, None)  # noqa: E731
    reduced, full = decode_image(path, crop=fixed), decode_image(path, crop=full_only)
    assert full.shape == (3, h, w)
    scale = round(full.shape[1] / reduced.shape[1])  # the decode's 1/k, up to the crop's rounding to pixels
    assert scale in (1, 2, 4, 8) and min(reduced.shape[1:]) >= 224  # never fewer pixels than the output has
    assert abs(reduced.shape[1] * scale - h) <= scale and abs(reduced.shape[2] * scale - w) <= scale
    # The same region of the picture: resized to the output, the two agree within JPEG tolerance.
    from torchvision.transforms.v2 import functional as F

    a = F.resize(full, [224, 224], antialias=True).float()
    b = F.resize(reduced, [224, 224], antialias=True).float()
    assert (a - b).abs().mean() < 2.0 and (a - b).abs().flatten().quantile(0.99) < 9


def test_the_loader_uses_reduced_decoding_only_where_the_transform_allows(tmp_path):
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                photo(tmp_path / split / c / f"{i}.jpg", seed=i)
    train = build_loader(tmp_path, "train", preset="imagenet", batch_size=2, train=True, workers=0)
    assert train.dataset.crop_plan is not None and train.dataset.min_size is None
    val = build_loader(tmp_path, "val", preset="imagenet", batch_size=2, train=False, workers=0)
    assert val.dataset.crop_plan is None and val.dataset.min_size == 256
    cub = build_loader(tmp_path, "train", preset="cub448", batch_size=2, train=True, workers=0)
    assert cub.dataset.crop_plan is None and cub.dataset.min_size == 512
    cifar = build_loader(tmp_path, "val", preset="cifar", batch_size=2, train=False, workers=0, fast=False)
    assert cifar.dataset.min_size is None and cifar.dataset.crop_plan is None
    images, labels = next(iter(train))
    assert (
        images.shape == (2, 3, 224, 224)
        and images.dtype == torch.float32
        and labels.tolist() in ([0, 1], [1, 0], [0, 0], [1, 1])
    )
    # Evaluation batches equal the evaluation transform of each fully decoded image, within JPEG tolerance.
    batch, _ = next(iter(val))
    transform = eval_transform_from(val.preprocess)
    for i, (path, _) in enumerate(val.dataset.samples[:2]):
        mean, p99 = close(batch[i], transform(decode_image(path)), val.preprocess)
        assert mean < 1.5 and p99 < 6, (path, mean, p99)
    for loader in (train, val, cub, cifar):
        loader.close()
