"""`shapes`: a built-in dataset that needs no download, rendered deterministically from a seed.

Ten classes of filled geometric shapes at a random size, position and rotation, in a random colour, over a textured
background of random colours. The colour carries no information about the class (it is drawn independently), so the
class cannot be read from the mean colour; the outline can, and a small ResNet learns it in a minute on a CPU.

    >>> from resnetkit.data.synthetic import render_shapes
    >>> images, labels, masks = render_shapes(8, 32, seed=0, split="train")   # (8,3,32,32) (8,) (8,32,32)

`shapes-multi` draws 1 to 4 of the same shapes, of different classes, into one image, with each shape's box and a
class mask (`render_multi`): multi-label classification, detection and segmentation on the same images.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPE_CLASSES = ["circle", "triangle", "square", "pentagon", "star", "cross", "ring", "crescent", "heart", "arrow"]
# Bump when the rendering changes: caches of rendered shapes are keyed by it.
GENERATOR_VERSION = 3
# Supersampling factor for anti-aliased edges; the mask is the shape's coverage >= 1/2.
_SS = 4
_SPLIT_STREAM = {"train": 0, "val": 1, "test": 1}


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[list[tuple[float, float]]]:
    """The polygons (outer first; a second one is a hole) of one shape of circumradius r, rotated by angle."""

    def ring(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points]

    def regular(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
        return [
            (radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)
        ]

    if kind == "circle":
        return [ring(regular(48))]
    if kind == "triangle":
        return [ring(regular(3))]
    if kind == "square":
        return [ring(regular(4, phase=math.pi / 4))]
    if kind == "pentagon":
        return [ring(regular(5))]
    if kind == "star":
        outer, inner = regular(5), regular(5, 0.42, -math.pi / 2 + math.pi / 5)
        return [ring([p for pair in zip(outer, inner) for p in pair])]
    if kind == "cross":
        a = 0.3
        return [
            ring(
                [
                    (-a, -1),
                    (a, -1),
                    (a, -a),
                    (1, -a),
                    (1, a),
                    (a, a),
                    (a, 1),
                    (-a, 1),
                    (-a, a),
                    (-1, a),
                    (-1, -a),
                    (-a, -a),
                ]
            )
        ]
    if kind == "ring":
        return [ring(regular(48)), ring(regular(48, 0.55))]
    if kind == "crescent":  # the unit disc minus a smaller disc shifted sideways
        return [
            ring(regular(48)),
            [(x + 0.45 * r * math.cos(angle), y + 0.45 * r * math.sin(angle)) for x, y in ring(regular(48, 0.8))],
        ]
    if kind == "heart":
        t = np.linspace(0, 2 * math.pi, 60)
        x = 16 * np.sin(t) ** 3 / 17
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) / 17
        return [ring(list(zip(x.tolist(), (y - 0.05).tolist())))]
    if kind == "arrow":
        return [ring([(-1, -0.22), (0.15, -0.22), (0.15, -0.62), (1, 0), (0.15, 0.62), (0.15, 0.22), (-1, 0.22)])]
    raise ValueError(f"unknown shape {kind!r}")


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A colour of random hue, saturation and value, as floats in [0, 1]."""
    import colorsys

    h, s, v = rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.15, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured background (H, W, 3) in [0, 1]: a smooth blend of random colours plus stripes or noise."""
    grid = rng.random((3, 3, 3), dtype=np.float32) * 0.8 + 0.1
    smooth = (
        np.asarray(
            Image.fromarray((grid * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR), dtype=np.float32
        )
        / 255.0
    )
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    texture_kind = rng.integers(3)
    if texture_kind == 0:  # stripes at a random angle and frequency
        theta, freq = rng.uniform(0, math.pi), rng.uniform(3, 8)
        tex = np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)))
    elif texture_kind == 1:  # fine noise
        tex = rng.standard_normal((size, size)).astype(np.float32) * 0.6
    else:  # checks
        freq = rng.uniform(2, 6)
        tex = np.sign(np.sin(2 * math.pi * freq * xx) * np.sin(2 * math.pi * freq * yy))
    return np.clip(smooth + rng.uniform(0.04, 0.12) * tex[..., None], 0.0, 1.0)


def _shape_colour(rng: np.random.Generator, bg: np.ndarray) -> np.ndarray:
    """A random colour that differs from the background's mean by a clear margin (resampled up to 20 times)."""
    fg = _random_colour(rng)
    for _ in range(20):
        if np.abs(fg - bg.mean(axis=(0, 1))).sum() > 0.45:
            break
        fg = _random_colour(rng)
    return fg


def _coverage(label: int, cx: float, cy: float, r: float, angle: float, size: int) -> np.ndarray:
    """The shape's anti-aliased coverage (H, W) in [0, 1], drawn supersampled."""
    big = size * _SS
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    polys = _polygon(SHAPE_CLASSES[label], cx * _SS, cy * _SS, r * _SS, angle)
    draw.polygon(polys[0], fill=255)
    for hole in polys[1:]:
        draw.polygon(hole, fill=0)
    return np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


def _render_one(rng: np.random.Generator, label: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    bg = _background(rng, size)
    fg = _shape_colour(rng, bg)
    r = rng.uniform(0.22, 0.42) * size
    cx, cy = rng.uniform(r, size - r, size=2)  # the whole shape stays inside
    angle = rng.uniform(0, 2 * math.pi)
    alpha = _coverage(label, cx, cy, r, angle, size)
    image = bg * (1 - alpha[..., None]) + fg * alpha[..., None]
    return (image * 255 + 0.5).astype(np.uint8), alpha >= 0.5


def shape_labels(n: int, seed: int = 0, split: str = "train") -> np.ndarray:
    """The labels of the first n images: each run of 10 consecutive images holds every class once, in a seeded
    random order, so classes are balanced and a label does not depend on n."""
    if split not in _SPLIT_STREAM:
        raise ValueError(f"shapes: unknown split {split!r}; expected one of {sorted(_SPLIT_STREAM)}")
    k = len(SHAPE_CLASSES)
    blocks = [np.random.default_rng([seed, _SPLIT_STREAM[split], b]).permutation(k) for b in range(-(-n // k))]
    return np.concatenate(blocks)[:n] if blocks else np.zeros(0, dtype=np.int64)


def render_shape(
    index: int, label: int, image_size: int, seed: int = 0, split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Image `index` of a split: uint8 (H, W, 3) and its mask (H, W). Each image has its own random stream, so any
    one can be rendered alone (datasets render lazily) and the result does not depend on n."""
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split], image_size, index])
    image, inside = _render_one(rng, int(label), image_size)
    return image, inside.astype(np.uint8) * np.uint8(label + 1)


def render_shapes(
    n: int, image_size: int = 32, seed: int = 0, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render n shapes images: uint8 images (N, 3, H, W), int64 labels (N,), uint8 masks (N, H, W).

    A mask holds the class index + 1 on the shape's pixels and 0 on the background. Classes are balanced. The same
    (n, image_size, seed, split) always gives the same tensors, and the train and test splits of one seed are drawn
    from different random streams.
    """
    if n < 0 or image_size < 8:
        raise ValueError(f"shapes: need n >= 0 and image_size >= 8, got n={n}, image_size={image_size}")
    labels = shape_labels(n, seed, split)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    masks = np.empty((n, image_size, image_size), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i], masks[i] = render_shape(i, label, image_size, seed, split)
    return (
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        torch.from_numpy(labels).long(),
        torch.from_numpy(masks),
    )


# ---- shapes-multi: several shapes of different classes per image (multi-label, detection, segmentation) ----

MULTI_MAX_SHAPES = 4
_MULTI_STREAM = {"train": 10, "val": 11, "test": 12}  # three distinct splits (shapes' val is its test)


def multi_layout(index: int, seed: int = 0, split: str = "train") -> list[tuple[int, float, float, float, float]]:
    """Image `index`'s shapes as (class, cx, cy, r, angle), positions and circumradii in units of the image side.

    1 to 4 shapes of different classes whose circumscribed circles do not overlap, so no shape hides another and
    every shape is whole inside the image. Drawn from its own stream, apart from the colours: the labels and boxes
    are known without rendering, and do not depend on the image size.
    """
    if split not in _MULTI_STREAM:
        raise ValueError(f"shapes-multi: unknown split {split!r}; expected one of {sorted(_MULTI_STREAM)}")
    rng = np.random.default_rng([seed, _MULTI_STREAM[split], index])
    count = int(rng.integers(1, MULTI_MAX_SHAPES + 1))
    labels = rng.choice(len(SHAPE_CLASSES), size=count, replace=False)
    placed: list[tuple[int, float, float, float, float]] = []
    for label in labels.tolist():
        r = rng.uniform(0.10, 0.30 - 0.04 * count)  # fewer shapes, larger ones: 0.10-0.26 of the side for one
        for attempt in range(400):
            if attempt and attempt % 20 == 0:
                r *= 0.9  # crowded (rare): a smaller shape fits more easily
            # The outline reaches up to 1.05 r (the cross's corners), which must stay inside the image.
            cx, cy = rng.uniform(1.05 * r, 1 - 1.05 * r, size=2)
            if all(math.hypot(cx - x, cy - y) >= 1.05 * (r + q) + 0.02 for _, x, y, q, _ in placed):
                break
        placed.append((int(label), float(cx), float(cy), float(r), float(rng.uniform(0, 2 * math.pi))))
    return placed


def multi_boxes(layout: list[tuple[int, float, float, float, float]], size: int) -> np.ndarray:
    """Each shape's box (K, 4) as x0, y0, x1, y1 in pixels: the extent of its outline, within the image."""
    boxes = np.empty((len(layout), 4), dtype=np.float32)
    for k, (label, cx, cy, r, angle) in enumerate(layout):
        outline = np.asarray(_polygon(SHAPE_CLASSES[label], cx * size, cy * size, r * size, angle)[0])
        boxes[k] = [*outline.min(0), *outline.max(0)]
    return np.clip(boxes, 0, size)


def render_multi(
    index: int, image_size: int = 64, seed: int = 0, split: str = "train"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Image `index` of a shapes-multi split: uint8 (H, W, 3), boxes (K, 4) xyxy float32, their classes int64 (K,)
    and the class mask int64 (H, W) (class index + 1 on each shape's pixels, 0 on the background)."""
    layout = multi_layout(index, seed, split)
    rng = np.random.default_rng([seed, _MULTI_STREAM[split], image_size, index])
    image = _background(rng, image_size)
    mask = np.zeros((image_size, image_size), dtype=np.int64)
    for label, cx, cy, r, angle in layout:
        fg = _shape_colour(rng, image)
        alpha = _coverage(label, cx * image_size, cy * image_size, r * image_size, angle, image_size)
        image = image * (1 - alpha[..., None]) + fg * alpha[..., None]
        mask[alpha >= 0.5] = label + 1
    box_labels = np.array([label for label, *_ in layout], dtype=np.int64)
    return (image * 255 + 0.5).astype(np.uint8), multi_boxes(layout, image_size), box_labels, mask
