"""Evaluate a classifier over a whole split: every metric of `resnetkit.evaluation.metrics`, plus the figures.

    resnetkit eval --checkpoint runs/demo/best.pt --split test --tta flip --out runs/demo/eval
    resnetkit eval --model resnet50 --weights resnet50.pth --data imagenet-folder/

    >>> import resnetkit
    >>> result = resnetkit.evaluation.evaluate("runs/demo/best.pt", out_dir="runs/demo/eval")
    >>> result["top1"], result["ece"]

A multi-label checkpoint (task multilabel) is evaluated with the multi-label metrics instead (mAP, per-class AP,
precision, recall and F1 at the checkpoint's thresholds, exact-match ratio, Hamming loss) and a precision-recall
plot. eval.json also holds the class distribution of each split (the training and validation data from the
checkpoint, the evaluated split counted here).

Under DDP (torch.distributed initialised, e.g. by torchrun) each rank evaluates every world_size-th sample, with
no padding duplicates, and the metric counters are summed across ranks: the numbers equal a single-process run.
Only rank 0 writes files.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn

from resnetkit.evaluation.metrics import (
    ClassificationMetrics,
    MultilabelMetrics,
    multilabel_metrics,
    precision_recall_curve,
)
from resnetkit.evaluation.tta import TTA_CHOICES, tta_logits
from resnetkit.fileio import write_atomic

if TYPE_CHECKING:
    from resnetkit.bundle import Bundle

WORST_SHOWN = 25  # misclassified images kept for the grid: 5 x 5


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            index = int(os.environ.get("LOCAL_RANK", 0)) if dist.is_available() and dist.is_initialized() else 0
            return torch.device("cuda", index)
        return torch.device("cpu")
    return torch.device(device)


def _label_map(data_classes: list[str], model_classes: list[str], data: str) -> torch.Tensor:
    """Dataset label -> model class index, matched by name (a dataset holding a subset of the classes is fine)."""
    if list(data_classes) == list(model_classes):
        return torch.arange(len(model_classes))
    index = {name: i for i, name in enumerate(model_classes)}
    missing = [name for name in data_classes if name not in index]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (f" ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise ValueError(
            f"data {data}: classes {shown} are not among the model's {len(model_classes)} classes "
            f"({', '.join(model_classes[:5])}{' ...' if len(model_classes) > 5 else ''})"
        )
    return torch.tensor([index[name] for name in data_classes])


def _data_from_checkpoint(ckpt: dict, path: str) -> tuple[str, dict[str, Any]]:
    """The checkpoint's dataset and build_dataset's options for it: root, split lists, a listing's columns."""
    from resnetkit.data.splits import dataset_options

    config = ckpt.get("config") or {}
    data_cfg = config.get("data") or {}
    if not data_cfg.get("name"):
        raise ValueError(f"{path} does not record its dataset (config.data.name): pass --data")
    return data_cfg["name"], dataset_options(data_cfg, path, task=config.get("task"))


def evaluate(
    source: str | Path | Bundle | nn.Module,
    data: str | Path | None = None,
    split: str = "test",
    tta: str | None = None,
    out_dir: str | Path | None = None,
    *,
    classes: list[str] | None = None,
    preprocess: dict[str, Any] | None = None,
    root: str | Path | None = None,
    batch_size: int = 128,
    workers: int = 2,
    device: str | torch.device | None = "auto",
    use_ema: bool = False,
    model_name: str | None = None,
    progress: bool = False,
    multilabel: bool = False,
    thresholds: list[float] | None = None,
) -> dict[str, Any]:
    """Evaluate a classifier over the whole split and return eval.json's contents; with `out_dir`, write eval.json,
    confusion_matrix.png/.csv, reliability.png and misclassified.png there (multi-label: eval.json and
    pr_curves.png).

    source: a checkpoint or exported file, or a Bundle (`resnetkit.bundle.load_bundle`): classes, preprocessing and
        (for a checkpoint) the default dataset come from it; or a bare model, for which `preprocess` is needed and
        `classes` default to the dataset's. A bundle whose classes are made-up indices takes the dataset's names.
    data: a dataset name or folder (see `resnetkit.data.build_dataset`); default: the checkpoint's training data.
    tta: None (or "none"), "flip" or "flip-translate": see `resnetkit.evaluation.tta`.
    model_name: how eval.json names a bare model (default: its class name).
    multilabel, thresholds: a bare model's kind and decision thresholds (a bundle says its own).
    """
    from resnetkit.bundle import Bundle, load_bundle
    from resnetkit.data import build_dataset, collate_skipping, eval_transform_from

    tta = None if tta == "none" else tta
    if tta is not None and tta not in TTA_CHOICES:
        raise ValueError(f"tta must be one of {', '.join(TTA_CHOICES)}, got {tta!r}")
    started = time.time()
    info: dict[str, Any] = {}
    options: dict[str, Any] = {}
    temperature = 1.0  # a calibrated bundle's T: loss, ECE and the reliability diagram are those of predict's output
    if isinstance(source, nn.Module):
        model = source
        if preprocess is None:
            raise ValueError(
                "evaluating a model object needs preprocess= (a checkpoint's 'preprocess' dict, or "
                "resnetkit.data.preprocess_info(preset))"
            )
        if data is None:
            raise ValueError("evaluating a model object needs data= (a dataset name or folder)")
        info.update(checkpoint=None, model=model_name or type(model).__name__)
    else:
        bundle = source if isinstance(source, Bundle) else load_bundle(source, use_ema=use_ema)
        if bundle.task != "classification":
            raise ValueError(f"{bundle.source} is a {bundle.task} model: evaluate it with evaluate_task")
        model, temperature = bundle.model, bundle.temperature
        multilabel, thresholds = bundle.multilabel, bundle.thresholds
        classes = classes or (bundle.classes if bundle.named_classes else None)
        preprocess = preprocess or bundle.preprocess
        if data is None:
            if bundle.checkpoint is None:
                raise ValueError(f"{bundle.source} does not record its dataset: pass data")
            data, options = _data_from_checkpoint(bundle.checkpoint, bundle.source)
        epoch = bundle.checkpoint.get("epoch") if bundle.checkpoint else None
        if bundle.kind == "weights":
            info.update(checkpoint=None, weights=bundle.source, model=bundle.name)
        else:
            info.update(checkpoint=bundle.source, model=bundle.name, epoch=epoch)

    is_shapes = str(data).partition(":")[0] in ("shapes", "shapes-multi")
    image_size = preprocess["input_size"] if is_shapes else None  # shapes renders at the trained size
    options = {"root": root, **options}  # the checkpoint's (its data) or the caller's root
    transform = eval_transform_from(preprocess)
    dataset = build_dataset(data, split, transform=transform, image_size=image_size, **options)
    classes = list(classes or dataset.classes)
    label_map = _label_map(dataset.classes, classes, str(data))
    if bool(getattr(dataset, "multilabel", False)) != multilabel:
        kind = "several labels" if multilabel else "one label"
        raise ValueError(f"data {data}: the model predicts {kind} per image, the dataset {split} split does not")

    rank, world_size = _rank_world()
    indices = list(range(rank, len(dataset), world_size))  # a strided shard: every sample exactly once overall
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_skipping,
    )
    device = resolve_device(device)
    if isinstance(model, nn.Module):
        was_training = model.training
        model.to(device).eval()
    else:  # an onnxruntime session runs on the CPU
        was_training, device = False, torch.device("cpu")
    if multilabel:
        metrics: Any = MultilabelMetrics(len(classes))
    else:
        metrics = ClassificationMetrics(len(classes), keep_worst=WORST_SHOWN)
    skipped: list[tuple[str, str]] = []
    with _progress(len(loader), f"eval {split}", progress and rank == 0) as bar:
        for images, labels, bad in loader:
            skipped += bad
            if len(labels):
                with torch.inference_mode():
                    batch = images.to(device, non_blocking=True)
                    logits = tta_logits(model, batch, tta or "none", multilabel, temperature)
                if multilabel:  # the dataset's columns into the model's, by class name
                    targets = torch.zeros(len(labels), len(classes))
                    targets[:, label_map] = labels.float()
                    metrics.update(logits, targets)
                else:
                    metrics.update(logits, label_map[labels], images)
            bar.update(1)
    if isinstance(model, nn.Module):
        model.train(was_training)

    result: dict[str, Any] = {
        **info,
        "data": str(data),
        "split": split,
        "tta": tta,
        "temperature": temperature,
        "num_classes": len(classes),
        "classes": classes,
        "preprocess": preprocess,
        "multilabel": multilabel,
    }
    counts = dict((bundle.checkpoint or {}).get("class_counts") or {}) if not isinstance(source, nn.Module) else {}
    if multilabel:
        scores, targets, loss_sum = metrics.gathered()
        result.update(multilabel_metrics(scores, targets, classes, thresholds, loss_sum=loss_sum))
        result["thresholds_from"] = "checkpoint" if thresholds is not None else "default 0.5"
        result["class_distribution"] = {**counts, split: [r["support"] for r in result["per_class"]]}
        result.update(skipped=[{"path": p, "reason": r} for p, r in skipped], device=str(device))
        result.update(world_size=world_size, seconds=round(time.time() - started, 3))
        if out_dir is not None and rank == 0:
            write_multilabel_outputs(result, scores, targets, out_dir)
        return result
    result.update(metrics.compute(classes))
    result["class_distribution"] = {**counts, split: [r["support"] for r in result["per_class"]]}
    result["top_confusions"] = top_confusions(result["confusion_matrix"], classes)
    worst = metrics.gathered_worst()
    result["misclassified"] = [{"true": classes[t], "predicted": classes[p], "confidence": c} for c, t, p, _ in worst]
    result["skipped"] = [{"path": p, "reason": r} for p, r in skipped]
    result["device"] = str(device)
    result["world_size"] = world_size
    result["samples_per_rank"] = _gather_counts(int(metrics.confusion.sum()))  # local counts, before the reduction
    result["seconds"] = round(time.time() - started, 3)
    if out_dir is not None and rank == 0:
        write_outputs(result, worst, preprocess, out_dir)
    return result


def _gather_counts(count: int) -> list[int]:
    if not (dist.is_available() and dist.is_initialized()):
        return [count]
    counts: list = [None] * dist.get_world_size()
    dist.all_gather_object(counts, count)
    return counts


class _progress:
    """A Progress bar from the training monitor when asked for, otherwise nothing."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from resnetkit.train.monitor import Progress

            self.bar = Progress(total, desc)

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def top_confusions(confusion: list[list[int]], classes: list[str], n: int = 10) -> list[dict[str, Any]]:
    """The `n` largest off-diagonal cells: which true class is most often taken for which other class."""
    matrix = torch.tensor(confusion)
    matrix.fill_diagonal_(0)
    counts, flat = matrix.flatten().topk(min(n, matrix.numel()))
    size = matrix.shape[1]
    return [
        {"true": classes[int(i) // size], "predicted": classes[int(i) % size], "count": int(c)}
        for c, i in zip(counts, flat)
        if c > 0
    ]


def denormalise(images: torch.Tensor, preprocess: dict[str, Any]) -> torch.Tensor:
    """Normalised float images (N, 3, H, W) back to uint8 RGB for display."""
    mean = torch.tensor(preprocess["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(preprocess["std"]).view(1, 3, 1, 1)
    return (images.float().cpu() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)


def write_outputs(result: dict[str, Any], worst: list, preprocess: dict[str, Any], out_dir: str | Path) -> Path:
    """eval.json, confusion_matrix.csv/.png, reliability.png and misclassified.png in `out_dir`."""
    from resnetkit.evaluation import figures as report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = result["classes"]
    report.write_confusion_csv(result["confusion_matrix"], classes, out / "confusion_matrix.csv")
    report.plot_confusion_matrix(
        result["confusion_matrix"],
        classes,
        out / "confusion_matrix.png",
        title=f"{result['model']} on {Path(result['data']).name} {result['split']}: top-1 {result['top1']:.1%}",
    )
    report.plot_reliability(result["calibration"], result["ece"], out / "reliability.png")
    shown = [w for w in worst if w[3] is not None]
    images = denormalise(torch.stack([w[3] for w in shown]), preprocess) if shown else torch.zeros(0, 3, 1, 1)
    labels = [(classes[t], classes[p], c) for c, t, p, _ in shown]
    report.plot_misclassified(images, labels, out / "misclassified.png")
    write_atomic(out / "eval.json", json.dumps(result, indent=2) + "\n")
    return out


def write_multilabel_outputs(result: dict[str, Any], scores: torch.Tensor, targets: torch.Tensor, out_dir) -> Path:
    """eval.json and pr_curves.png (each class's precision-recall curve, its AP in the legend) in `out_dir`."""
    from resnetkit.evaluation import figures

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = []
    for c, row in enumerate(result["per_class"]):
        if row["ap"] is not None:
            precision, recall = precision_recall_curve(scores[:, c], targets[:, c])
            curves.append((row["class"], precision, recall, row["ap"]))
    title = f"{result['model']} on {Path(result['data']).name} {result['split']}: mAP {result['map']:.3f}"
    figures.plot_pr_curves(curves, out / "pr_curves.png", title=title)
    write_atomic(out / "eval.json", json.dumps(result, indent=2) + "\n")
    return out


def evaluate_task(
    source: str | Path | Bundle,
    data: str | None = None,
    split: str = "val",
    out_dir: str | Path | None = None,
    *,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str | torch.device | None = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate a detection or segmentation checkpoint on a split of `data` (default: the data it was trained on),
    with the same metrics as its validation during training (COCO mAP; mIoU, per-class IoU and Dice, pixel
    accuracy), exact under torchrun. Returns eval.json's contents and writes it into `out_dir` when given."""
    from resnetkit.bundle import Bundle, load_bundle
    from resnetkit.config import config_from_dict
    from resnetkit.tasks import get_task
    from resnetkit.train.distributed import DistInfo

    started = time.time()
    bundle = source if isinstance(source, Bundle) else load_bundle(source)
    if bundle.task == "classification" or bundle.checkpoint is None:
        raise ValueError(f"{bundle.source}: evaluate_task takes a detection or segmentation training checkpoint")
    cfg = config_from_dict(bundle.checkpoint["config"], f"{bundle.source}: config")
    if data is not None:
        cfg.data.name = str(data)
    if batch_size is not None:
        cfg.data.eval_batch_size = batch_size
    if workers is not None:
        cfg.data.workers = workers
    rank, world_size = _rank_world()
    dev = resolve_device(device)
    task = get_task(bundle.task)
    task.cfg, task.classes, task.preprocess = cfg, list(bundle.classes), dict(bundle.preprocess)
    loader = task.eval_loader(cfg, split, DistInfo(rank, world_size, rank, dev))
    model = bundle.module.to(dev)
    with _progress(len(loader), f"eval {split}", progress and rank == 0) as bar:
        if bundle.task == "detection":
            from resnetkit.tasks.detection import evaluate_detections

            metrics = evaluate_detections(model, loader, progress=lambda n: bar.update(1))
        else:
            from resnetkit.tasks.segmentation import evaluate_segmentation, nan_none

            s = cfg.segmentation
            metrics = evaluate_segmentation(
                model, loader, len(task.classes), s.ignore_index, progress=lambda n: bar.update(1)
            )
            metrics["per_class_iou"] = dict(zip(task.classes, map(nan_none, metrics.pop("per_class_iou"))))
            metrics["per_class_dice"] = dict(zip(task.classes, map(nan_none, metrics.pop("per_class_dice"))))
    result = {
        "checkpoint": bundle.source,
        "task": bundle.task,
        "model": bundle.name,
        "data": cfg.data.name,
        "split": split,
        "classes": task.classes,
        **metrics,
        "world_size": world_size,
        "seconds": round(time.time() - started, 3),
    }
    if out_dir is not None and rank == 0:
        write_atomic(Path(out_dir) / "eval.json", json.dumps(result, indent=2) + "\n")
    return result
