"""Prediction: a model, the preprocessing it was trained with, and its class names, behind one `predict` call.

resnetkit predict --checkpoint runs/cifar/best.pt photo.jpg folder/ --top-k 3 --format json

>>> predictor = Predictor.from_checkpoint("runs/cifar/best.pt")
>>> predictor.predict([PIL.Image.open("cat.jpg")], top_k=3)
[[('cat', 0.91), ('dog', 0.05), ('deer', 0.01)]]
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from PIL import Image

# 8k x 8k: far above any photo a ResNet needs, far below what a decompression bomb asks for (a 1 KB PNG can
# declare 2^32 pixels; PIL's own guard only warns until twice its 89M-pixel default).
DEFAULT_MAX_PIXELS = 64_000_000
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class ImageError(ValueError):
    """An input that is not a readable image, or is too large; the message names the file."""


class ImageTooLarge(ImageError):
    """An image whose declared size exceeds the pixel limit (checked before decoding)."""


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names in the standard index order (torchvision's ImageNet weights)."""
    text = resources.files("resnetkit.data").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    return text.splitlines()


def imagenet_preprocess(input_size: int = 224) -> dict[str, Any]:
    """The `preprocess` dict of torchvision's ImageNet weights: resize to 256/224 of the size, centre crop."""
    from resnetkit.data import preprocess_info

    return preprocess_info("imagenet", input_size=input_size)


def open_image(
    source: str | Path | bytes, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode a file path or encoded bytes into an RGB image, refusing non-images and oversized ones.

    The pixel count is checked from the header, before any pixel is decoded, so a decompression bomb costs nothing.
    """
    name = name or (str(source) if not isinstance(source, bytes) else "upload")
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except OSError as e:
        raise ImageError(f"{name}: cannot open ({e.strerror or e})") from e
    with fp:
        try:
            image = Image.open(fp)
        except Image.DecompressionBombError as e:
            raise ImageTooLarge(f"{name}: {e}") from e
        except Exception as e:  # UnidentifiedImageError, truncated headers, plugin errors
            raise ImageError(f"{name}: not an image that PIL can read ({type(e).__name__})") from e
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLarge(
                f"{name}: {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}"
            )
        try:
            image.load()
            return image.convert("RGB")
        except Exception as e:  # truncated data, bad palettes, unsupported modes
            raise ImageError(f"{name}: cannot decode the image ({type(e).__name__}: {e})") from e


def list_images(paths: Sequence[str | Path]) -> list[Path]:
    """Files named directly (whatever their suffix, so unreadable ones get reported) and image files under folders."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            found.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return found


class Predictor:
    """A classifier ready for images: `predict(images, top_k)` -> per image, the top-k (class name, probability).

    model: an nn.Module, or any callable mapping a float NCHW batch to logits (an onnxruntime engine).
    preprocess: the checkpoint's `preprocess` dict, turned into the evaluation transform.
    """

    def __init__(
        self,
        model: nn.Module | Callable,
        preprocess: dict[str, Any],
        classes: Sequence[str],
        name: str = "model",
        device: str | torch.device = "cpu",
    ):
        from resnetkit.data import eval_transform_from

        self.device = torch.device(device)
        if isinstance(model, nn.Module):
            model = model.to(self.device).eval()
        self.model = model
        self.preprocess = dict(preprocess)
        self.transform = eval_transform_from(self.preprocess)
        self.classes = list(classes)
        self.name = name

    @classmethod
    def from_checkpoint(cls, path: str | Path, use_ema: bool = False, device: str = "cpu") -> Predictor:
        """A resnetkit training checkpoint (read with weights_only=True): model, classes and preprocessing."""
        from resnetkit.checkpoint import CheckpointError, model_from_checkpoint

        model, ckpt = model_from_checkpoint(path, use_ema=use_ema)
        if "preprocess" not in ckpt:
            raise CheckpointError(f"{path} lacks 'preprocess': it does not say how its images were prepared")
        classes = ckpt.get("classes") or [str(i) for i in range(model.get_classifier().out_features)]
        return cls(model, ckpt["preprocess"], classes, name=ckpt["model_name"], device=device)

    @classmethod
    def from_weights(cls, model_name: str, weights: str, device: str = "cpu") -> Predictor:
        """A zoo model with `weights` ("imagenet", "imagenet-v2", or a file); ImageNet classes for 1000-way heads.

        A file holding a resnetkit checkpoint brings its own classes and preprocessing; a bare state dict gets the
        ImageNet preprocessing at the model's default input size.
        """
        from resnetkit.checkpoint import load_checkpoint
        from resnetkit.models import create_model, default_input_size, read_state_dict

        ckpt: dict[str, Any] = {}
        if weights in ("imagenet", "imagenet-v2"):
            model = create_model(model_name, weights=weights)
        else:
            state = read_state_dict(weights)
            if Path(weights).suffix != ".safetensors":
                try:
                    ckpt = load_checkpoint(weights)
                except ValueError:
                    ckpt = {}  # a bare state dict
            model = create_model(model_name, num_classes=_head_size(state))
            from resnetkit.models import load_weights

            load_weights(model, state)
        num_classes = model.get_classifier().out_features
        classes = ckpt.get("classes") or (
            imagenet_classes() if num_classes == 1000 else [str(i) for i in range(num_classes)]
        )
        preprocess = ckpt.get("preprocess") or imagenet_preprocess(default_input_size(model_name))
        return cls(model, preprocess, classes, name=model_name, device=device)

    @property
    def input_size(self) -> int:
        return int(self.preprocess["input_size"])

    def to_tensor(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Preprocess PIL images into one normalised float batch."""
        return torch.stack([self.transform(_trim_aspect(im.convert("RGB"))) for im in images])

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (N, classes) of a preprocessed batch."""
        logits = torch.as_tensor(self.model(batch.to(self.device)))
        return logits.float().softmax(dim=1).cpu()

    def top_indices(self, probs: torch.Tensor, k: int = 5) -> list[list[tuple[int, float]]]:
        """Per row of `probs`, the k most likely (class index, probability), most likely first."""
        values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
        return [list(zip(ix, vs)) for vs, ix in zip(values.tolist(), indices.tolist())]

    def top_k(self, probs: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
        """Per row of `probs`, the k most likely (class name, probability), most likely first."""
        return [[(self.classes[i], p) for i, p in row] for row in self.top_indices(probs, k)]

    def predict(self, images: Sequence[Image.Image], top_k: int = 5) -> list[list[tuple[str, float]]]:
        if not images:
            return []
        return self.top_k(self.probabilities(self.to_tensor(images)), top_k)


def _trim_aspect(image: Image.Image, max_ratio: float = 8.0) -> Image.Image:
    """Centre-crop the long side of a pathologically thin image to `max_ratio` times the short one.

    The evaluation transform (resize the short side, centre crop) only looks at the central square, but resizing a
    64000x1 image first would allocate gigabytes: a cheap denial of service that the pixel limit does not catch.
    Photos (up to 8:1 panoramas) pass untouched; thinner images may shift by a sub-pixel after resizing.
    """
    w, h = image.size
    short, long = min(w, h), max(w, h)
    if long <= max_ratio * short:
        return image
    keep = round(max_ratio * short)
    keep += (long - keep) % 2  # an even margin keeps the centre exactly where it was
    margin = (long - keep) // 2
    return image.crop((margin, 0, margin + keep, h) if w > h else (0, margin, w, margin + keep))


def _head_size(state: dict[str, torch.Tensor]) -> int:
    """Number of classes of a state dict: rows of its last 2-D weight (the classifier of every zoo model)."""
    matrices = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    if not matrices:
        raise ValueError("the weights hold no classifier (no 2-D weight matrix)")
    return int(matrices[-1].shape[0])
