"""The multi-label metrics against scikit-learn (average_precision_score, f1_score, precision/recall, hamming_loss,
accuracy_score of the label sets), with tied scores and classes never predicted; the F1-optimal thresholds against
a brute-force search; balanced accuracy of single-label classification against balanced_accuracy_score."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    hamming_loss,
    log_loss,
    precision_score,
    recall_score,
)

from resnetkit.evaluation.metrics import (
    ClassificationMetrics,
    MultilabelMetrics,
    average_precision,
    f1_thresholds,
    multilabel_metrics,
)

C = 6


def _scores(seed: int, n: int = 400, ties: bool = True):
    """Scores that carry information (positives score higher on average), rounded to two decimals so that many
    samples tie; class 5 is rare and scored low, so at 0.5 it is never predicted."""
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, C, generator=g) < torch.tensor([0.5, 0.3, 0.2, 0.4, 0.1, 0.05])).to(torch.uint8)
    logits = torch.randn(n, C, generator=g, dtype=torch.float64) + 1.5 * targets - 0.6
    logits[:, 5] -= 4
    scores = logits.sigmoid()
    if ties:
        scores = (scores * 100).round() / 100
    return scores, targets


def _check_against_sklearn(result: dict, scores: torch.Tensor, targets: torch.Tensor, thresholds) -> None:
    y, s = targets.numpy(), scores.numpy()
    pred = (s >= np.array(thresholds)).astype(int)
    assert result["map"] == pytest.approx(average_precision_score(y, s, average="macro"), abs=1e-12)
    per_class_ap = average_precision_score(y, s, average=None)
    for row, ap, f1, p, r in zip(
        result["per_class"],
        per_class_ap,
        f1_score(y, pred, average=None, zero_division=0),
        precision_score(y, pred, average=None, zero_division=0),
        recall_score(y, pred, average=None, zero_division=0),
    ):
        assert row["ap"] == pytest.approx(ap, abs=1e-12)
        assert (row["f1"], row["precision"], row["recall"]) == pytest.approx((f1, p, r), abs=1e-12)
    assert result["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0), abs=1e-12)
    assert result["hamming_loss"] == pytest.approx(hamming_loss(y, pred), abs=1e-12)
    assert result["exact_match"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)  # subset accuracy
    assert [r["support"] for r in result["per_class"]] == y.sum(0).tolist()


@pytest.mark.parametrize("ties", [True, False])
def test_multilabel_metrics_match_scikit_learn(ties):
    scores, targets = _scores(0, ties=ties)
    assert (scores[:, 5] < 0.5).all() and targets[:, 5].sum() > 0  # a class never predicted at 0.5, yet present
    if ties:
        assert len(torch.unique(scores[:, 0])) < len(scores) // 2
    logits = scores.clamp(1e-6, 1 - 1e-6).logit()
    metrics = MultilabelMetrics(C)
    for start in range(0, len(scores), 64):  # batched as evaluation feeds it
        metrics.update(logits[start : start + 64], targets[start : start + 64])
    result = metrics.compute(classes=[f"c{i}" for i in range(C)])
    _check_against_sklearn(result, scores, targets, [0.5] * C)
    y = targets.numpy().ravel()
    expected_loss = log_loss(y, scores.clamp(1e-6, 1 - 1e-6).numpy().ravel(), labels=[0, 1])
    assert result["loss"] == pytest.approx(C * expected_loss, rel=1e-9)  # BCE summed over labels, mean over images
    # At per-class thresholds, too.
    thresholds = [0.3, 0.55, 0.5, 0.42, 0.25, 0.1]
    _check_against_sklearn(multilabel_metrics(scores, targets, thresholds=thresholds), scores, targets, thresholds)


def test_a_class_without_positives_is_left_out_of_the_map():
    """scikit-learn scores such a class 0 (and warns); its AP is undefined here, and mAP is over the others."""
    scores, targets = _scores(1)
    targets[:, 2] = 0
    result = multilabel_metrics(scores, targets)
    assert result["per_class"][2]["ap"] is None and result["classes_with_positives"] == C - 1
    keep = [c for c in range(C) if c != 2]
    expected = average_precision_score(targets[:, keep].numpy(), scores[:, keep].numpy(), average="macro")
    assert result["map"] == pytest.approx(expected, abs=1e-12)
    assert average_precision(scores[:, 2], targets[:, 2]) is None


def test_f1_thresholds_reach_the_best_f1_a_search_finds():
    scores, targets = _scores(2)
    thresholds = f1_thresholds(scores, targets)
    y, s = targets.numpy(), scores.numpy()
    for c, t in enumerate(thresholds):
        candidates = np.unique(s[:, c])
        best = max(f1_score(y[:, c], (s[:, c] >= v).astype(int), zero_division=0) for v in candidates)
        assert f1_score(y[:, c], (s[:, c] >= t).astype(int), zero_division=0) == pytest.approx(best, abs=1e-12)
        assert t not in candidates  # halfway between two scores, not on one
    targets[:, 3] = 0
    assert f1_thresholds(scores, targets)[3] == 0.5  # no positives: the default


def test_bad_multilabel_input_is_named():
    metrics = MultilabelMetrics(3)
    with pytest.raises(ValueError, match=r"must both be \(N, 3\)"):
        metrics.update(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="must be 0 or 1"):
        metrics.update(torch.zeros(2, 3), torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="no samples"):
        metrics.compute()


def test_balanced_accuracy_matches_scikit_learn():
    g = torch.Generator().manual_seed(3)
    targets = torch.randint(0, 5, (300,), generator=g)
    targets[targets == 4] = 0  # class 4 absent: balanced accuracy averages the recall of classes present
    logits = torch.randn(300, 5, generator=g, dtype=torch.float64)
    logits[torch.arange(300), targets] += 1.0
    metrics = ClassificationMetrics(5)
    metrics.update(logits, targets)
    result = metrics.compute()
    expected = balanced_accuracy_score(targets.numpy(), logits.argmax(1).numpy())
    assert result["balanced_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert [r["recall"] for r in result["per_class"]][:4] == pytest.approx(
        recall_score(targets.numpy(), logits.argmax(1).numpy(), labels=[0, 1, 2, 3], average=None), abs=1e-12
    )
