"""Augmentation and preprocessing presets, the checkpoint's `preprocess` dict, normalisation statistics, mixup/cutmix.

Presets (per-sample, torchvision transforms v2, used by the DataLoader pipeline; the cached pipeline in `fast.py`
does the `cifar` preset a whole batch at a time):
- `cifar`: pad-4 random crop at the image size (32) + horizontal flip; evaluation: the image as it is.
- `imagenet`: RandomResizedCrop 224 + flip; evaluation: resize 256 + centre crop 224.
- `cub448`: resize 512 + random crop 448 + flip; evaluation: resize 512 + centre crop 448.
- `square` (segmentation): resize to an input_size square + flip; evaluation: the resize alone.
- `detection`: evaluation hands the detector [0, 1] pixels, which it resizes and normalises itself (its training
  transform, which moves the boxes with the pixels, is `resnetkit.tasks.detection.detection_transform`).
All of them take the uint8 RGB tensors of `resnetkit.data.image.decode_image`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

# The CIFAR-10 training set's per-channel statistics (official pixels). The dataset's own for CIFAR, ImageNet's for
# the rest, as in the source material.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The shapes dataset (seed 0, 32 px train split, 10,000 images): computed once with `compute_mean_std`.
SHAPES_MEAN, SHAPES_STD = (0.4756, 0.4750, 0.4770), (0.2153, 0.2150, 0.2150)


@dataclass(frozen=True)
class Preset:
    input_size: int
    resize: int  # evaluation: resize the shorter side to this, then centre crop input_size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


PRESETS = {
    "cifar": Preset(32, 32, CIFAR10_MEAN, CIFAR10_STD),
    "imagenet": Preset(224, 256, IMAGENET_MEAN, IMAGENET_STD),
    "cub448": Preset(448, 512, IMAGENET_MEAN, IMAGENET_STD),
    # Dense prediction (segmentation): images and masks resized straight to input_size squares.
    "square": Preset(64, 64, IMAGENET_MEAN, IMAGENET_STD),
    # Detection: the detector resizes to input_size (its longer side) and normalises inside the model.
    "detection": Preset(512, 512, IMAGENET_MEAN, IMAGENET_STD),
}
# Optional per-sample augmentations by name. Erasing works on the normalised tensor, the others on the image.
EXTRAS = ("trivialaugment", "randaugment", "autoaugment", "colorjitter", "erasing")


def _check_name(kind: str, name: str, valid: Iterable[str]) -> None:
    valid = list(valid)
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown {kind} {name!r}{hint}; expected one of: {', '.join(valid)}")


def get_preset(name: str) -> Preset:
    _check_name("preset", name, PRESETS)
    return PRESETS[name]


def check_extras(extras: Sequence[str]) -> tuple[str, ...]:
    for name in extras:
        _check_name("augmentation", name, EXTRAS)
    return tuple(extras)


def preprocess_info(
    preset: str, mean: Sequence[float] | None = None, std: Sequence[float] | None = None, input_size: int | None = None
) -> dict:
    """The checkpoint's `preprocess` dict: what evaluation, prediction, serving and export need to rebuild the
    evaluation transform. `input_size` overrides the preset's (the `cifar` preset follows the image size)."""
    p = get_preset(preset)
    size = input_size or p.input_size
    # Keep the preset's resize/crop ratio (256/224 for ImageNet) when the input size changes.
    resize = p.resize if size == p.input_size else round(size * p.resize / p.input_size)
    mean, std = list(mean or p.mean), list(std or p.std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"preprocess: mean and std need 3 values each, std > 0; got mean={mean}, std={std}")
    return {
        "preset": preset,
        "input_size": int(size),
        "resize": int(resize),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
    }


def check_preprocess(preprocess: dict) -> dict:
    """Validate a `preprocess` dict (e.g. from a checkpoint) and return it; the message names the missing key."""
    if not isinstance(preprocess, dict):
        raise ValueError(f"preprocess must be a dict, got {type(preprocess).__name__}")
    for key in ("preset", "input_size", "resize", "mean", "std"):
        if key not in preprocess:
            raise ValueError(f"preprocess dict has no {key!r} key (has: {', '.join(sorted(preprocess))})")
    return preprocess


class TrimAspect(torch.nn.Module):
    """Centre-crop the long side of a pathologically thin image to `max_ratio` times the short one.

    The evaluation transform (resize the short side, centre crop) only looks at the central square, and cub448's
    training crop at a square, but resizing a 64000x1 image first would allocate gigabytes: a cheap denial of
    service that the pixel limit does not catch.
    Photos (up to 8:1 panoramas) pass untouched; thinner images may shift by a sub-pixel after resizing.
    """

    def __init__(self, max_ratio: float = 8.0) -> None:
        super().__init__()
        self.max_ratio = max_ratio

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        short, long = min(w, h), max(w, h)
        if long <= self.max_ratio * short:
            return img
        keep = round(self.max_ratio * short)
        keep += (long - keep) % 2  # an even margin keeps the centre exactly where it was
        margin = (long - keep) // 2
        return img[..., :, margin : margin + keep] if w > h else img[..., margin : margin + keep, :]


_CACHE_BYTES = 1 << 20  # the float bytes `normalize` writes at a time on the CPU: within a core's L2 cache


def _float_batch(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """An uninitialised float32 tensor for `normalize`. On the CPU in memory from malloc (numpy's allocator), not
    torch's: torch asks glibc for 64-byte-aligned blocks, which glibc does not carve from a freed block of the same
    size, so a batch made while the consumer still holds the previous one (every training loop) got fresh pages
    most times, page-faulting 77 MB (a CUB batch) in 40-260 ms on the VM of BENCHMARKS.md where reused memory takes
    10 ms. Under train.keep_freed_memory malloc hands the freed block back."""
    if device.type == "cpu":
        return torch.from_numpy(np.empty(tuple(shape), dtype=np.float32))
    return torch.empty(tuple(shape), dtype=torch.float32, device=device)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (3, H, W) or (N, 3, H, W) -> float (x / 255 - mean) / std: the one normalisation, per sample (the
    evaluation transform) and per batch (the loaders) alike, so both give the same bits."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    scale, shift = 1.0 / (255.0 * std), mean / std
    out = _float_batch(images.shape, images.device)
    # A CPU batch goes a cache-sized group of images at a time (2-3x faster than three passes over the whole batch
    # in memory); in place on the float copy: 4x faster than one addcmul from uint8 on this CPU.
    group = max(1, _CACHE_BYTES // (4 * images[0].numel())) if images.ndim == 4 and out.device.type == "cpu" else None
    for start in range(0, len(images), group) if group else (None,):
        part = slice(start, start + group) if group else slice(None)
        out[part].copy_(images[part]).mul_(scale).sub_(shift)
    return out


class Normalize(torch.nn.Module):
    """`normalize` as a transform step: the decoder's uint8 image in, the model's float input out."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.mean, self.std = list(mean), list(std)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return normalize(torch.as_tensor(img), self.mean, self.std)


class RandomResizedCropPlan:
    """RandomResizedCrop's crop, chosen from an image's size alone (its header), before it is decoded, so that a large
    JPEG can be decoded at the reduced scale the crop allows. The crop is torchvision's `RandomResizedCrop.get_params`
    (the same draws from the global generator), in the upright image's pixels; `decode_image(crop=plan)` cuts it and
    the transform resizes it to `size` x `size`."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> None:
        self.size, self.scale, self.ratio = size, scale, ratio

    def __call__(self, width: int, height: int) -> tuple[tuple[int, int, int, int], int]:
        """((top, left, height, width) of the crop, the shorter side the image may be decoded down to)."""
        from torchvision.transforms import RandomResizedCrop

        top, left, h, w = RandomResizedCrop.get_params(
            torch.empty(3, height, width, device="meta"), self.scale, self.ratio
        )
        # Decoded at 1/k, the crop keeps min(h, w) / k pixels on its shorter side: at least `size` of them.
        return (top, left, h, w), -(-min(width, height) * self.size // max(min(h, w), 1))


def eval_transform_from(preprocess: dict) -> v2.Compose:
    """The evaluation transform (uint8 RGB tensor (3, H, W) from `decode_image` -> normalised float tensor) that a
    `preprocess` dict describes: resize the shorter side, centre crop; "square" resizes straight to the square."""
    p = check_preprocess(preprocess)
    if p["preset"] == "detection":  # the detector resizes and normalises its inputs itself
        return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    if p["preset"] == "square":
        size = [p["input_size"], p["input_size"]]
        geometric = [v2.Resize(size, antialias=True)]
    else:
        geometric = [*fixed_head(p, train=False), v2.CenterCrop(p["input_size"])]
    return v2.Compose([*geometric, Normalize(p["mean"], p["std"])])


def fixed_head(preprocess: dict, train: bool) -> list[torch.nn.Module]:
    """The steps a preset's transform starts with that do the same to an image every time: `TrimAspect` and the
    resize of the shorter side, in the evaluation transforms (cifar, imagenet, cub448) and cub448's training
    transform alike; [] where the transform starts at random (cifar and imagenet training) or has no such steps
    (square, detection). `fast.pixel_cache` stores images with these steps done, and the loaders then leave them
    out."""
    p = check_preprocess(preprocess)
    if p["preset"] in ("square", "detection") or (train and p["preset"] != "cub448"):
        return []
    return [TrimAspect(), v2.Resize(p["resize"], antialias=True)]


def build_transform(
    preset: str,
    train: bool,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    extras: Sequence[str] = (),
    input_size: int | None = None,
    *,
    planned_crop: bool = False,
    normalized: bool = True,
) -> v2.Compose:
    """The per-sample transform of a preset (uint8 RGB tensor -> normalised float tensor). `extras` names optional
    augmentations from EXTRAS, applied only when training.

    planned_crop: the `imagenet` preset's random crop was already cut while decoding (`RandomResizedCropPlan`):
    only resize it. normalized=False: stop at uint8 (the loaders normalise whole batches with `normalize`, and apply
    random erasing to the batch then).
    """
    info = preprocess_info(preset, mean, std, input_size)
    if not train:
        steps = eval_transform_from(info).transforms
        return v2.Compose(steps if normalized else steps[:-1])
    extras = check_extras(extras)
    size = info["input_size"]
    if preset == "cifar":
        geometric = [v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()]
    elif preset == "imagenet" and planned_crop:
        geometric = [v2.Resize([size, size], antialias=True), v2.RandomHorizontalFlip()]
    elif preset == "imagenet":
        geometric = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    elif preset == "square":
        geometric = [v2.Resize([size, size], antialias=True), v2.RandomHorizontalFlip()]
    else:  # cub448
        geometric = [*fixed_head(info, train=True), v2.RandomCrop(size), v2.RandomHorizontalFlip()]
    photometric = {
        "trivialaugment": v2.TrivialAugmentWide(),
        "randaugment": v2.RandAugment(),
        "autoaugment": v2.AutoAugment(),
        "colorjitter": v2.ColorJitter(0.4, 0.4, 0.4),
    }
    steps = [*geometric, *(photometric[e] for e in extras if e in photometric)]
    if normalized:
        steps.append(Normalize(info["mean"], info["std"]))
        if "erasing" in extras:
            steps.append(v2.RandomErasing(p=0.25))
    return v2.Compose(steps)


def decode_min_size(preprocess: dict, train: bool) -> int | None:
    """The shorter side a decoded image may be reduced to without changing what the preset's transform makes of it:
    its first resize ("imagenet" evaluation, "cub448", "square"); None for "cifar" (small images, crop with padding)
    and for the "imagenet" training crop (`RandomResizedCropPlan` decides per image)."""
    preset = preprocess["preset"]
    if preset == "cifar" or (preset == "imagenet" and train) or preset == "detection":
        return None
    return preprocess["input_size"] if preset == "square" else preprocess["resize"]


def mixup_cutmix(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-level mixup and/or cutmix (one of them per batch, chosen at random when both are on).

    Returns the mixed images and soft labels (N, num_classes) that sum to 1; with both alphas 0 the images are
    unchanged and the labels one-hot.
    """
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha}, {cutmix_alpha}")
    ops = []
    if mixup_alpha > 0:
        ops.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        ops.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not ops:
        return images, torch.nn.functional.one_hot(labels, num_classes).to(images.dtype)
    op = ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
    return op(images, labels)


def compute_mean_std(source, max_images: int | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (pixels scaled to [0, 1]) of a folder of images (searched recursively), a dataset
    from `build_dataset`, or a uint8 tensor (N, 3, H, W). Unreadable files are skipped and reported once."""
    if isinstance(source, torch.Tensor):
        batches: Iterable[torch.Tensor] = source.split(1024)
    elif isinstance(source, (str, Path)):
        batches = _folder_batches(Path(source), max_images)
    else:
        batches = _dataset_batches(source, max_images)
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    count = 0
    for x in batches:
        x = x.to(torch.float64).div_(255).transpose(0, 1).reshape(3, -1)
        total += x.sum(1)
        total_sq += (x * x).sum(1)
        count += x.shape[1]
    if count == 0:
        raise ValueError(f"no readable images in {source}")
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    return [round(v, 4) for v in mean.tolist()], [round(v, 4) for v in std.tolist()]


def _folder_batches(folder: Path, max_images: int | None):
    from resnetkit.data.datasets import report_skipped
    from resnetkit.data.image import BadImageError, decode_image, list_images

    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} does not exist")
    files = list_images([folder])
    skipped = []
    for path in files[:max_images]:
        try:
            yield decode_image(path).unsqueeze(0)
        except BadImageError as e:
            skipped.append((str(path), e.reason))
    report_skipped(skipped, len(files[:max_images]))


def _dataset_batches(dataset, max_images: int | None):
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    for i in range(n):
        item = dataset[i]
        if isinstance(item, tuple):
            yield item[0].unsqueeze(0)
