"""Semantic segmentation with a zoo ResNet as the encoder: a U-Net decoder, an FCN baseline head, VOC-style mask
data, the synthetic shapes set, cross-entropy and Dice losses, confusion-matrix metrics, train / eval / predict.

    resnetkit segment train --data shapes --model resnet18 --stem cifar --image-size 64 --epochs 6
    resnetkit segment eval runs/segment-shapes/best.pt --data shapes
    resnetkit segment predict runs/segment-shapes/best.pt photo.jpg --out overlays/

    >>> from resnetkit.tasks.segmentation import create_segmentation_model
    >>> model = create_segmentation_model("unet", "resnet50", num_classes=21)   # (N, 21, H, W) logits

Checkpoints are one dict, written atomically by `resnetkit.checkpoint.save_checkpoint`, with the usual keys plus
`task="segmentation"`; `model_name` is the head ("unet" or "fcn") and `model_kwargs` its options (encoder name,
encoder options, num_classes, decoder width), so `segmentation_model_from_checkpoint` rebuilds it exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from resnetkit.config import dataclass_from_dict

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
HEADS = ("unet", "fcn")
LOSSES = ("ce", "dice", "ce+dice")
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


def segmentation_model_from_checkpoint(path: str | Path) -> tuple[SegmentationModel, dict[str, Any]]:
    """Rebuild the model a `segment train` checkpoint holds, in eval mode, and return it with the checkpoint."""
    from resnetkit.checkpoint import CheckpointError, load_checkpoint

    ckpt = load_checkpoint(path)
    if ckpt.get("task") != "segmentation":
        raise CheckpointError(
            f"{path} is not a segmentation checkpoint (task={ckpt.get('task')!r}); "
            "it was not written by `resnetkit segment train`"
        )
    model = create_segmentation_model(ckpt["model_name"], **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt


# ---------------------------------------------------------------------------------------------------- data


def read_mask(path: str | Path) -> np.ndarray:
    """Class indices (H, W) uint8 from a palette ("P") or greyscale ("L") PNG, as VOC stores them.

    An RGB mask holds colours, not indices: it is refused rather than guessed at.
    """
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise ValueError(
                f"mask {path} is a {im.mode}-mode image; masks must be palette (P) or greyscale (L) "
                "PNGs whose pixel values are class indices (255 = ignore)"
            )
        return np.array(im, dtype=np.uint8)


def _normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, 3, H, W) or (3, H, W) -> float, normalised with per-channel mean and std."""
    m = torch.tensor(mean).view(-1, 1, 1)
    s = torch.tensor(std).view(-1, 1, 1)
    return (images.float() / 255.0 - m) / s


def preprocess_image(image: Image.Image, preprocess: dict[str, Any]) -> torch.Tensor:
    """A PIL image -> normalised float (3, S, S) as the model saw images in training (S = preprocess input_size)."""
    size = preprocess["input_size"]
    image = image.convert("RGB").resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return _normalize(x, preprocess["mean"], preprocess["std"])


class SegmentationFolder(torch.utils.data.Dataset):
    """Images and PNG masks of the same stem, resized to `image_size` squares (bilinear / nearest).

    Returns (uint8 image (3, S, S), int64 mask (S, S)); 255 in a mask means "ignore this pixel".
    """

    def __init__(self, pairs: list[tuple[Path, Path]], classes: list[str], image_size: int) -> None:
        self.pairs = pairs
        self.classes = classes
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[i]
        size = (self.image_size, self.image_size)
        with Image.open(image_path) as im:
            image = im.convert("RGB").resize(size, Image.BILINEAR)
        mask = Image.fromarray(read_mask(mask_path)).resize(size, Image.NEAREST)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return x, torch.from_numpy(np.asarray(mask, dtype=np.uint8).astype(np.int64))


class TensorSegmentation(torch.utils.data.Dataset):
    """In-memory images (N, 3, H, W) uint8 and masks (N, H, W): the synthetic set."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, classes: list[str]) -> None:
        self.images = images
        self.masks = masks.long()
        self.classes = classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.masks[i]


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


def shapes_segmentation(n: int, image_size: int, seed: int, split: str) -> TensorSegmentation:
    """The built-in synthetic set: `resnetkit.data.synthetic.render_shapes` images with their masks."""
    from resnetkit.data import synthetic

    images, _, masks = synthetic.render_shapes(n, image_size, seed, split)
    names = list(getattr(synthetic, "SHAPE_CLASSES", None) or getattr(synthetic, "CLASSES", None) or [])
    top = int(masks.max())
    if len(names) < top:
        names = [f"shape_{i}" for i in range(top)]
    return TensorSegmentation(torch.as_tensor(images), torch.as_tensor(masks), ["background", *names])


def build_segmentation_dataset(
    data: str, split: str, image_size: int, *, num_images: int | None = None, seed: int = 0
) -> torch.utils.data.Dataset:
    """ "shapes" (synthetic; `num_images` per split, val/test get a quarter) or a folder of images and PNG masks."""
    if data == "shapes":
        n = num_images or 256
        if split != "train":
            n = max(n // 4, 8)
        return shapes_segmentation(n, image_size, seed, split)
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"segmentation data not found: {data!r} is neither 'shapes' nor a folder")
    pairs, root = _resolve_folder(root, split)
    return SegmentationFolder(pairs, _folder_classes(root, pairs), image_size)


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


def mask_image(mask: np.ndarray) -> Image.Image:
    """Class indices (H, W) -> a palette PNG image (the VOC colour map), readable back with `read_mask`."""
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(palette().reshape(-1).tolist())
    return im


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


@dataclass
class SegmentationConfig:
    """One segmentation training run; saved as config.yaml in the run folder and in every checkpoint."""

    data: str = "shapes"
    """"shapes" (the synthetic set) or a folder: <split>/images + <split>/masks, or a VOC layout."""
    model: str = "resnet18"
    """Encoder: any zoo model with forward_stages (resnet18, resnet50, resnext50_32x4d, resnet20, ...)."""
    head: str = "unet"
    """"unet" (skip connections from every stage) or "fcn" (last stage only: the baseline)."""
    weights: str | None = None
    """Encoder weights: None, "imagenet", or a file (state dict / checkpoint / .safetensors)."""
    stem: str | None = None
    """Encoder stem for the ImageNet family: "imagenet" (stride 4) or "cifar" (stride 1, for small images)."""
    decoder_channels: int = 256
    """Width of the deepest U-Net decoder block, halved at each block up (the FCN head ignores it)."""
    image_size: int = 64
    """Images and masks are resized to image_size x image_size squares."""
    num_images: int = 256
    """Synthetic set only: training images (validation gets a quarter)."""
    loss: str = "ce+dice"
    """"ce", "dice", or "ce+dice"."""
    ignore_index: int = IGNORE_INDEX
    """Mask value of pixels that count for neither loss nor metrics (VOC borders)."""
    epochs: int = 10
    batch_size: int = 16
    repeat: int = 1
    """Passes over the training set that make one epoch: for tiny sets, so that validating, logging and saving once
    per epoch don't cost more than the training itself."""
    lr: float = 2e-3
    """Peak AdamW learning rate: linear warm-up over the first quarter of the steps, then cosine decay to zero."""
    weight_decay: float = 1e-4
    flip: bool = True
    """Random horizontal flips of image and mask together."""
    workers: int = 0
    """DataLoader worker processes for folder data (0 = load in the main process)."""
    device: str = "auto"
    threads: int | None = None
    """torch CPU threads (None: torch's default). On a CPU shared with other jobs 1 is often fastest: two threads on
    two busy cores spin at every synchronisation (a U-Net step measured 15 s instead of 0.7 s)."""
    seed: int = 0
    name: str = "segment"
    output_dir: str = "runs"
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head: unknown segmentation head {self.head!r}; choose one of {', '.join(HEADS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        for key in ("image_size", "epochs", "batch_size", "repeat", "num_images", "decoder_channels"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {self.image_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.stem not in (None, "imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need 3 values each (R, G, B)")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "segmentation config") -> SegmentationConfig:
        return dataclass_from_dict(cls, values, source)


@dataclass
class SegmentationResult:
    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    metrics: dict[str, Any]


def warmup_cosine(total_steps: int, warmup_fraction: float = 0.25):
    """The learning-rate factor per step: a linear warm-up over the first quarter, then a cosine decay to zero
    (one-cycle shaped; unlike OneCycleLR it accepts runs of one or two steps)."""
    warmup = max(1, round(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return factor


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _loader(dataset, batch_size: int, workers: int, generator=None, repeat: int = 1) -> torch.utils.data.DataLoader:
    """A training loader when `generator` (the shuffling) is given, an evaluation loader in order otherwise."""
    sampler = None
    if generator is not None:
        sampler = torch.utils.data.RandomSampler(dataset, num_samples=len(dataset) * repeat, generator=generator)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers)


def train_one_epoch(
    model, loader, loss_fn, optimizer, scheduler, device, cfg: SegmentationConfig, progress=None
) -> dict[str, float]:
    """One pass over `loader`; returns the mean loss and pixel accuracy over the epoch's training batches."""
    model.train()
    total_loss, correct, counted = 0.0, 0, 0
    for images, masks in loader:
        x = _normalize(images, cfg.mean, cfg.std).to(device, non_blocking=True)
        y = masks.to(device, non_blocking=True)
        if cfg.flip:
            flip = torch.rand(x.shape[0], device=device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            y = torch.where(flip[:, None, None], y.flip(-1), y)
        logits = model(x)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        valid = y != cfg.ignore_index
        correct += int(((logits.argmax(1) == y) & valid).sum())
        counted += int(valid.sum())
        total_loss += loss.item() * x.shape[0]
        if progress is not None:
            progress.update(images=x.shape[0], loss=loss.item(), lr=scheduler.get_last_lr()[0])
    n = len(loader.sampler)
    return {"loss": total_loss / max(n, 1), "pixel_acc": correct / max(counted, 1)}


@torch.no_grad()
def evaluate_model(
    model, loader, num_classes: int, device, mean, std, loss_fn=None, ignore_index: int = IGNORE_INDEX
) -> dict[str, Any]:
    """Metrics of `model` over `loader` (and its mean loss when `loss_fn` is given)."""
    model.eval()
    metrics = SegmentationMetrics(num_classes, ignore_index)
    total_loss = 0.0
    for images, masks in loader:
        x = _normalize(images, mean, std).to(device)
        y = masks.to(device)
        logits = model(x)
        if loss_fn is not None:
            total_loss += float(loss_fn(logits, y)) * x.shape[0]
        metrics.update(logits.argmax(1), y)
    result = metrics.compute()
    if loss_fn is not None:
        result["loss"] = total_loss / max(len(loader.dataset), 1)
    return result


def train_segmentation(
    config: SegmentationConfig | dict[str, Any], resume: str | Path | None = None, quiet: bool = False
) -> SegmentationResult:
    """Train a segmentation model; writes runs/<name>/ (config.yaml, last.pt, best.pt, metrics.jsonl, curves.png,
    tb/). resume: a last.pt to continue from (its epoch, optimizer and schedule included)."""
    import yaml

    from resnetkit.checkpoint import load_checkpoint, save_checkpoint
    from resnetkit.train.fit import rng_state, set_rng_state
    from resnetkit.train.monitor import Progress, RunLogger

    cfg = config if isinstance(config, SegmentationConfig) else SegmentationConfig.from_dict(config)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = _device(cfg.device)
    train_set = build_segmentation_dataset(cfg.data, "train", cfg.image_size, num_images=cfg.num_images, seed=cfg.seed)
    val_set = build_segmentation_dataset(cfg.data, "val", cfg.image_size, num_images=cfg.num_images, seed=cfg.seed)
    classes = list(train_set.classes)
    model_kwargs = {
        "encoder": cfg.model,
        "num_classes": len(classes),
        "encoder_options": {"stem": cfg.stem} if cfg.stem else {},
        "decoder_channels": cfg.decoder_channels,
    }
    model = create_segmentation_model(cfg.head, weights=cfg.weights, **model_kwargs).to(device)
    shuffle = torch.Generator()
    train_loader = _loader(train_set, cfg.batch_size, cfg.workers, shuffle, cfg.repeat)
    val_loader = _loader(val_set, cfg.batch_size, cfg.workers)
    loss_fn = SegmentationLoss(cfg.loss, cfg.ignore_index)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.epochs * len(train_loader)))

    run_dir = Path(cfg.output_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    config_dict = dataclasses.asdict(cfg)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))
    start_epoch, best_miou = 0, -1.0
    if resume is not None:
        ckpt = load_checkpoint(resume)
        if ckpt.get("task") != "segmentation" or ckpt.get("model_kwargs") != model_kwargs:
            raise ValueError(
                f"cannot resume from {resume}: it holds a different model "
                f"({ckpt.get('model_name')} {ckpt.get('model_kwargs')})"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        start_epoch = ckpt["epoch"] + 1
        best_miou = ckpt.get("best_miou", -1.0)
    preprocess = {
        "preset": "segmentation",
        "input_size": cfg.image_size,
        "resize": cfg.image_size,
        "mean": list(cfg.mean),
        "std": list(cfg.std),
    }

    def state(epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        from resnetkit import __version__

        return {
            "task": "segmentation",
            "model": model.state_dict(),
            "model_name": cfg.head,
            "model_kwargs": model_kwargs,
            "classes": classes,
            "preprocess": preprocess,
            "config": config_dict,
            "epoch": epoch,
            "step": 0,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "metrics": metrics,
            "best_miou": best_miou,
            "version": __version__,
        }

    logger = RunLogger(run_dir)
    metrics: dict[str, Any] = {}
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            shuffle.manual_seed(cfg.seed * 1000 + epoch)  # the epoch's order depends on nothing else: exact resume
            with Progress(len(train_loader), desc=f"epoch {epoch + 1}/{cfg.epochs}", enabled=not quiet) as bar:
                train_stats = train_one_epoch(model, train_loader, loss_fn, optimizer, scheduler, device, cfg, bar)
            val = evaluate_model(model, val_loader, len(classes), device, cfg.mean, cfg.std, loss_fn, cfg.ignore_index)
            metrics = {
                "train_loss": train_stats["loss"],
                "train_pixel_acc": train_stats["pixel_acc"],
                "val_loss": val["loss"],
                "val_miou": val["miou"],
                "val_pixel_acc": val["pixel_acc"],
                "val_dice": val["mean_dice"],
                "lr": scheduler.get_last_lr()[0],
                "epoch_time_s": time.perf_counter() - t0,
            }
            logger.log_epoch(epoch, metrics)
            is_best = val["miou"] > best_miou
            best_miou = max(best_miou, val["miou"])
            metrics["per_class_iou"] = dict(zip(classes, val["per_class_iou"]))
            save_checkpoint(run_dir / "last.pt", state(epoch, metrics))
            if is_best:
                save_checkpoint(run_dir / "best.pt", state(epoch, metrics))
            if not quiet:
                print(
                    f"epoch {epoch + 1}/{cfg.epochs} loss {train_stats['loss']:.4f} val mIoU {val['miou']:.4f} "
                    f"pixel acc {val['pixel_acc']:.4f} dice {val['mean_dice']:.4f}",
                    flush=True,
                )
        if metrics:
            logger.log_hparams(config_dict, {"best_val_miou": best_miou})
    finally:
        logger.close()
    if not (run_dir / "last.pt").exists():
        raise ValueError(f"nothing to train: the run in {run_dir} already reached epochs={cfg.epochs}")
    if not metrics:  # resumed a finished run
        metrics = load_checkpoint(run_dir / "last.pt")["metrics"]
    return SegmentationResult(run_dir, run_dir / "best.pt", run_dir / "last.pt", {**metrics, "best_miou": best_miou})


# ---------------------------------------------------------------------------------------------------- eval, predict


def evaluate_segmentation(
    checkpoint: str | Path,
    data: str | None = None,
    split: str = "val",
    batch_size: int = 16,
    device: str = "auto",
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """mIoU, per-class IoU and Dice, pixel accuracy of a `segment train` checkpoint on `data` (default: the data it
    was trained on) at the checkpoint's image size; writes seg_eval.json into `out_dir` when given."""
    model, ckpt = segmentation_model_from_checkpoint(checkpoint)
    cfg = ckpt["config"]
    data = data or cfg["data"]
    dev = _device(device)
    pre = ckpt["preprocess"]
    dataset = build_segmentation_dataset(
        data, split, pre["input_size"], num_images=cfg.get("num_images"), seed=cfg.get("seed", 0)
    )
    classes = ckpt["classes"]
    if len(dataset.classes) > len(classes):
        raise ValueError(f"{data} has {len(dataset.classes)} classes but the checkpoint was trained on {len(classes)}")
    loader = _loader(dataset, batch_size, 0)
    ignore = cfg.get("ignore_index", IGNORE_INDEX)
    result = evaluate_model(model.to(dev), loader, len(classes), dev, pre["mean"], pre["std"], ignore_index=ignore)
    report = {
        "checkpoint": str(checkpoint),
        "data": data,
        "split": split,
        "num_images": len(dataset),
        "miou": result["miou"],
        "pixel_acc": result["pixel_acc"],
        "mean_dice": result["mean_dice"],
        "per_class_iou": {c: _nan_none(v) for c, v in zip(classes, result["per_class_iou"])},
        "per_class_dice": {c: _nan_none(v) for c, v in zip(classes, result["per_class_dice"])},
    }
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "seg_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _nan_none(v: float) -> float | None:
    return None if math.isnan(v) else v


def _list_images(inputs: Sequence[str | Path]) -> list[Path]:
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"image not found: {item}")
    if not paths:
        raise ValueError(f"no images found in {', '.join(map(str, inputs))}")
    return paths


@torch.no_grad()
def predict_masks(
    model: SegmentationModel, images: list[Image.Image], preprocess: dict[str, Any], device: str = "auto"
) -> list[np.ndarray]:
    """Class-index masks (H, W) uint8 at each image's own size: the model runs at the training size and its logits
    are resized back bilinearly before the argmax."""
    dev = _device(device)
    model = model.to(dev).eval()
    masks = []
    for image in images:
        x = preprocess_image(image, preprocess).unsqueeze(0).to(dev)
        logits = F.interpolate(model(x), size=(image.height, image.width), mode="bilinear", align_corners=False)
        masks.append(logits.argmax(1)[0].to(torch.uint8).cpu().numpy())
    return masks


def predict_segmentation(
    checkpoint: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    alpha: float = 0.5,
    save_masks: bool = False,
    device: str = "auto",
) -> list[Path]:
    """Write `<stem>_overlay.png` (the image with class colours blended in, and a legend) for each input image or
    folder of images, and `<stem>_mask.png` (palette PNG of class indices) with save_masks; returns overlay paths."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    model, ckpt = segmentation_model_from_checkpoint(checkpoint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in _list_images(inputs):
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except OSError as e:
            raise ValueError(f"cannot read image {path}: {e}") from e
        mask = predict_masks(model, [image], ckpt["preprocess"], device)[0]
        target = out / f"{path.stem}_overlay.png"
        overlay(image, mask, alpha, classes=ckpt["classes"]).save(target)
        if save_masks:
            mask_image(mask).save(out / f"{path.stem}_mask.png")
        written.append(target)
    return written
