"""Figures of an evaluation: the confusion matrix (and its CSV), the reliability diagram, the misclassified grid;
for a multi-label model the precision-recall curves.

Written by `resnetkit.evaluation.evaluate` into the eval folder and embedded by the run report.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

DPI = 100
MANY_CLASSES = 30  # beyond this, the confusion matrix drops per-cell numbers and most tick labels


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = DPI) -> Path:
    """Every figure resnetkit draws is written here: PNG into a temporary file beside `path`, then renamed over it,
    so a viewer refreshing it (or two study workers writing it) never sees half an image; the figure is closed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        _pyplot().close(fig)
        tmp.unlink(missing_ok=True)
    return path


def confusion_figsize(num_classes: int) -> tuple[float, float]:
    """Inches: grows with the class count up to 30 classes (room for names), fixed at 10 x 9 beyond."""
    if num_classes > MANY_CLASSES:
        return 10.0, 9.0
    side = min(max(5.0, 0.42 * num_classes + 3.0), 15.6)
    return side + 1.0, side


def write_confusion_csv(confusion: list[list[int]], classes: list[str], path: str | Path) -> Path:
    """Counts: one row per true class, one column per predicted class, class names as headers."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, confusion):
            writer.writerow([name, *row])
    return path


def plot_confusion_matrix(confusion: list[list[int]], classes: list[str], path: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (each row: where a true class's samples went), classes sorted by recall,
    best first, so the weak classes and their confusions gather at the bottom right. Up to 30 classes every cell
    shows its percentage and every class is named; beyond, the matrix is drawn as an image with sparse ticks."""
    plt = _pyplot()
    counts = np.asarray(confusion, dtype=np.float64)
    num_classes = len(classes)
    support = counts.sum(1, keepdims=True)
    normalised = np.divide(counts, support, out=np.zeros_like(counts), where=support > 0)
    recall = normalised.diagonal()
    order = np.argsort(-recall, kind="stable")
    matrix = normalised[order][:, order]
    names = [classes[i] for i in order]

    from matplotlib.colors import Normalize, PowerNorm

    fig, ax = plt.subplots(figsize=confusion_figsize(num_classes), layout="constrained")
    # With many classes most mass sits in small off-diagonal fractions: a square-root scale makes them visible.
    norm = PowerNorm(0.5, vmin=0, vmax=1) if num_classes > MANY_CLASSES else Normalize(vmin=0, vmax=1)
    image = ax.imshow(matrix, cmap="Blues", norm=norm, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="fraction of the true class")
    if num_classes <= MANY_CLASSES:
        ticks = np.arange(num_classes)
        ax.set_xticks(ticks, names, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(ticks, names)
        fontsize = 9 if num_classes <= 12 else 7 if num_classes <= 20 else 5.5
        for i in range(num_classes):
            for j in range(num_classes):
                value = matrix[i, j]
                if value > 0 or i == j:  # a cell under half a percent reads "<1", not a misleading "0"
                    percent = int(value * 100 + 0.5)  # half up: 1 of 200 is "1", not Python's "0"
                    text = "<1" if percent == 0 and value > 0 else str(percent)
                    color = "white" if value > 0.5 else "black"
                    ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color=color)
    else:
        step = int(np.ceil(num_classes / 20))  # ~20 position ticks, so a cell can be found by its rank
        ticks = np.arange(0, num_classes, step)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_yticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("predicted class (rank by recall)")
        ax.set_ylabel("true class (rank by recall)")
    if num_classes <= MANY_CLASSES:
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
    scale = " (square-root colour scale)" if num_classes > MANY_CLASSES else ""
    ax.set_title(f"{title}\n" * bool(title) + f"row-normalised %, classes sorted by recall{scale}", fontsize=10)
    return save_figure(fig, path)


def plot_reliability(
    calibration: list[dict[str, Any]],
    ece: float,
    path: str | Path,
    title: str = "",
    xlabel: str = "confidence (max softmax probability)",
    ylabel: str = "accuracy",
) -> Path:
    """Reliability diagram: accuracy against confidence per bin (a perfectly calibrated model lies on the
    diagonal), the gap shaded, and below it how many samples fall in each bin. `title` goes before the ECE; a
    multi-label model's bins are of per-label probabilities against the fraction of labels present (`xlabel`,
    `ylabel`)."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.0), height_ratios=(3, 1), sharex=True, layout="constrained")
    lower = np.array([b["lower"] for b in calibration])
    width = np.array([b["upper"] - b["lower"] for b in calibration])
    count = np.array([b["count"] for b in calibration])
    filled = count > 0
    accuracy = np.array([b["accuracy"] if b["count"] else 0.0 for b in calibration])
    confidence = np.array([b["confidence"] if b["count"] else 0.0 for b in calibration])
    top.bar(
        lower[filled],
        accuracy[filled],
        width=width[filled],
        align="edge",
        color="tab:blue",
        edgecolor="black",
        linewidth=0.5,
        label=ylabel,
    )
    gap_bottom = np.minimum(accuracy, confidence)[filled]
    top.bar(
        lower[filled],
        np.abs(confidence - accuracy)[filled],
        bottom=gap_bottom,
        width=width[filled],
        align="edge",
        color="tab:red",
        alpha=0.35,
        edgecolor="tab:red",
        hatch="//",
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel(ylabel)
    top.set_title(f"{title or 'reliability diagram'}: ECE {ece * 100:.2f}%")
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    bottom.bar(lower, count, width=width, align="edge", color="gray", edgecolor="black", linewidth=0.5)
    bottom.set_xlabel(xlabel)
    bottom.set_ylabel("samples")
    bottom.grid(alpha=0.3)
    return save_figure(fig, path)


def misclassified_figsize(count: int) -> tuple[float, float]:
    if count == 0:
        return 5.0, 1.6  # room for the title and the "no misclassified images" note
    cols = min(5, max(count, 1))
    rows = max(1, int(np.ceil(count / cols)))
    return 2.1 * cols, 2.45 * rows


def plot_misclassified(images: torch.Tensor, labels: list[tuple[str, str, float]], path: str | Path) -> Path:
    """A grid (5 per row) of the most confidently misclassified images, each titled with its true class and the
    predicted class with its probability. images: uint8 (N, 3, H, W); labels: (true, predicted, confidence)."""
    plt = _pyplot()
    count = len(labels)
    cols = min(5, max(count, 1))
    rows = max(1, int(np.ceil(count / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=misclassified_figsize(count), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    if count == 0:
        axes[0, 0].text(0.5, 0.5, "no misclassified images", ha="center", va="center", fontsize=11)
    for ax, image, (true, predicted, confidence) in zip(axes.flat, images, labels):
        ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest" if image.shape[-1] < 96 else "antialiased")
        ax.set_title(
            f"true: {_short(true)}\npred: {_short(predicted)} ({confidence:.0%})", fontsize=9, color="firebrick"
        )
    fig.suptitle("most confidently misclassified", fontsize=11)
    return save_figure(fig, path)


LEGEND_CLASSES = 20  # beyond this, the precision-recall plot names only the best and worst classes


def plot_pr_curves(
    curves: list[tuple[str, list[float], list[float], float]], path: str | Path, title: str = ""
) -> Path:
    """Per class a precision-recall curve (step-wise, as average precision sums it), labelled with its AP in the
    legend, best first. curves: (class, precision, recall, AP), precision and recall from the highest threshold."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.5), layout="constrained")
    ranked = sorted(curves, key=lambda c: -c[3])
    named = set(range(len(ranked)))
    if len(ranked) > LEGEND_CLASSES:
        half = LEGEND_CLASSES // 2
        named = set(range(half)) | set(range(len(ranked) - half, len(ranked)))
    colours = plt.get_cmap("tab20" if len(ranked) > 10 else "tab10")
    for i, (name, precision, recall, ap) in enumerate(ranked):
        label = f"{_short(name)} (AP {ap:.3f})" if i in named else None
        ax.step(
            [0.0, *recall],
            [precision[0] if precision else 1.0, *precision],
            where="pre",
            linewidth=1.2,
            color=colours(i % colours.N),
            label=label,
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(alpha=0.3)
    mean_ap = sum(c[3] for c in curves) / len(curves) if curves else 0.0
    ax.set_title(f"{title}\n" * bool(title) + f"precision-recall per class, mAP {mean_ap:.3f}", fontsize=10)
    if curves:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "no class has a positive sample", ha="center", va="center")
    return save_figure(fig, path)


def _short(name: str, width: int = 18) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


# ---------------------------------------------------------------------------------------------------------------
# The run report
