"""Prediction: a bundle (model, preprocessing, class names) behind one call, and the batching, per-file error
reporting loop over image files that `resnetkit predict` prints.

    resnetkit predict --checkpoint runs/cifar/best.pt photo.jpg folder/ --top-k 3 --format json

>>> predictor = Predictor(load_bundle("runs/cifar/best.pt"))
>>> predictor.predict([decode_image("cat.jpg")], top_k=3)
[[('cat', 0.91), ('dog', 0.05), ('deer', 0.01)]]
>>> records = predict_files(predictor, list_images(["photos/"]), batch_size=32, top_k=5)

A multi-label bundle (`bundle.multilabel`) gives each class its own sigmoid probability, and a prediction lists
every class whose probability reaches that class's threshold (chosen on the validation split at training, 0.5
where a model has none) under "labels", beside the top-k:
>>> predictor.labels(predictor.probabilities(batch))
[[('cat', 0.97), ('dog', 0.62)]]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from resnetkit.bundle import Bundle
from resnetkit.data.image import DEFAULT_MAX_PIXELS, BadImageError, decode_image


class Predictor:
    """A classifier ready for images: `predict(images, top_k)` -> per image, the top-k (class name, probability);
    for a multi-label model also `labels(probs)`, the classes above their thresholds.

    Images are uint8 RGB tensors (3, H, W) as `decode_image` gives them; the bundle's evaluation transform turns
    them into the model's input. Probabilities are softmax(logits / T) with the bundle's temperature T (1 unless
    `resnetkit calibrate` fitted one).
    """

    def __init__(self, bundle: Bundle) -> None:
        if bundle.task != "classification":
            raise ValueError(f"{bundle.source} is a {bundle.task} model, not a classifier")
        self.bundle = bundle
        self.model = bundle.model
        self.preprocess = dict(bundle.preprocess)
        self.transform = bundle.transform
        self.classes = list(bundle.classes)
        self.name = bundle.name
        self.temperature = float(bundle.temperature)
        self.multilabel = bundle.multilabel
        self.thresholds = list(bundle.thresholds or [0.5] * len(self.classes)) if self.multilabel else None
        if self.thresholds is not None and len(self.thresholds) != len(self.classes):
            raise ValueError(f"{bundle.source}: {len(self.thresholds)} thresholds for {len(self.classes)} classes")

    @property
    def device(self) -> torch.device:
        if isinstance(self.model, torch.nn.Module):
            return next(self.model.parameters()).device
        return torch.device("cpu")

    @property
    def input_size(self) -> int:
        return int(self.preprocess["input_size"])

    def to_tensor(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Preprocess decoded images into one normalised float batch."""
        return torch.stack([self.transform(im) for im in images])

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Probabilities (N, classes) of a preprocessed batch at the bundle's temperature T: softmax(logits / T), or
        one sigmoid(logits / T) per class for a multi-label model."""
        logits = torch.as_tensor(self.model(batch.to(self.device))).float() / self.temperature
        return (logits.sigmoid() if self.multilabel else logits.softmax(dim=1)).cpu()

    def top_indices(self, probs: torch.Tensor, k: int = 5) -> list[list[tuple[int, float]]]:
        """Per row of `probs`, the k most likely (class index, probability), most likely first."""
        values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
        return [list(zip(ix, vs)) for vs, ix in zip(values.tolist(), indices.tolist())]

    def top_k(self, probs: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
        """Per row of `probs`, the k most likely (class name, probability), most likely first."""
        return [[(self.classes[i], p) for i, p in row] for row in self.top_indices(probs, k)]

    def label_indices(self, probs: torch.Tensor) -> list[list[tuple[int, float]]]:
        """Per row of a multi-label model's `probs`, every (class index, probability) at or above its class's
        threshold, most likely first."""
        if self.thresholds is None:
            raise ValueError(f"{self.name} is a single-label classifier: it has top-k classes, not labels")
        above = probs >= torch.tensor(self.thresholds, dtype=probs.dtype)
        rows = []
        for row, keep in zip(probs.tolist(), above.tolist()):
            rows.append(sorted(((i, p) for i, (p, k) in enumerate(zip(row, keep)) if k), key=lambda ip: -ip[1]))
        return rows

    def labels(self, probs: torch.Tensor) -> list[list[tuple[str, float]]]:
        """Per row of a multi-label model's `probs`, every (class name, probability) at or above its threshold."""
        return [[(self.classes[i], p) for i, p in row] for row in self.label_indices(probs)]

    def ranked(self, probs: torch.Tensor, top_k: int, digits: int | None = None) -> list[dict[str, Any]]:
        """Per row, what predict and serve return: {"top_k": [{"class", "index", "prob"}]}, and for a multi-label
        model first {"labels": [...]}, the classes at or above their thresholds (the same fields and "threshold").
        digits: round the probabilities."""

        def entry(i: int, p: float) -> dict[str, Any]:
            return {"class": self.classes[i], "index": i, "prob": round(p, digits) if digits is not None else p}

        records: list[dict[str, Any]] = [
            {"top_k": [entry(i, p) for i, p in top]} for top in self.top_indices(probs, top_k)
        ]
        if not self.multilabel:
            return records
        return [
            {"labels": [{**entry(i, p), "threshold": self.thresholds[i]} for i, p in row], **record}
            for record, row in zip(records, self.label_indices(probs))
        ]

    def predict(self, images: Sequence[torch.Tensor], top_k: int = 5) -> list[list[tuple[str, float]]]:
        if not images:
            return []
        return self.top_k(self.probabilities(self.to_tensor(images)), top_k)


def read_batches(
    files: Sequence[Path],
    batch_size: int,
    prepare: Callable[[torch.Tensor], Any] = lambda image: image,
    max_pixels: int = DEFAULT_MAX_PIXELS,
):
    """Decode `files` a batch at a time: yields (paths, prepared images, [(path, error message)]) per batch, so a
    caller can report each unreadable file and go on."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(files), batch_size):
        paths, images, errors = [], [], []
        for path in files[start : start + batch_size]:
            try:
                images.append(prepare(decode_image(path, max_pixels=max_pixels)))
                paths.append(path)
            except BadImageError as e:
                errors.append((path, str(e)))
        yield paths, images, errors


def predict_files(
    predictor: Predictor,
    files: Sequence[str | Path],
    *,
    batch_size: int = 32,
    top_k: int = 5,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Classify image files, `batch_size` per model call. Returns one record per file, in the order given:
    {"file", "top_k": [{"class", "index", "prob"}]} (a multi-label model's also with "labels", see
    `Predictor.ranked`) or, for a file that cannot be read, {"file", "error"}."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    files = [Path(f) for f in files]
    records: dict[str, dict[str, Any]] = {}
    done = 0
    for paths, images, errors in read_batches(files, batch_size, predictor.transform):
        for path, message in errors:
            records[str(path)] = {"file": str(path), "error": message}
        if images:
            probs = predictor.probabilities(torch.stack(images))
            for path, ranked in zip(paths, predictor.ranked(probs, top_k, digits=6)):
                records[str(path)] = {"file": str(path), **ranked}
        done += len(paths) + len(errors)
        if progress is not None:
            progress("predicting", done, len(files))
    return [records[str(f)] for f in files]


__all__ = ["Predictor", "predict_files", "read_batches"]
