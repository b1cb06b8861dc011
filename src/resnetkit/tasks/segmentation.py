"""Semantic segmentation with a zoo ResNet as the encoder, as a task of the one engine: a U-Net decoder, an FCN
baseline head, VOC-style mask data, the synthetic shapes set, cross-entropy and Dice losses, confusion-matrix metrics.

    resnetkit train --config configs/segment_shapes.yaml
    resnetkit eval --checkpoint runs/shapes-r20/best.pt
    resnetkit predict --checkpoint runs/shapes-r20/best.pt photo.jpg --out overlays/

    >>> from resnetkit.tasks.segmentation import create_segmentation_model
    >>> model = create_segmentation_model("unet", "resnet50", num_classes=21)   # (N, 21, H, W) logits

Checkpoints carry the engine's keys with `task="segmentation"`; `model_name` is the head ("unet" or "fcn") and
`model_kwargs` its options (encoder name, encoder options, num_classes, decoder width).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from resnetkit.config import SEGMENTATION_HEADS as HEADS
from resnetkit.config import SEGMENTATION_LOSSES as LOSSES
from resnetkit.config import Config
from resnetkit.data.datasets import SkippedSample, stratified_indices
from resnetkit.data.image import IMAGE_SUFFIXES, BadImageError, decode_image, read_mask
from resnetkit.tasks import Task
from resnetkit.train.distributed import all_reduce_sum

IGNORE_INDEX = 255
VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


# ---------------------------------------------------------------------------------------------------- models


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNetDecoder(nn.Module):
    """U-Net decoder (Ronneberger et al. 2015, https://arxiv.org/abs/1505.04597) over an encoder's stage outputs.

    Starting from the deepest stage, each block upsamples to the next shallower feature map's exact size (so odd
    input sizes need no padding), concatenates that skip connection, and applies two 3x3 conv-BN-ReLU. A last block
    upsamples to the input resolution. Widths halve at each block from `channels`, never below 16.
    """

    def __init__(self, feature_channels: Sequence[int], num_classes: int, channels: int = 256) -> None:
        super().__init__()
        skips = list(feature_channels[:-1])[::-1]  # shallower features, deepest first
        widths = [max(channels >> i, 16) for i in range(len(skips) + 1)]
        cin = feature_channels[-1]
        self.blocks = nn.ModuleList()
        for skip, width in zip(skips, widths):
            self.blocks.append(nn.Sequential(_conv_bn_relu(cin + skip, width), _conv_bn_relu(width, width)))
            cin = width
        self.final = nn.Sequential(_conv_bn_relu(cin, widths[-1]), _conv_bn_relu(widths[-1], widths[-1]))
        self.classifier = nn.Conv2d(widths[-1], num_classes, kernel_size=1)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = features[-1]
        for block, skip in zip(self.blocks, features[-2::-1]):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.classifier(self.final(x))


class FCNHead(nn.Module):
    """FCN baseline (Long et al. 2015, https://arxiv.org/abs/1411.4038) as torchvision builds it: the last stage
    through a 3x3 conv-BN-ReLU (a quarter of its channels), dropout, a 1x1 classifier, then bilinear upsampling.

    `channels` is not used: the hidden width follows the encoder, and both heads take the same arguments."""

    def __init__(self, feature_channels: Sequence[int], num_classes: int, channels: int = 256) -> None:
        super().__init__()
        cin = feature_channels[-1]
        inter = max(cin // 4, 16)
        self.body = nn.Sequential(_conv_bn_relu(cin, inter), nn.Dropout(0.1), nn.Conv2d(inter, num_classes, 1))

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.body(features[-1]), size=size, mode="bilinear", align_corners=False)


class SegmentationModel(nn.Module):
    """A zoo encoder (its `forward_stages`, described by `feature_info`) and a decoder head: (N, C, H, W) logits at
    the input resolution, whatever H and W are."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder.forward_stages(x), size=tuple(x.shape[-2:]))


def create_segmentation_model(
    head: str,
    encoder: str,
    num_classes: int,
    weights: str | None = None,
    encoder_options: dict[str, Any] | None = None,
    decoder_channels: int = 256,
) -> SegmentationModel:
    """A U-Net ("unet") or FCN ("fcn") on the zoo model `encoder`, built by `resnetkit.create_model`.

    weights: the encoder's weights as `create_model` takes them ("imagenet", a file path, or None).
    encoder_options: further create_model options, e.g. {"stem": "cifar"} for small images.
    """
    from resnetkit.models import create_model

    if head not in HEADS:
        raise ValueError(f"unknown segmentation head {head!r}; choose one of {', '.join(HEADS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 (background and one class), got {num_classes}")
    enc = create_model(encoder, weights=weights, **(encoder_options or {}))
    if not hasattr(enc, "forward_stages") or not hasattr(enc, "feature_info"):
        raise ValueError(f"model {encoder!r} has no forward_stages/feature_info: it cannot be an encoder")
    enc.reset_classifier(0)  # the classifier is unused: keep it out of the parameters (and of DDP's unused set)
    channels = [info["channels"] for info in enc.feature_info]
    decoder_cls = UNetDecoder if head == "unet" else FCNHead
    return SegmentationModel(enc, decoder_cls(channels, num_classes, decoder_channels), num_classes)


# ---------------------------------------------------------------------------------------------------- data


class SegmentationFolder(torch.utils.data.Dataset):
    """Images and PNG masks of the same stem: (image, mask) as uint8 (3, H, W) and int64 (H, W) before `transform`
    (which takes and returns the pair: `mask_transform`); 255 in a mask means "ignore this pixel". An unreadable
    image or mask gives a SkippedSample unless `strict`."""

    def __init__(self, pairs: list[tuple[Path, Path]], classes: list[str], strict: bool = False) -> None:
        self.pairs = pairs
        self.classes = classes
        self.transform = None
        self.strict = strict

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def targets(self) -> list[int]:
        return [0] * len(self.pairs)  # no per-image class: a subset is a plain seeded draw

    def select(self, indices) -> None:
        self.pairs = [self.pairs[i] for i in indices]

    def __getitem__(self, i: int):
        image_path, mask_path = self.pairs[i]
        try:
            image = decode_image(image_path)
            mask = torch.from_numpy(read_mask(mask_path).astype(np.int64))
        except BadImageError as e:
            if self.strict:
                raise
            return SkippedSample(str(image_path), e.reason)
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            reason = f"mask {mask_path} is {tuple(mask.shape)}, the image {tuple(image.shape[-2:])}"
            if self.strict:
                raise BadImageError(image_path, reason)
            return SkippedSample(str(image_path), reason)
        return self.transform(image, mask) if self.transform is not None else (image, mask)


def mask_transform(augmenting: bool, preprocess: dict[str, Any]):
    """(uint8 image, int64 mask) -> (normalised float image, int64 mask), both resized to the input_size square
    (bilinear / nearest), flipped together at random when augmenting."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    size = [preprocess["input_size"]] * 2
    ops = [v2.Resize(size, antialias=True)] + ([v2.RandomHorizontalFlip()] if augmenting else [])
    ops += [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(preprocess["mean"], preprocess["std"]),
    ]
    compose = v2.Compose(ops)

    def apply(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = compose(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)

    return apply


def _find_pairs(images_dir: Path, masks_dir: Path, ids: list[str] | None) -> list[tuple[Path, Path]]:
    if not masks_dir.is_dir():
        raise FileNotFoundError(f"mask folder not found: {masks_dir}")
    images = {p.stem: p for p in sorted(images_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    masks = {p.stem: p for p in sorted(masks_dir.iterdir()) if p.suffix.lower() == ".png"}
    if ids is None:
        ids = sorted(images)
    pairs, missing = [], []
    for stem in ids:
        if stem in images and stem in masks:
            pairs.append((images[stem], masks[stem]))
        else:
            missing.append(stem)
    if missing:
        raise ValueError(
            f"{len(missing)} image(s) without a matching image/mask pair in {images_dir} and "
            f"{masks_dir}, e.g. {missing[:3]}"
        )
    if not pairs:
        raise ValueError(f"no images found in {images_dir}")
    return pairs


def _resolve_folder(root: Path, split: str) -> tuple[list[tuple[Path, Path]], Path]:
    """Layouts: root/<split>/{images,masks}/ or VOC (root/JPEGImages, SegmentationClass, ImageSets/Segmentation)."""
    if (root / split / "images").is_dir():
        return _find_pairs(root / split / "images", root / split / "masks", None), root
    if (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
        list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not list_file.is_file():
            raise FileNotFoundError(f"VOC split list not found: {list_file}")
        ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
        return _find_pairs(root / "JPEGImages", root / "SegmentationClass", ids), root
    if split in ("val", "test") and (root / "val" if split == "test" else root / "test").joinpath("images").is_dir():
        return _resolve_folder(root, "val" if split == "test" else "test")
    raise FileNotFoundError(
        f"no segmentation data for split {split!r} in {root}: expected {root}/{split}/images/ and "
        f"{root}/{split}/masks/, or a VOC layout (JPEGImages/, SegmentationClass/, "
        "ImageSets/Segmentation/)"
    )


def _folder_classes(root: Path, pairs: list[tuple[Path, Path]]) -> list[str]:
    """classes.txt (one name per line, line number = class index) if present, VOC names for a VOC layout,
    otherwise class_0..class_K from the largest index found in the masks."""
    names_file = root / "classes.txt"
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if len(names) < 2:
            raise ValueError(f"{names_file} must list at least 2 classes (background first), found {len(names)}")
        return names
    if (root / "JPEGImages").is_dir():
        return list(VOC_CLASSES)
    top = max(int(np.max(np.where(m == IGNORE_INDEX, 0, m))) for m in (read_mask(p) for _, p in pairs))
    return [f"class_{i}" for i in range(max(top + 1, 2))]


def is_shapes(name: str) -> bool:
    return name == "shapes" or name.startswith("shapes:")


def is_shapes_multi(name: str) -> bool:
    return name == "shapes-multi" or name.startswith("shapes-multi:")


def segmentation_data(name: str, split: str, image_size: int):
    """The built-in shapes (`shapes` or `shapes:N`, one shape per image) or `shapes-multi` (`shapes-multi:N`, 1 to
    4 shapes of different classes per image), as `resnetkit.data.build_dataset` names them, as uint8 tensors with
    their class masks (a TensorData whose labels are the masks; classes: background and the ten shapes), or a
    folder of images and PNG masks (a SegmentationFolder): <split>/images + <split>/masks, or a VOC layout."""
    if is_shapes(name) or is_shapes_multi(name):
        from resnetkit.data import SHAPE_CLASSES, build_dataset
        from resnetkit.data.fast import TensorData

        shapes = build_dataset(name, split, image_size=image_size)
        if is_shapes(name):
            images, masks = shapes.uint8_tensors()[0], shapes.masks.long()
        else:  # one rendering gives an item's image and its mask
            pairs = [(shapes.load(i), shapes.mask(i)) for i in range(len(shapes))]
            images, masks = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]).long()
        return TensorData(images, masks, ["background", *SHAPE_CLASSES])
    root = Path(name)
    if not root.is_dir():
        raise FileNotFoundError(f"segmentation data not found: {name!r} is neither 'shapes[:N]' nor a folder")
    pairs, root = _resolve_folder(root, split)
    return SegmentationFolder(pairs, _folder_classes(root, pairs))


# ---------------------------------------------------------------------------------------------------- losses


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX, eps: float = 1.0
) -> torch.Tensor:
    """Soft Dice loss (Milletari et al. 2016): 1 - mean over classes of 2|P.T| / (|P| + |T|) over the batch,
    with softmax probabilities P and one-hot targets T; ignored pixels count for neither."""
    num_classes = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)
    probs = logits.float().softmax(dim=1) * valid
    onehot = F.one_hot(torch.where(valid.squeeze(1), target, 0), num_classes).permute(0, 3, 1, 2) * valid
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    total = probs.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2 * inter + eps) / (total + eps)).mean()


class SegmentationLoss(nn.Module):
    """ "ce" (pixel cross-entropy), "dice" (soft Dice) or "ce+dice" (their sum), all skipping `ignore_index`."""

    def __init__(self, kind: str = "ce", ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"unknown segmentation loss {kind!r}; choose one of {', '.join(LOSSES)}")
        self.kind = kind
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = logits.new_zeros(())
        if "ce" in self.kind.split("+"):
            loss = loss + F.cross_entropy(logits, target, ignore_index=self.ignore_index)
        if "dice" in self.kind:
            loss = loss + dice_loss(logits, target, self.ignore_index)
        return loss


# ---------------------------------------------------------------------------------------------------- metrics


class SegmentationMetrics:
    """A confusion matrix over pixels (rows = target, columns = prediction), pixels marked `ignore_index` skipped.

    compute(): miou and mean_dice average the classes present in the targets or predictions (an absent class has
    no IoU, as torchmetrics' macro average treats it); pixel_acc = correct / counted pixels.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """preds: class indices (N, H, W) or logits (N, C, H, W); target: (N, H, W)."""
        if preds.dim() == target.dim() + 1:
            preds = preds.argmax(dim=1)
        if preds.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(preds.shape)} does not match target {tuple(target.shape)}")
        preds, target = preds.reshape(-1).cpu().long(), target.reshape(-1).cpu().long()
        keep = target != self.ignore_index
        preds, target = preds[keep], target[keep]
        if target.numel() and int(target.max()) >= self.num_classes:
            raise ValueError(
                f"mask holds class {int(target.max())} but the model has {self.num_classes} classes "
                f"(use {self.ignore_index} for pixels to ignore)"
            )
        index = target * self.num_classes + preds.clamp(0, self.num_classes - 1)
        self.confusion += torch.bincount(index, minlength=self.num_classes**2).view(self.num_classes, -1)

    def compute(self) -> dict[str, Any]:
        cm = self.confusion.double()
        tp = cm.diag()
        fp = cm.sum(0) - tp
        fn = cm.sum(1) - tp
        present = (tp + fp + fn) > 0
        iou = torch.where(present, tp / (tp + fp + fn).clamp(min=1), torch.nan)
        dice = torch.where(present, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.nan)
        total = cm.sum()
        return {
            "miou": float(iou[present].mean()) if present.any() else 0.0,
            "mean_dice": float(dice[present].mean()) if present.any() else 0.0,
            "pixel_acc": float(tp.sum() / total) if total > 0 else 0.0,
            "per_class_iou": [float(v) for v in iou],
            "per_class_dice": [float(v) for v in dice],
        }


# ---------------------------------------------------------------------------------------------------- overlays


def palette(num_colors: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (num_colors, 3) uint8: class 0 black, 1 maroon, 2 green, ... a fixed palette."""
    colors = np.zeros((num_colors, 3), dtype=np.uint8)
    for i in range(num_colors):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colors[i] = (r, g, b)
    return colors


def overlay(
    image: Image.Image,
    mask: np.ndarray,
    alpha: float = 0.5,
    classes: Sequence[str] | None = None,
    background: int | None = 0,
) -> Image.Image:
    """Blend the palette colour of each pixel's class into `image`; pixels of class `background` stay as they are.

    classes: when given, a legend strip naming the classes present is drawn below the image.
    """
    from PIL import ImageDraw, ImageFont

    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    if mask.shape != base.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image size {base.shape[:2]}")
    colors = palette()[mask].astype(np.float32)
    blend = (1 - alpha) * base + alpha * colors
    if background is not None:
        blend = np.where((mask == background)[..., None], base, blend)
    out = Image.fromarray(blend.round().clip(0, 255).astype(np.uint8))
    if classes is None:
        return out
    present = [int(c) for c in np.unique(mask) if c != background and c < len(classes)]
    font_size = max(11, out.width // 40)  # legible on a photo as on a 32-pixel thumbnail
    font = ImageFont.load_default(size=font_size)
    row_h = font_size + 4
    sheet = Image.new("RGB", (out.width, out.height + row_h * max(len(present), 1) + 4), "white")
    sheet.paste(out, (0, 0))
    draw = ImageDraw.Draw(sheet)
    for k, c in enumerate(present):
        y = out.height + 2 + k * row_h
        box = [2, y + 2, 2 + font_size, y + 2 + font_size - 2]
        draw.rectangle(box, fill=tuple(int(v) for v in palette()[c]), outline="black")
        draw.text((font_size + 6, y), classes[c], fill="black", font=font)
    if not present:
        draw.text((2, out.height + 2), "no objects", fill="black", font=font)
    return sheet


# ---------------------------------------------------------------------------------------------------- training


# ---------------------------------------------------------------------------------------------------- the task


class SegmentationTask(Task):
    """Segmentation for the engine: shapes (the cached tensor pipeline, masks cropped and flipped with the pixels)
    or mask folders (per-sample, image and mask resized and flipped together), the loss of `segmentation.loss`,
    mIoU / pixel accuracy / Dice from one confusion matrix summed over DDP ranks."""

    name = "segmentation"
    metric = "val_miou"

    def build_loaders(self, cfg: Config, info):
        from resnetkit.data import preprocess_info

        self.cfg = cfg
        d = cfg.data
        self.preprocess = preprocess_info("square", input_size=d.image_size or 64)
        data = segmentation_data(d.name, d.train_split, self.preprocess["input_size"])
        if d.subset is not None and d.subset < _size(data):
            data = _select(data, stratified_indices([0] * _size(data), d.subset, cfg.seed))
        self.classes = list(data.classes)
        self.loss_fn = SegmentationLoss(cfg.segmentation.loss, cfg.segmentation.ignore_index)
        train_loader = self._loader(data, cfg, info, d.batch_size // info.world_size, train=True)
        train_loader.set_augmentation(d.train_augment)
        val_loader = self.eval_loader(cfg, d.val_split, info) if d.val_split else None
        return train_loader, val_loader

    def eval_loader(self, cfg: Config, split: str, info):
        """The loader of `split` that `evaluate` reads (the classes must be the training split's)."""
        d = cfg.data
        data = segmentation_data(d.name, split, self.preprocess["input_size"])
        if len(data.classes) > len(self.classes):
            raise ValueError(
                f"{d.name} has {len(data.classes)} classes but the model was trained on {len(self.classes)}"
            )
        eval_batch = d.eval_batch_size or 2 * d.batch_size
        return self._loader(data, cfg, info, max(eval_batch // info.world_size, 1), train=False)

    def _loader(self, data, cfg: Config, info, batch_size: int, train: bool):
        from resnetkit.data import FileLoader, TensorLoader

        common = dict(
            batch_size=batch_size,
            train=train,
            device=info.device,
            preprocess=self.preprocess,
            seed=cfg.seed,
            rank=info.rank,
            world_size=info.world_size,
        )
        if isinstance(data, SegmentationFolder):
            transform = functools.partial(mask_transform, preprocess=self.preprocess)
            return FileLoader(data, workers=cfg.data.workers, transform_for=transform, **common)
        # Flips only (no pad-crop): the shapes fill most of the image, a shifted crop would cut them.
        ignore = cfg.segmentation.ignore_index
        return TensorLoader(data, padding=0, dense=True, ignore_index=ignore, **common)

    def build_model(self, cfg: Config, load_weights: bool):
        s = cfg.segmentation
        kwargs = {
            "encoder": cfg.model.name,
            "num_classes": cfg.model.num_classes or len(self.classes),
            "encoder_options": dict(cfg.model.options),
            "decoder_channels": s.decoder_channels,
        }
        weights = cfg.model.weights if load_weights else None
        return create_segmentation_model(s.head, weights=weights, **kwargs), s.head, kwargs

    @staticmethod
    def rebuild(model_name: str, model_kwargs: dict[str, Any]) -> nn.Module:
        return create_segmentation_model(model_name, **model_kwargs)

    def head_parameters(self, model: nn.Module) -> set[int]:
        return {id(p) for p in model.decoder.parameters()}

    def freeze(self, model: nn.Module, mode: str) -> list[nn.Module]:
        from resnetkit.train.optim import apply_freeze

        return apply_freeze(model.encoder, mode)  # "head": only the decoder learns

    def training_step(self, model: nn.Module, batch):
        images, masks = batch
        if self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = model(images)
        loss = self.loss_fn(logits.float(), masks)
        valid = masks != self.cfg.segmentation.ignore_index
        n = torch.tensor(float(images.shape[0]), device=loss.device)
        sums = {
            "loss": loss.detach() * n,
            "correct": ((logits.argmax(1) == masks) & valid).sum().float(),
            "pixels": valid.sum().float(),
            "count": n,
        }
        return loss, sums

    def train_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        return {
            "train_loss": totals["loss"] / max(totals["count"], 1),
            "train_pixel_acc": totals["correct"] / max(totals["pixels"], 1),
        }

    def evaluate(self, model: nn.Module, loader, cfg: Config, device: torch.device) -> dict[str, float]:
        result = evaluate_segmentation(model, loader, len(self.classes), cfg.segmentation.ignore_index, self.loss_fn)
        return {k: result[k] for k in ("loss", "miou", "pixel_acc", "mean_dice")}


def _size(data) -> int:
    return len(data) if isinstance(data, SegmentationFolder) else len(data.labels)


def _select(data, keep: list[int]):
    if isinstance(data, SegmentationFolder):
        data.select(keep)
        return data
    index = torch.as_tensor(keep)
    return type(data)(data.images[index], data.labels[index], data.classes)


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module, loader, num_classes: int, ignore_index: int = IGNORE_INDEX, loss_fn=None, progress=None
) -> dict[str, Any]:
    """mIoU, per-class IoU and Dice, pixel accuracy (and the mean per-image loss with `loss_fn`) of `model` over a
    loader of (images, masks); the confusion matrix and loss are summed over DDP ranks, so the numbers do not depend
    on how the images are batched or sharded."""
    was_training = model.training
    model.eval()
    metrics = SegmentationMetrics(num_classes, ignore_index)
    device = next(model.parameters()).device
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss x images, images
    for images, masks in loader:
        logits = model(images)
        if loss_fn is not None:  # image by image: Dice over a batch depends on the batch, and DDP batches differ
            sums[0] += sum(loss_fn(lg[None].float(), m[None]).double() for lg, m in zip(logits, masks))
        sums[1] += images.shape[0]
        metrics.update(logits.argmax(1), masks)
        if progress is not None:
            progress(images.shape[0])
    model.train(was_training)
    metrics.confusion = all_reduce_sum(metrics.confusion.to(device)).cpu()
    result = metrics.compute()
    total, count = all_reduce_sum(sums).tolist()
    result["num_images"] = int(count)
    if loss_fn is not None:
        result["loss"] = total / max(count, 1)
    return result


@torch.no_grad()
def predict_masks(model: nn.Module, images: list[torch.Tensor], preprocess: dict[str, Any]) -> list[np.ndarray]:
    """Class-index masks (H, W) uint8 at each uint8 image's own size: the model runs at the training size and its
    logits are resized back bilinearly before the argmax."""
    from resnetkit.data import eval_transform_from

    transform = eval_transform_from(preprocess)
    device = next(model.parameters()).device
    model.eval()
    masks = []
    for image in images:
        x = transform(image).unsqueeze(0).to(device)
        logits = F.interpolate(model(x), size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False)
        masks.append(logits.argmax(1)[0].to(torch.uint8).cpu().numpy())
    return masks


def predict_files(
    bundle, files, out_dir: str | Path, *, alpha: float = 0.5, save_masks: bool = False, progress=None
) -> list[dict[str, Any]]:
    """Segment image files with a segmentation bundle (`resnetkit.bundle.load_bundle`): writes <stem>_overlay.png
    (the image with class colours blended in, and a legend) and with `save_masks` <stem>_mask.png (a palette PNG of
    class indices) into `out_dir`; returns one record per file (its outputs, or the error that kept it from being
    read)."""
    from resnetkit.data.image import save_mask, to_pil
    from resnetkit.deploy.predict import read_batches

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records, done = [], 0
    for paths, images, errors in read_batches([Path(f) for f in files], 1):
        records += [{"image": str(p), "error": message} for p, message in errors]
        for path, image, mask in zip(paths, images, predict_masks(bundle.module, images, bundle.preprocess)):
            target = out / f"{path.stem}_overlay.png"
            overlay(to_pil(image), mask, alpha, classes=bundle.classes).save(target)
            record = {"image": str(path), "output": str(target)}
            if save_masks:
                record["mask"] = str(save_mask(mask, out / f"{path.stem}_mask.png", palette()))
            records.append(record)
        done += len(paths) + len(errors)
        if progress is not None:
            progress("segmenting", done, len(files))
    return records


def nan_none(v: float) -> float | None:
    return None if math.isnan(v) else v


TASK = SegmentationTask
