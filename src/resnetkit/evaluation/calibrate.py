"""Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"): one scalar T, fitted on the
validation split by minimising the negative log-likelihood, so that softmax(logits / T) means what it says. Dividing
every logit by the same T > 0 changes no prediction: top-1 (and every ranking) stays exactly as it was.

A multi-label classifier gets one T shared by its per-class sigmoids, sigmoid(logits / T), fitted on the binary
cross-entropy; its per-class decision thresholds are moved with it (a threshold t at the old T becomes
sigmoid(T_old * logit(t) / T_new)), so every predicted label stays the same, and so do mAP, F1 and exact match.
Its ECE is over every (image, class) pair: the probability that the label is present against how often it is.

    resnetkit calibrate --checkpoint runs/demo/best.pt                           # T written into best.pt
    resnetkit calibrate --checkpoint runs/demo/best.pt --out runs/demo/calibrated.pt

    >>> from resnetkit.evaluation.calibrate import calibrate
    >>> result = calibrate("runs/demo/best.pt")
    >>> result["temperature"], result["before"]["ece"], result["after"]["ece"]

The validation split and its preprocessing come from the checkpoint's config, read by the task's `eval_loader`
(the loader training validated with). The checkpoint is written again (atomically) with every key as it was plus
`temperature` and `calibration`; `load_bundle` reads T back, and the Predictor (predict, serve), exports and
`resnetkit eval` apply it. Beside the written checkpoint, `calibration/` receives calibration.json and the reliability
diagrams before and after (reliability_before.png, reliability_after.png), which the run report shows.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from resnetkit.evaluation.metrics import (
    DEFAULT_BINS,
    ClassificationMetrics,
    multilabel_metrics,
    probability_calibration,
)

if TYPE_CHECKING:
    from resnetkit.bundle import Bundle
    from resnetkit.config import Config

# Where T is searched: a factor of 100 either way of the raw logits. A T found at an end means the NLL still falls
# beyond it (a model with no validation error has its NLL fall all the way to T -> 0): the result says so.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
FOLDER = "calibration"  # beside the calibrated checkpoint: calibration.json and the two reliability diagrams


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, multilabel: bool = False) -> float:
    """Mean negative log-likelihood at `temperature`: the cross-entropy of softmax(logits / T) for class indices
    (N,), or with `multilabel` the binary cross-entropy of sigmoid(logits / T) for multi-hot targets (N, C), summed
    over an image's classes and averaged over images (the reduction of eval's and the training's multi-label loss)."""
    z = logits.double() / temperature
    if multilabel:
        return float(F.binary_cross_entropy_with_logits(z, targets.double(), reduction="sum")) / len(z)
    return float(F.cross_entropy(z, targets.long()))


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool = False) -> float:
    """The T in [MIN_TEMPERATURE, MAX_TEMPERATURE] that minimises `nll(logits, targets, T, multilabel)`.

    A golden-section search over log T: the NLL is convex in 1/T (a log-sum-exp, or for sigmoids a softplus, of
    functions linear in 1/T, minus one linear in it), so along log T it has a single minimum, which the search
    brackets to 1e-10 in about 50 evaluations of the loss, with no step size to tune and no chance of leaving the
    range.
    """
    logits, targets = logits.detach().double().cpu(), targets.detach().cpu()
    if logits.dim() != 2 or len(logits) != len(targets) or not len(targets):
        raise ValueError(f"need logits (N, C) and N targets, N >= 1; got {tuple(logits.shape)} and {len(targets)}")

    def loss(log_t: float) -> float:
        return nll(logits, targets, math.exp(log_t), multilabel)

    lo, hi = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    shrink = (math.sqrt(5) - 1) / 2
    a, b = hi - shrink * (hi - lo), lo + shrink * (hi - lo)
    fa, fb = loss(a), loss(b)
    while hi - lo > 1e-10:
        if fa <= fb:  # the minimum lies in [lo, b]
            hi, b, fb = b, a, fa
            a = hi - shrink * (hi - lo)
            fa = loss(a)
        else:  # in [a, hi]
            lo, a, fa = a, b, fb
            b = lo + shrink * (hi - lo)
            fb = loss(b)
    return math.exp((lo + hi) / 2)


def rescale_thresholds(thresholds: list[float], old: float, new: float) -> list[float]:
    """Probability thresholds chosen at temperature `old` that make the same decisions at temperature `new`:
    sigmoid(z / old) >= t exactly when sigmoid(z / new) >= sigmoid(old * logit(t) / new)."""
    out = []
    for t in thresholds:
        t = min(max(float(t), 1e-12), 1 - 1e-12)
        out.append(1 / (1 + math.exp(-old * math.log(t / (1 - t)) / new)))
    return out


def calibration_metrics(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    multilabel: bool = False,
    thresholds: list[float] | None = None,
) -> dict[str, Any]:
    """NLL, ECE (15 bins) and the reliability bins at `temperature`, with top-1 (through the same
    `ClassificationMetrics` as `resnetkit eval`), or for a multi-label model mAP, macro F1 and exact match at
    `thresholds` (`multilabel_metrics`, as eval computes them)."""
    if multilabel:
        probs = (logits.double() / temperature).sigmoid()
        ece, bins = probability_calibration(probs, targets, DEFAULT_BINS)
        scores = multilabel_metrics(probs, targets, thresholds=thresholds)
        return {
            "temperature": temperature,
            "map": scores["map"],
            "f1_macro": scores["f1_macro"],
            "exact_match": scores["exact_match"],
            "nll": nll(logits, targets, temperature, multilabel=True),
            "ece": ece,
            "calibration": bins,
            "thresholds": scores["thresholds"],
        }
    metrics = ClassificationMetrics(logits.shape[1], num_bins=DEFAULT_BINS)
    metrics.update(logits.double() / temperature, targets)
    result = metrics.compute()
    return {
        "temperature": temperature,
        "top1": result["top1"],
        "nll": result["loss"],
        "ece": result["ece"],
        "calibration": result["calibration"],
    }


@torch.no_grad()
def split_logits(bundle: Bundle, cfg: Config, split: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw logits (N, C) and targets of every image of `split`, read by the task's `eval_loader` with the
    bundle's preprocessing."""
    from resnetkit.tasks import get_task, task_of
    from resnetkit.train.distributed import DistInfo

    task = get_task(task_of(bundle.checkpoint or {}) if bundle.checkpoint else bundle.task)
    task.cfg, task.classes, task.preprocess = cfg, list(bundle.classes), dict(bundle.preprocess)
    loader = task.eval_loader(cfg, split, DistInfo(device=device))
    if list(loader.classes) != list(bundle.classes):
        raise ValueError(
            f"{cfg.data.name} [{split}] has the classes {list(loader.classes)[:5]}, the model "
            f"{list(bundle.classes)[:5]}: calibrate on data with the model's classes"
        )
    model = bundle.module.to(device).eval()
    logits, targets = [], []
    for images, labels in loader:
        logits.append(model(images).float().cpu())
        targets.append(labels.cpu())
    if not logits:
        raise ValueError(f"{cfg.data.name} [{split}] holds no readable images to calibrate on")
    return torch.cat(logits), torch.cat(targets)


def calibrate(
    checkpoint: str | Path,
    out: str | Path | None = None,
    *,
    data: str | None = None,
    split: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str | torch.device | None = "auto",
) -> dict[str, Any]:
    """Fit the temperature of a classifier checkpoint on a held-out split and write it into a checkpoint.

    out: the checkpoint written (default: `checkpoint` itself, in place; every other key is kept as it was).
    data, split: what to fit on (default: the checkpoint's dataset and its validation split, data.val_split).
    Returns calibration.json's contents: the temperature, and top-1 (multi-label: mAP, macro F1, exact match) / NLL
    / ECE with the reliability bins before (at the checkpoint's previous temperature, 1 unless it was calibrated
    already) and after.
    """
    from resnetkit.bundle import load_bundle
    from resnetkit.checkpoint import save_checkpoint
    from resnetkit.config import config_from_dict
    from resnetkit.evaluation.evaluate import resolve_device
    from resnetkit.evaluation.figures import plot_reliability
    from resnetkit.fileio import write_atomic

    started = time.time()
    path = Path(checkpoint)
    bundle = load_bundle(path)
    if bundle.kind != "checkpoint" or bundle.checkpoint is None:
        raise ValueError(
            f"{path} is an exported file: calibrate the training checkpoint it came from, then export that again "
            "(the export carries the temperature)"
        )
    if bundle.task != "classification":
        raise ValueError(f"{path} is a {bundle.task} model: temperature scaling calibrates classifiers")
    if "config" not in bundle.checkpoint:
        raise ValueError(f"{path} lacks its training config ('config'): it was not written by resnetkit train")
    cfg = config_from_dict(bundle.checkpoint["config"], f"{path}: config")
    if data is not None:
        cfg.data.name = str(data)
    split = split or cfg.data.val_split
    if not split:
        raise ValueError(f"{path} was trained without a validation split (data.val_split ''): pass a held-out split")
    if data is None and split == cfg.data.train_split:
        raise ValueError(
            f"split {split!r} is the split {path} was trained on: fit the temperature on held-out images "
            "(its validation split, or another dataset)"
        )
    if batch_size is not None:
        cfg.data.eval_batch_size = batch_size
    if workers is not None:
        cfg.data.workers = workers
    logits, targets = split_logits(bundle, cfg, split, resolve_device(device))
    multilabel = bool(bundle.multilabel)
    temperature = fit_temperature(logits, targets, multilabel)
    state = {**bundle.checkpoint, "temperature": temperature}
    if multilabel:  # the same decisions at the new temperature
        for key in ("thresholds", "thresholds_ema"):
            if state.get(key) is not None:
                state[key] = rescale_thresholds(state[key], bundle.temperature, temperature)
    old_thresholds, new_thresholds = bundle.thresholds, state.get("thresholds")
    before = calibration_metrics(logits, targets, bundle.temperature, multilabel, old_thresholds)
    after = calibration_metrics(logits, targets, temperature, multilabel, new_thresholds)

    out_path = Path(out) if out is not None else path
    folder = out_path.parent / FOLDER
    at_edge = not MIN_TEMPERATURE * 1.001 < temperature < MAX_TEMPERATURE / 1.001
    summary = {
        "temperature": temperature,
        "data": cfg.data.name,
        "split": split,
        "num_samples": len(targets),
        "multilabel": multilabel,
        "nll_before": before["nll"],
        "nll_after": after["nll"],
        "ece_before": before["ece"],
        "ece_after": after["ece"],
    }
    save_checkpoint(out_path, {**state, "calibration": summary})
    axes = {"xlabel": "predicted probability of a label (every image x class)", "ylabel": "fraction present"}
    axes = axes if multilabel else {}
    figures = {
        "before": str(
            plot_reliability(
                before["calibration"],
                before["ece"],
                folder / "reliability_before.png",
                title=f"before (T = {bundle.temperature:.3g})",
                **axes,
            )
        ),
        "after": str(
            plot_reliability(
                after["calibration"],
                after["ece"],
                folder / "reliability_after.png",
                title=f"after temperature scaling (T = {temperature:.3g})",
                **axes,
            )
        ),
    }
    result = {
        "source": str(path),
        "checkpoint": str(out_path),
        "in_place": out_path.resolve() == path.resolve(),
        "model": bundle.name,
        "classes": list(bundle.classes),
        **summary,
        "at_search_edge": at_edge,
        "before": before,
        "after": after,
        "figures": figures,
        "seconds": round(time.time() - started, 3),
    }
    write_atomic(folder / "calibration.json", json.dumps(result, indent=2) + "\n")
    return result


__all__ = ["calibrate", "calibration_metrics", "fit_temperature", "nll", "rescale_thresholds", "split_logits"]
