"""The one image decoder: every path that turns image bytes into pixels goes through `decode_image`, so training,
evaluation, prediction, serving, explanation, detection and segmentation cannot disagree about a file.

    >>> from resnetkit.data.image import decode_image
    >>> pixels = decode_image("photo.jpg")            # uint8 (3, H, W), RGB, upright
    >>> pixels = decode_image(upload_bytes, name="cat.png", max_pixels=64_000_000)

What it does, whatever the file:
- checks the pixel count from the header, before decoding a single pixel (a 1 KB PNG can declare 2^32 pixels);
- applies the EXIF orientation (every phone photo), so the image comes out upright;
- composites transparency (RGBA, LA, palette with a transparent index) on white;
- scales 16-bit and 32-bit integer greyscale and float images to 8 bits (scaled, not clipped);
- converts palette, greyscale, CMYK and the rest to RGB;
- decodes plain RGB/greyscale JPEGs with torchvision's libjpeg-turbo decoder (1.3x Pillow on CUB photos and 2x on
  32 px CIFAR JPEGs here), everything else with Pillow;
- with `min_size`, lets libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale (its DCT scaling, Pillow's `draft`)
  when the result still has at least `min_size` pixels on its shorter side: the caller resizes it further anyway.
A file that cannot be used raises BadImageError (or ImageTooLarge) naming it and saying why.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# Every suffix resnetkit treats as an image, in folders of training data as in folders given to predict.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
# Pillow's own hard limit (twice Image.MAX_IMAGE_PIXELS): about a 13,000 x 13,000 image. Anything larger is refused
# as a probable decompression bomb; pass max_pixels to change it (the server uses a stricter one).
DEFAULT_MAX_PIXELS = 178_956_970


class BadImageError(ValueError):
    """A file that cannot be used as an image: corrupt, truncated, empty, not an image, or over the pixel limit."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"bad image {self.path}: {reason}")


class ImageTooLarge(BadImageError):
    """An image whose declared size exceeds the pixel limit (checked from the header, before decoding)."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: greyscale, palette (transparency on white), RGBA/LA (composited on white), CMYK,
    16-bit and 32-bit integer greyscale (scaled, not clipped) and float."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        # 16-bit files open as I;16 or I with values up to 65535: scale to 8 bits instead of clipping at 255.
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(arr * 255.0 / top + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        return Image.fromarray(np.clip(arr * 255.0 / top + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _read(source: str | os.PathLike | bytes, name: str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        try:
            with open(source, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"image file {source} does not exist") from None
        except IsADirectoryError:
            raise BadImageError(name, "a folder, not an image file") from None
        except OSError as e:
            raise BadImageError(name, f"cannot open ({e.strerror or e})") from None
    if not data:
        raise BadImageError(name, "empty file (0 bytes)")
    return data


def _check_pixels(img: Image.Image, name: str, max_pixels: int) -> None:
    if img.width * img.height > max_pixels:
        raise ImageTooLarge(
            name,
            f"{img.width}x{img.height} = {img.width * img.height:,} pixels is over the limit of {max_pixels:,} "
            "(a decompression bomb?); raise max_pixels if the image is genuine",
        )


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block: treat the image as upright rather than refuse it
        return 1


def _draft_scale(img: Image.Image, min_size: int | None) -> tuple[int, int] | None:
    """The smallest JPEG draft size (1/2, 1/4, 1/8 of each side) that keeps the shorter side >= min_size."""
    if not min_size or img.format != "JPEG":
        return None
    short = min(img.size)
    scale = 1
    while scale < 8 and short // (scale * 2) >= min_size:
        scale *= 2
    if scale == 1:
        return None
    return -(-img.width // scale), -(-img.height // scale)


def parallel_decoders() -> int:
    """How many threads (or loader worker processes) decode images side by side when nothing says: one per core, at
    most 8."""
    return max(1, min(os.cpu_count() or 1, 8))


def decode_image(
    source: str | os.PathLike | bytes,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int | None = None,
    crop: Callable[[int, int], tuple[tuple[int, int, int, int], int]] | None = None,
) -> torch.Tensor:
    """An image file (a path, or its encoded bytes) as uint8 RGB (3, H, W), upright; raises BadImageError.

    name: how messages name a bytes source (default "upload"). min_size: the caller will resize the result so that
    its shorter side is at least this: large JPEGs may then be decoded at a reduced scale (never below min_size).
    crop(width, height) -> ((top, left, h, w), min_size): a region chosen from the upright image's size before
    decoding (a random crop), and the shorter side the image may be decoded down to for it; the region is returned,
    in decoded pixels (the same part of the picture at any scale).
    """
    name = name or (str(source) if not isinstance(source, (bytes, bytearray, memoryview)) else "upload")
    data = _read(source, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies, below
            with Image.open(io.BytesIO(data)) as img:
                _check_pixels(img, name, max_pixels)
                orientation = _orientation(img)
                box = None
                if crop is not None:
                    upright = img.size[::-1] if orientation in (5, 6, 7, 8) else img.size
                    box, min_size = crop(*upright)
                draft = _draft_scale(img, min_size)
                if img.format == "JPEG" and img.mode in ("RGB", "L") and draft is None:
                    pixels = _decode_jpeg(data, name)
                else:
                    if draft is not None:
                        img.draft(img.mode if img.mode in ("RGB", "L") else None, draft)
                    img.load()
                    if orientation != 1:
                        img = ImageOps.exif_transpose(img)
                    pixels = torch.from_numpy(np.array(to_rgb(img), dtype=np.uint8)).permute(2, 0, 1).contiguous()
                return pixels if box is None else _cut(pixels, box, upright)
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(name, f"refused as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise BadImageError(name, "not an image file (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, RuntimeError) as e:
        raise BadImageError(name, f"corrupt or truncated ({e})") from None


def _cut(pixels: torch.Tensor, box: tuple[int, int, int, int], size: tuple[int, int]) -> torch.Tensor:
    """The region `box` (top, left, h, w) of an image `size` (width, height) wide, in the pixels of its decoded
    (possibly reduced) version."""
    top, left, h, w = box
    sy, sx = pixels.shape[1] / size[1], pixels.shape[2] / size[0]
    y0, x0 = round(top * sy), round(left * sx)
    y1, x1 = max(round((top + h) * sy), y0 + 1), max(round((left + w) * sx), x0 + 1)
    return pixels[:, y0:y1, x0:x1]


def _decode_jpeg(data: bytes, name: str) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29's notice that its decoders will move
            return decode_jpeg(
                torch.frombuffer(bytearray(data), dtype=torch.uint8),
                mode=ImageReadMode.RGB,
                apply_exif_orientation=True,
            )
    except RuntimeError as e:
        raise BadImageError(name, f"corrupt or truncated ({e})") from None


def to_pil(image: torch.Tensor) -> Image.Image:
    """A uint8 (3, H, W) tensor as a PIL RGB image (for drawing and saving)."""
    return Image.fromarray(image.permute(1, 2, 0).contiguous().cpu().numpy(), "RGB")


def save_image(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a uint8 (3, H, W) tensor as an image file (format from the suffix)."""
    to_pil(image).save(path)
    return Path(path)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the file's header only; raises BadImageError for a file that is no image."""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImageError(path, f"not a readable image ({e})") from None


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Class indices (H, W) uint8 from a palette ("P") or greyscale ("L") PNG, as VOC stores segmentation masks.

    An RGB mask holds colours, not indices: it is refused rather than guessed at.
    """
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise ValueError(
                    f"mask {path} is a {im.mode}-mode image; masks must be palette (P) or greyscale (L) PNGs whose "
                    "pixel values are class indices (255 = ignore)"
                )
            return np.array(im, dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"mask file {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise BadImageError(path, f"not a readable mask ({e})") from None


def save_mask(mask: np.ndarray, path: str | os.PathLike, palette: np.ndarray) -> Path:
    """Class indices (H, W) as a palette PNG (readable back with `read_mask`)."""
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(palette.reshape(-1).tolist())
    im.save(path)
    return Path(path)


def list_images(paths: Sequence[str | os.PathLike], recursive: bool = True) -> list[Path]:
    """Files named directly (whatever their suffix, so that unreadable ones get reported) and the image files under
    folders (searched recursively), sorted per folder; raises FileNotFoundError for a path that does not exist."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            walk = p.rglob("*") if recursive else p.iterdir()
            found += sorted(f for f in walk if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            found.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return found
