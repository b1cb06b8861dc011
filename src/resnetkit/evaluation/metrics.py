"""Classification metrics from counts and sums, so that they are exact under DDP: each rank accumulates its shard,
`ClassificationMetrics.compute()` sums the counters across ranks (torch.distributed, when initialised) and derives
every number from the totals.

    >>> m = ClassificationMetrics(num_classes=10)
    >>> m.update(logits, labels)          # once per batch
    >>> result = m.compute()              # top1, top5, loss, precision/recall/F1, balanced accuracy, ECE, ...

Conventions follow scikit-learn: a class never predicted has precision 0, a class never present has recall 0,
F1 is 0 where precision + recall is 0, and the macro average is over all `num_classes` classes; balanced accuracy
is the mean recall over the classes present (`balanced_accuracy_score`).

Multi-label (`MultilabelMetrics`, sigmoid scores against multi-hot targets): a ranking metric needs every score, so
each rank keeps its shard's scores and `compute()` gathers them (exact, not binned): mAP (macro: the mean over the
classes with positives of scikit-learn's `average_precision_score`), per-class AP, precision, recall and F1 at
per-class thresholds, the exact-match ratio (`accuracy_score` of the label sets) and the Hamming loss.
`f1_thresholds` chooses each class's threshold to maximise its F1 on a split.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

# 15 equal-width confidence bins: the common choice since Guo et al. 2017, "On Calibration of Modern Neural Networks".
DEFAULT_BINS = 15


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def per_class_scores(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """Precision, recall, F1 and support per class from a confusion matrix (rows true, columns predicted)."""
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    predicted = confusion.sum(0)
    support = confusion.sum(1)
    precision = torch.where(predicted > 0, true_positive / predicted.clamp_min(1), torch.zeros_like(predicted))
    recall = torch.where(support > 0, true_positive / support.clamp_min(1), torch.zeros_like(support))
    denominator = precision + recall
    f1 = torch.where(denominator > 0, 2 * precision * recall / denominator.clamp_min(1e-300), torch.zeros_like(support))
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def calibration_bins(num_bins: int = DEFAULT_BINS) -> torch.Tensor:
    """Bin edges 0, 1/B, ..., 1; bin b holds confidences in (edge b, edge b+1] (the first also holds 0)."""
    return torch.linspace(0, 1, num_bins + 1, dtype=torch.float64)


def expected_calibration_error(count: torch.Tensor, confidence_sum: torch.Tensor, correct_sum: torch.Tensor) -> float:
    """ECE = sum over bins of (samples in bin / all samples) * |accuracy in bin - mean confidence in bin|."""
    total = count.sum()
    if total == 0:
        return 0.0
    return float((confidence_sum - correct_sum).abs().sum() / total)


def probability_calibration(
    probs: torch.Tensor, outcomes: torch.Tensor, num_bins: int = DEFAULT_BINS
) -> tuple[float, list[dict[str, Any]]]:
    """ECE and reliability bins of probabilities of binary events (e.g. every image x class of a multi-label model:
    the probability that the label is present, and whether it is): bin b holds probabilities in (edge b, edge b+1],
    its "accuracy" is the fraction of events that happened. The bins have the fields of ClassificationMetrics'."""
    probs, outcomes = probs.detach().double().flatten().cpu(), outcomes.detach().double().flatten().cpu()
    edges = calibration_bins(num_bins)
    bins = torch.searchsorted(edges[1:-1], probs, right=False)
    count = torch.bincount(bins, minlength=num_bins)
    confidence = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, probs)
    happened = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, outcomes)
    rows = [
        {
            "lower": float(lo),
            "upper": float(hi),
            "count": int(c),
            "confidence": float(s / c) if c else None,
            "accuracy": float(a / c) if c else None,
        }
        for lo, hi, c, s, a in zip(edges[:-1], edges[1:], count, confidence, happened)
    ]
    return expected_calibration_error(count, confidence, happened), rows


class ClassificationMetrics:
    """Accumulates, per batch of logits and integer targets: the confusion matrix, top-k hits, the summed
    cross-entropy and per-bin calibration sums; keeps the `keep_worst` most confidently wrong samples (for a grid).
    """

    def __init__(self, num_classes: int, num_bins: int = DEFAULT_BINS, top_k: int = 5, keep_worst: int = 0) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.top_k = min(top_k, num_classes)
        self.edges = calibration_bins(num_bins)
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.topk_correct = torch.zeros((), dtype=torch.int64)
        self.loss_sum = torch.zeros((), dtype=torch.float64)
        self.bin_count = torch.zeros(num_bins, dtype=torch.int64)
        self.bin_confidence = torch.zeros(num_bins, dtype=torch.float64)
        self.bin_correct = torch.zeros(num_bins, dtype=torch.float64)
        self.keep_worst = keep_worst
        # The most confidently misclassified samples: (confidence, true, predicted, image) on the CPU.
        self.worst: list[tuple[float, int, int, torch.Tensor | None]] = []

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor, images: torch.Tensor | None = None) -> None:
        """Add one batch. logits (N, C), or probabilities averaged over test-time augmentations passed as
        log-probabilities; targets (N,) class indices; images (N, ...) are kept only for the worst samples."""
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must be (N, {self.num_classes}), got shape {tuple(logits.shape)}")
        logits = logits.detach().double().cpu()
        targets = targets.detach().long().cpu()
        if targets.numel() and (targets.min() < 0 or targets.max() >= self.num_classes):
            raise ValueError(f"targets must lie in 0..{self.num_classes - 1}, got {targets.min()}..{targets.max()}")
        log_probs = F.log_softmax(logits, 1)
        probs = log_probs.exp()
        confidence, predicted = probs.max(1)
        correct = predicted == targets

        self.confusion += torch.bincount(targets * self.num_classes + predicted, minlength=self.num_classes**2).view(
            self.num_classes, self.num_classes
        )
        top = logits.topk(self.top_k, dim=1).indices
        self.topk_correct += (top == targets[:, None]).any(1).sum()
        self.loss_sum += F.nll_loss(log_probs, targets, reduction="sum")
        # searchsorted on the inner edges, left side: bin b holds (edge b, edge b+1], as scikit-learn bins.
        bins = torch.searchsorted(self.edges[1:-1], confidence, right=False)
        self.bin_count += torch.bincount(bins, minlength=len(self.bin_count))
        self.bin_confidence += torch.zeros_like(self.bin_confidence).index_add_(0, bins, confidence)
        self.bin_correct += torch.zeros_like(self.bin_correct).index_add_(0, bins, correct.double())

        if self.keep_worst:
            wrong = (~correct).nonzero().flatten()
            if len(self.worst) == self.keep_worst:  # only mistakes more confident than the weakest one kept
                wrong = wrong[confidence[wrong] > self.worst[-1][0]]
            wrong = wrong[confidence[wrong].argsort(descending=True)[: self.keep_worst]].tolist()
            for i in wrong:
                image = images[i].detach().cpu() if images is not None else None
                self.worst.append((float(confidence[i]), int(targets[i]), int(predicted[i]), image))
            self.worst = sorted(self.worst, key=lambda w: -w[0])[: self.keep_worst]

    def _reduced(self) -> tuple[torch.Tensor, ...]:
        counters = [
            self.confusion,
            self.topk_correct,
            self.loss_sum,
            self.bin_count,
            self.bin_confidence,
            self.bin_correct,
        ]
        if not _distributed():
            return tuple(counters)
        # Counts travel as int64 and sums as float64: the totals are the single-process totals, not an average.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        reduced = []
        for tensor in counters:
            t = tensor.clone().to(device) if device else tensor.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            reduced.append(t.cpu())
        return tuple(reduced)

    def gathered_worst(self) -> list[tuple[float, int, int, torch.Tensor | None]]:
        """The most confidently wrong samples over all ranks (every rank gets the same list)."""
        worst = self.worst
        if _distributed():
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, worst)
            worst = [w for part in parts for w in part]
        return sorted(worst, key=lambda w: -w[0])[: self.keep_worst]

    def compute(self, classes: list[str] | None = None) -> dict[str, Any]:
        """Every metric, as plain Python numbers and lists (the `metrics` part of eval.json); `classes` names the
        rows of the per-class table."""
        confusion, topk_correct, loss_sum, bin_count, bin_confidence, bin_correct = self._reduced()
        n = int(confusion.sum())
        if n == 0:
            raise ValueError("no samples were evaluated")
        scores = per_class_scores(confusion)
        support = scores["support"]
        weights = support / support.sum()
        result: dict[str, Any] = {
            "num_samples": n,
            "top1": float(confusion.diagonal().sum()) / n,
            "top5": int(topk_correct) / n,  # with fewer than 5 classes: top-C, which is 1
            "loss": float(loss_sum) / n,
        }
        for name in ("precision", "recall", "f1"):
            result[f"{name}_macro"] = float(scores[name].mean())
            result[f"{name}_weighted"] = float((scores[name] * weights).sum())
        result["balanced_accuracy"] = float(scores["recall"][support > 0].mean())
        result["per_class"] = [
            {
                "class": classes[i] if classes else str(i),
                "precision": float(p),
                "recall": float(r),
                "f1": float(f),
                "support": int(s),
            }
            for i, (p, r, f, s) in enumerate(zip(scores["precision"], scores["recall"], scores["f1"], support))
        ]
        result["confusion_matrix"] = confusion.tolist()
        result["ece"] = expected_calibration_error(bin_count, bin_confidence, bin_correct)
        nonzero = bin_count.clamp_min(1).double()
        result["calibration"] = [
            {
                "lower": float(lo),
                "upper": float(hi),
                "count": int(c),
                "confidence": float(s / k) if c else None,
                "accuracy": float(a / k) if c else None,
            }
            for lo, hi, c, s, a, k in zip(
                self.edges[:-1], self.edges[1:], bin_count, bin_confidence, bin_correct, nonzero
            )
        ]
        return result


# ---- multi-label


def _gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order (each rank holds a distinct shard)."""
    if not _distributed():
        return tensor
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, tensor.cpu())
    return torch.cat(parts)


def _ranked(scores: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores in decreasing order cut at each distinct value: (the distinct scores, true positives and false
    positives when predicting every sample scoring at least that), as scikit-learn's precision_recall_curve."""
    order = torch.argsort(scores, descending=True, stable=True)
    s, y = scores[order], positives[order].double()
    tp, fp = y.cumsum(0), (1 - y).cumsum(0)
    last = torch.ones_like(s, dtype=torch.bool)  # the last sample of each run of tied scores
    last[:-1] = s[1:] != s[:-1]
    return s[last], tp[last], fp[last]


def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> float | None:
    """scikit-learn's average_precision_score of one class: sum over thresholds of (R_k - R_k-1) x P_k; None when
    the class has no positive sample (AP undefined)."""
    n_pos = float(positives.sum())
    if n_pos == 0:
        return None
    _, tp, fp = _ranked(scores.double(), positives.bool())
    precision, recall = tp / (tp + fp), tp / n_pos
    return float(((recall - torch.cat([recall.new_zeros(1), recall[:-1]])) * precision).sum())


def precision_recall_curve(scores: torch.Tensor, positives: torch.Tensor) -> tuple[list[float], list[float]]:
    """(precision, recall) at every distinct threshold, from the highest; for the precision-recall plot."""
    _, tp, fp = _ranked(scores.double(), positives.bool())
    n_pos = max(float(positives.sum()), 1.0)
    return (tp / (tp + fp)).tolist(), (tp / n_pos).tolist()


def f1_thresholds(scores: torch.Tensor, targets: torch.Tensor, default: float = 0.5) -> list[float]:
    """Per class, the decision threshold (predict the class when its score >= it) with the highest F1 on these
    scores (N, C) and multi-hot targets (N, C): halfway between the best cut's lowest score and the next lower
    score, so nearby scores on new data fall on the same side. The highest threshold wins ties; a class without
    positives keeps `default`."""
    thresholds = []
    for c in range(scores.shape[1]):
        positives = targets[:, c].bool()
        n_pos = float(positives.sum())
        if n_pos == 0:
            thresholds.append(default)
            continue
        values, tp, fp = _ranked(scores[:, c].double(), positives)
        f1 = 2 * tp / (tp + fp + n_pos)  # 2TP / (2TP + FP + FN), FN = positives - TP
        best = int(f1.argmax())  # the first maximum: the highest threshold
        below = float(values[best + 1]) if best + 1 < len(values) else 0.0
        thresholds.append((float(values[best]) + below) / 2)
    return thresholds


def multilabel_scores(predicted: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-class precision, recall, F1 and support of boolean predictions (N, C) against multi-hot targets."""
    predicted, truth = predicted.bool(), targets.bool()
    tp = (predicted & truth).sum(0).double()
    fp = (predicted & ~truth).sum(0).double()
    fn = (~predicted & truth).sum(0).double()
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), torch.zeros_like(tp))
    f1 = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp_min(1), torch.zeros_like(tp))
    return {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}


class MultilabelMetrics:
    """Accumulates sigmoid scores and multi-hot targets per batch (and the summed binary cross-entropy);
    `compute()` gathers them across ranks and derives every multi-label metric."""

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.scores: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.loss_sum = torch.zeros((), dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch: logits (N, C) (log-odds), multi-hot targets (N, C) of 0 and 1."""
        if logits.dim() != 2 or logits.shape[1] != self.num_classes or targets.shape != logits.shape:
            raise ValueError(
                f"logits and targets must both be (N, {self.num_classes}), got {tuple(logits.shape)} and "
                f"{tuple(targets.shape)}"
            )
        logits, targets = logits.detach().double().cpu(), targets.detach().double().cpu()
        if targets.numel() and not ((targets == 0) | (targets == 1)).all():
            raise ValueError("multi-label targets must be 0 or 1")
        self.loss_sum += F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
        self.scores.append(logits.sigmoid())
        self.targets.append(targets.to(torch.uint8))

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(scores (N, C) float64, targets (N, C) uint8, summed BCE) over every rank."""
        empty = torch.zeros(0, self.num_classes)
        scores = _gather_rows(torch.cat(self.scores) if self.scores else empty.double())
        targets = _gather_rows(torch.cat(self.targets) if self.targets else empty.to(torch.uint8))
        loss = self.loss_sum.clone()
        if _distributed():
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, float(loss))
            loss = torch.tensor(sum(parts))
        return scores, targets, float(loss)

    def compute(self, classes: list[str] | None = None, thresholds: list[float] | None = None) -> dict[str, Any]:
        """Every metric as plain numbers and lists; `thresholds` (default 0.5 for every class) decide which labels
        are predicted."""
        scores, targets, loss_sum = self.gathered()
        return multilabel_metrics(scores, targets, classes, thresholds, loss_sum=loss_sum)


def multilabel_metrics(
    scores: torch.Tensor,
    targets: torch.Tensor,
    classes: list[str] | None = None,
    thresholds: list[float] | None = None,
    *,
    loss_sum: float | None = None,
) -> dict[str, Any]:
    """The multi-label metrics of scores (N, C) in [0, 1] against multi-hot targets (N, C)."""
    n, num_classes = scores.shape
    if n == 0:
        raise ValueError("no samples were evaluated")
    thresholds = list(thresholds) if thresholds is not None else [0.5] * num_classes
    if len(thresholds) != num_classes:
        raise ValueError(f"{len(thresholds)} thresholds for {num_classes} classes")
    predicted = scores >= torch.tensor(thresholds, dtype=scores.dtype)
    truth = targets.bool()
    per = multilabel_scores(predicted, truth)
    ap = [average_precision(scores[:, c], truth[:, c]) for c in range(num_classes)]
    present = [a for a in ap if a is not None]
    result: dict[str, Any] = {
        "num_samples": n,
        "map": sum(present) / len(present) if present else 0.0,
        "classes_with_positives": len(present),
        "f1_macro": float(per["f1"].mean()),
        "precision_macro": float(per["precision"].mean()),
        "recall_macro": float(per["recall"].mean()),
        "exact_match": float((predicted == truth).all(1).double().mean()),
        "hamming_loss": float((predicted != truth).double().mean()),
        "label_cardinality": float(truth.sum(1).double().mean()),
        "thresholds": thresholds,
    }
    if loss_sum is not None:
        # BCE summed over an image's labels, averaged over images: the reduction of the training loss
        # (train/losses.py), so that train_loss and val_loss of a BCE run are on one scale
        result["loss"] = loss_sum / n
    result["per_class"] = [
        {
            "class": classes[c] if classes else str(c),
            "ap": ap[c],
            "precision": float(per["precision"][c]),
            "recall": float(per["recall"][c]),
            "f1": float(per["f1"][c]),
            "threshold": thresholds[c],
            "support": int(per["support"][c]),
        }
        for c in range(num_classes)
    ]
    return result
