"""The fast pipeline for small images: a uint8 tensor cache on disk, augmented a whole batch at a time on the device.

CIFAR, shapes and ImageFolder trees of images up to 64 px are decoded once into uint8 (N, 3, H, W), saved under the
cache folder ($RESNETKIT_CACHE, default ~/.cache/resnetkit) keyed by the source's content (file paths, sizes and
modification times; the render parameters for shapes), then held on the training device. Each batch is indexed,
randomly cropped (zero padding), flipped, optionally colour-jittered / erased, and normalised with tensor operations:
no per-sample Python in the hot loop, which is what keeps a GPU fed.

Photos (a few hundred pixels on a side, e.g. CUB or ImageNet-style folders) are too large to hold that way, and the
per-sample DataLoader spends most of its time decoding them. `PixelCache` (data.pixel_cache) decodes each file once
into one uncompressed file read through a memory map, at full size, or already resized where the preset's transform
starts with the same resize for every image (`transforms.fixed_head`): later epochs cut pixels instead of decoding
JPEGs (and resizing them), with the same augmentation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from resnetkit.checkpoint import CheckpointError, torch_load
from resnetkit.data.datasets import CIFAR, Shapes, log, report_skipped
from resnetkit.data.image import BadImageError, decode_image, image_size, parallel_decoders
from resnetkit.fileio import write_atomic

CACHE_VERSION = 2  # 2: EXIF orientation applied by the one decoder
PIXEL_CACHE_VERSION = 2  # (H, W, 3) uint8 images back to back; 2: the index names the transform steps done
SMALL_IMAGE_MAX = 64  # ImageFolder images up to this many pixels on a side go through the fast pipeline


def default_cache_dir() -> Path:
    return Path(os.environ.get("RESNETKIT_CACHE", "~/.cache/resnetkit")).expanduser()


@dataclass
class TensorData:
    images: torch.Tensor  # uint8 (N, 3, H, W)
    labels: torch.Tensor  # int64 (N,), or float32 multi-hot rows (N, C) for a multi-label dataset
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    mean: list[float] | None = None  # per-channel statistics in [0, 1], measured once when the cache is built
    std: list[float] | None = None


def _decode_checked(dataset, index: int, size: int) -> torch.Tensor | BadImageError:
    try:
        img = dataset.load(index)
    except BadImageError as e:
        return e
    if tuple(img.shape[-2:]) != (size, size):
        from torchvision.transforms.v2 import functional as TF

        img = TF.center_crop(TF.resize(img, size, antialias=True), size)
    return img


def decode_files(dataset, strict: bool = False, threads: int | None = None) -> TensorData:
    """Decode every file of an ImageFolder/CUB200 dataset into one uint8 tensor (all images resized and centre-cropped
    to the first image's size unless the dataset has an image_size). Bad files are skipped and reported once."""
    samples = dataset.samples
    if not samples:
        raise ValueError(f"dataset {getattr(dataset, 'root', '')} has no images")
    size = dataset.image_size or first_image_side(dataset)
    threads = threads or parallel_decoders()
    # torchvision's decoders release the GIL, so threads decode in parallel without pickling tensors between processes.
    with ThreadPoolExecutor(threads) as pool:
        decoded = list(pool.map(lambda i: _decode_checked(dataset, i, size), range(len(samples))))
    images, labels, skipped = [], [], []
    for i, ((path, _), img) in enumerate(zip(samples, decoded)):
        if isinstance(img, BadImageError):
            if strict:
                raise img
            skipped.append((path, img.reason))
        else:
            images.append(img)
            labels.append(dataset.target(i))
    if not images:
        raise ValueError(f"none of the {len(samples)} images of {getattr(dataset, 'root', 'the dataset')} is readable")
    targets = torch.stack(labels) if getattr(dataset, "multilabel", False) else torch.tensor(labels, dtype=torch.int64)
    return TensorData(torch.stack(images), targets, list(dataset.classes), skipped)


def load_tensors(dataset, cache_dir: str | os.PathLike | None = None, strict: bool = False) -> TensorData:
    """The dataset as uint8 tensors: straight from memory for CIFAR, from the disk cache (built on first use) for
    shapes and image files."""
    if isinstance(dataset, CIFAR):
        images, labels = dataset.uint8_tensors()
        return TensorData(images, labels, list(dataset.classes))
    key = hashlib.sha1(f"v{CACHE_VERSION}:{dataset.cache_key()}".encode()).hexdigest()[:20]
    path = Path(cache_dir or default_cache_dir()) / "tensors" / f"{type(dataset).__name__.lower()}-{key}.pt"
    if path.exists():
        try:
            blob = torch_load(path, "tensor cache")
            data = TensorData(
                blob["images"],
                blob["labels"],
                list(blob["classes"]),
                [tuple(s) for s in blob["skipped"]],
                blob.get("mean"),
                blob.get("std"),
            )
            if strict and data.skipped:
                raise BadImageError(*data.skipped[0])
            report_skipped(data.skipped, len(data.labels) + len(data.skipped))
            return data
        except (CheckpointError, KeyError, OSError) as e:  # a damaged cache file: rebuild it
            log.warning("ignoring unreadable cache %s (%s); rebuilding it", path, e)
    if isinstance(dataset, Shapes) or hasattr(dataset, "uint8_tensors"):  # rendered, or mosaics of tiles
        log.info("preparing %d images into the cache %s (once)", len(dataset), path)
        images, labels = dataset.uint8_tensors()
        data = TensorData(images, labels, list(dataset.classes))
    else:
        log.info("decoding %d images into the cache %s (once)", len(dataset), path)
        data = decode_files(dataset, strict)
        report_skipped(data.skipped, len(dataset))
        from resnetkit.data.transforms import compute_mean_std

        data.mean, data.std = compute_mean_std(data.images)
    state = {
        "images": data.images,
        "labels": data.labels,
        "classes": data.classes,
        "skipped": [list(s) for s in data.skipped],
        "mean": data.mean,
        "std": data.std,
    }
    write_atomic(path, lambda f: torch.save(state, f))  # concurrent ranks building one cache never see half a file
    return data


def first_image_side(dataset) -> int:
    """The larger side of a file dataset's first readable image, read from its header only (0 if none of the first
    few is readable)."""
    for path, _ in dataset.samples[:8]:
        try:
            return max(image_size(path))
        except (BadImageError, FileNotFoundError):  # a bad file: the loader reports it
            continue
    return 0


class PixelCache:
    """Every image of a file dataset, decoded once (upright uint8 RGB, what `decode_image` gives, stored (H, W, 3)), at
    full size or with a transform's fixed first steps done (`head`: their reprs), in one uncompressed file on disk
    (3 bytes a pixel) read through a memory map; an index file beside it holds each image's offset and shape, or why
    it could not be read. Build or reuse one with `pixel_cache`.

    Worker processes open their own memory map on first use (the map itself is never pickled)."""

    def __init__(self, path: Path, index: dict) -> None:
        self.path = path
        self.offsets: list[int] = index["offsets"]
        self.shapes: list[list[int] | None] = index["shapes"]
        self.reasons: dict[str, str] = index["skipped"]  # str(sample index) -> why that file was left out
        self.head: list[str] = index["head"]  # the transform steps done to the stored images, as their reprs
        self._map: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.shapes)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_map": None}

    def size(self, index: int) -> tuple[int, int] | None:
        """(width, height) of image `index`, or None if its file could not be read."""
        shape = self.shapes[index]
        return None if shape is None else (shape[2], shape[1])

    def read(self, index: int, path: str, box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """Image `index` (its region `box` = (top, left, height, width) if given) as a uint8 tensor of its own;
        raises the BadImageError its file gave when the cache was built (`path` names it)."""
        shape = self.shapes[index]
        if shape is None:
            raise BadImageError(path, self.reasons[str(index)])
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        c, h, w = shape
        start = self.offsets[index]
        pixels = self._map[start : start + c * h * w].reshape(h, w, c)
        if box is not None:
            top, left, bh, bw = box
            pixels = pixels[top : top + bh, left : left + bw]
        # A copy (only the region's pages are read), as (3, H, W) over channels-last memory: torch's uint8 antialiased
        # resize is about 1.8x faster on that layout.
        return torch.from_numpy(np.array(pixels)).permute(2, 0, 1)


def _pixel_bytes(dataset, head: Sequence[torch.nn.Module] = ()) -> int:
    """The pixel cache's size for `dataset` from the files' headers, after `head` (3 bytes a pixel; unreadable files
    count 0)."""
    total = 0
    for path, _ in dataset.samples:
        try:
            width, height = image_size(path)
        except (BadImageError, FileNotFoundError):
            continue
        shape = torch.empty(3, height, width, dtype=torch.uint8, device="meta")  # sizes only: nothing is computed
        for step in head:
            shape = step(shape)
        total += shape.numel()
    return total


def pixel_cache(
    dataset,
    cache_dir: str | os.PathLike | None = None,
    threads: int | None = None,
    head: Sequence[torch.nn.Module] = (),
) -> PixelCache:
    """The `PixelCache` of an ImageFolder/CsvListing/CUB200 dataset under cache_dir/pixels/, keyed by the source's
    content (`dataset.cache_key()`) and `head`; built on first use, by threads decoding in parallel, after checking
    that the disk has room for it. Damaged or partial cache files are rebuilt; both files are written atomically.

    head: the fixed first steps of the transform (`resnetkit.data.transforms.fixed_head`: TrimAspect, a resize of
    the shorter side), done to each image before it is stored, so that the transform is left the rest (the loaders
    leave them out): the same bits as running them per sample, without resizing every image every epoch."""
    head = list(head)
    described = [repr(step) for step in head]
    identity = f"v{PIXEL_CACHE_VERSION}:{dataset.cache_key()}:{dataset.max_pixels}:{described}"
    key = hashlib.sha1(identity.encode()).hexdigest()[:20]
    base = Path(cache_dir or default_cache_dir()) / "pixels" / f"{type(dataset).__name__.lower()}-{key}"
    data_path, index_path = base.with_suffix(".u8"), base.with_suffix(".json")
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
            if data_path.stat().st_size != index["bytes"] or len(index["shapes"]) != len(dataset.samples):
                raise ValueError("its pixel file does not match its index")
            return PixelCache(data_path, index)
        except (OSError, ValueError, KeyError) as e:
            log.warning("ignoring unreadable pixel cache %s (%s); rebuilding it", index_path, e)
    need = _pixel_bytes(dataset, head)
    data_path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(data_path.parent).free
    if need > 0.95 * free:
        raise ValueError(
            f"data.pixel_cache: the {len(dataset.samples)} decoded images need {need / 1e9:.1f} GB, and "
            f"{data_path.parent} has {free / 1e9:.1f} GB free; set data.cache_dir to a larger disk, or turn "
            "data.pixel_cache off"
        )
    log.info("decoding %d images once into the pixel cache %s (%.2f GB)", len(dataset.samples), data_path, need / 1e9)
    index: dict = {"offsets": [], "shapes": [], "skipped": {}, "bytes": 0, "head": described}

    def decode(i: int) -> torch.Tensor | BadImageError:
        try:
            img = decode_image(dataset.samples[i][0], max_pixels=dataset.max_pixels)
        except BadImageError as e:
            return e
        for step in head:  # what the transform would do first to what decode_image gives it
            img = step(img)
        return img

    def write(f) -> None:
        n, chunk = len(dataset.samples), 64  # decoded in chunks, so that memory holds a chunk, not the dataset
        # torchvision's and Pillow's decoders release the GIL: threads decode in parallel.
        with ThreadPoolExecutor(threads or parallel_decoders()) as pool:
            for first in range(0, n, chunk):
                for i, img in enumerate(pool.map(decode, range(first, min(first + chunk, n))), first):
                    index["offsets"].append(index["bytes"])
                    if isinstance(img, BadImageError):
                        index["shapes"].append(None)
                        index["skipped"][str(i)] = img.reason
                        continue
                    f.write(img.permute(1, 2, 0).numpy().tobytes())  # (H, W, 3): see `read`
                    index["shapes"].append(list(img.shape))
                    index["bytes"] += img.numel()

    start = time.perf_counter()
    write_atomic(data_path, write)
    write_atomic(index_path, json.dumps(index))  # last: an index on disk means its pixel file is whole
    log.info("pixel cache built in %.1f s (%d images)", time.perf_counter() - start, len(dataset.samples))
    return PixelCache(data_path, index)


# ---- batch augmentations (tensor operations on a whole batch) ----


def crop_flip_batch(
    padded: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Crop each image of an already padded batch (N, C, H + 2p, W + 2p) at offsets (dy, dx) in [0, 2p] to
    height x width, mirroring left-right where `flip` is set: torchvision's RandomCrop(size, padding=p) +
    RandomHorizontalFlip for a whole batch in one gather."""
    n, c, hp, wp = padded.shape
    dev = padded.device
    col = torch.arange(width, device=dev).view(1, width)
    cols = torch.where(flip.view(n, 1), width - 1 - col, col) + dx.view(n, 1)
    rows = (torch.arange(height, device=dev).view(1, height) + dy.view(n, 1)) * wp
    index = (rows.view(n, height, 1) + cols.view(n, 1, width)).view(n, 1, height * width).expand(n, c, -1)
    return padded.reshape(n, c, hp * wp).gather(2, index).view(n, c, height, width)


def color_jitter_batch(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Per-image random brightness, contrast and saturation factors in [1 - strength, 1 + strength] (float in
    [0, 255] in, the same out)."""
    n = images.shape[0]

    def factors() -> torch.Tensor:
        u = torch.rand(n, 1, 1, 1, generator=generator, device=images.device)
        return 1 + strength * (2 * u - 1)

    x = images * factors()
    grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    x = grey.mean((2, 3), keepdim=True) + (x - grey.mean((2, 3), keepdim=True)) * factors()
    grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    x = grey + (x - grey) * factors()
    return x.clamp_(0, 255)


def erase_batch(images: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Random erasing (normalised float in): with probability p per image, set a random rectangle of 2-33% of the
    area (aspect 0.3-3.3, as torchvision's RandomErasing) to standard normal noise."""
    n, _, h, w = images.shape
    dev = images.device

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=dev)

    area = (0.02 + (0.33 - 0.02) * rand(n)) * h * w
    log_ratio = torch.log(torch.tensor(0.3)) + (torch.log(torch.tensor(3.3)) - torch.log(torch.tensor(0.3))) * rand(n)
    ratio = torch.exp(log_ratio.to(dev))
    eh = torch.sqrt(area * ratio).clamp(1, h).floor()
    ew = torch.sqrt(area / ratio).clamp(1, w).floor()
    top = ((h - eh + 1) * rand(n)).floor()
    left = ((w - ew + 1) * rand(n)).floor()
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    inside = (
        (ys >= top.view(n, 1, 1))
        & (ys < (top + eh).view(n, 1, 1))
        & (xs >= left.view(n, 1, 1))
        & (xs < (left + ew).view(n, 1, 1))
        & (rand(n) < p).view(n, 1, 1)
    )
    noise = torch.randn(images.shape, generator=generator, device=dev)
    return torch.where(inside.unsqueeze(1), noise, images)


def policy_batch(images: torch.Tensor, name: str, group: int = 8) -> torch.Tensor:
    """TrivialAugment / RandAugment / AutoAugment on uint8 images, one random op per group of `group` images
    (torchvision applies one op to a whole tensor; groups keep the variety without a per-sample loop)."""
    from torchvision.transforms import v2

    op = {"trivialaugment": v2.TrivialAugmentWide, "randaugment": v2.RandAugment, "autoaugment": v2.AutoAugment}[name]()
    return torch.cat([op(chunk) for chunk in images.split(group)])
