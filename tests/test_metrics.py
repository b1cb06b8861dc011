"""Every metric against scikit-learn on the same predictions, including classes that are never predicted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
    top_k_accuracy_score,
)

from resnetkit.evaluation.metrics import ClassificationMetrics

NUM_CLASSES = 7


def _predictions(seed: int, n: int = 500):
    """Logits whose argmax never falls on classes 5 and 6, targets that never hold class 4; so some classes have
    no predictions (precision 0/0) and one has no samples (recall 0/0)."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    targets[targets == 4] = 0
    logits = torch.randn(n, NUM_CLASSES, generator=generator, dtype=torch.float64) * 2
    logits[torch.arange(n), targets] += 1.5  # better than chance, far from perfect
    logits[:, 5:] -= 20  # never predicted, yet present in the targets
    return logits, targets


def _accumulate(logits, targets, batch_size=64, **kwargs) -> dict:
    metrics = ClassificationMetrics(NUM_CLASSES, **kwargs)
    for start in range(0, len(targets), batch_size):
        metrics.update(logits[start : start + batch_size], targets[start : start + batch_size])
    return metrics.compute(classes=[f"c{i}" for i in range(NUM_CLASSES)])


def test_metrics_match_scikit_learn():
    logits, targets = _predictions(0)
    result = _accumulate(logits, targets)
    y, probs = targets.numpy(), torch.softmax(logits, 1).numpy()
    pred = probs.argmax(1)
    labels = list(range(NUM_CLASSES))
    assert set(pred) <= {0, 1, 2, 3, 4} and 4 not in set(y)  # the edge cases really occur

    assert result["num_samples"] == len(y)
    assert result["top1"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert result["top5"] == pytest.approx(top_k_accuracy_score(y, probs, k=5, labels=labels), abs=1e-12)
    assert result["loss"] == pytest.approx(log_loss(y, probs, labels=labels), rel=1e-9)
    np.testing.assert_array_equal(np.array(result["confusion_matrix"]), confusion_matrix(y, pred, labels=labels))

    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    table = result["per_class"]
    assert [row["class"] for row in table] == [f"c{i}" for i in labels]
    np.testing.assert_allclose([row["precision"] for row in table], p, atol=1e-12)
    np.testing.assert_allclose([row["recall"] for row in table], r, atol=1e-12)
    np.testing.assert_allclose([row["f1"] for row in table], f, atol=1e-12)
    np.testing.assert_array_equal([row["support"] for row in table], s)
    for average in ("macro", "weighted"):
        kw = dict(labels=labels, average=average, zero_division=0)
        assert result[f"precision_{average}"] == pytest.approx(precision_score(y, pred, **kw), abs=1e-12)
        assert result[f"recall_{average}"] == pytest.approx(recall_score(y, pred, **kw), abs=1e-12)
        assert result[f"f1_{average}"] == pytest.approx(f1_score(y, pred, **kw), abs=1e-12)


def test_calibration_matches_scikit_learn_bins():
    logits, targets = _predictions(1, n=800)
    result = _accumulate(logits, targets, num_bins=10)
    probs = torch.softmax(logits, 1)
    confidence, pred = probs.max(1)
    correct = (pred == targets).numpy().astype(int)
    accuracy, mean_confidence = calibration_curve(correct, confidence.numpy(), n_bins=10, strategy="uniform")
    counts = np.histogram(confidence.numpy(), bins=np.linspace(0, 1, 11))[0]
    counts = counts[counts > 0]
    filled = [b for b in result["calibration"] if b["count"] > 0]
    np.testing.assert_array_equal([b["count"] for b in filled], counts)
    np.testing.assert_allclose([b["accuracy"] for b in filled], accuracy, atol=1e-12)
    np.testing.assert_allclose([b["confidence"] for b in filled], mean_confidence, atol=1e-12)
    expected_ece = float(np.sum(counts / len(correct) * np.abs(accuracy - mean_confidence)))
    assert result["ece"] == pytest.approx(expected_ece, abs=1e-12)
    assert 0.0 < result["ece"] < 1.0


def test_batching_does_not_change_results():
    logits, targets = _predictions(2)
    whole, batched = _accumulate(logits, targets, batch_size=500), _accumulate(logits, targets, batch_size=37)
    assert whole["confusion_matrix"] == batched["confusion_matrix"]
    for key in ("top1", "top5", "loss", "ece", "f1_macro", "precision_weighted"):
        assert whole[key] == pytest.approx(batched[key], abs=1e-12)


def test_worst_keeps_most_confident_mistakes():
    logits, targets = _predictions(3, n=100)
    images = torch.arange(100).view(100, 1).float()
    metrics = ClassificationMetrics(NUM_CLASSES, keep_worst=5)
    for start in range(0, 100, 16):
        metrics.update(logits[start : start + 16], targets[start : start + 16], images[start : start + 16])
    probs = torch.softmax(logits, 1)
    confidence, pred = probs.max(1)
    wrong = (pred != targets).nonzero().flatten()
    expected = wrong[confidence[wrong].argsort(descending=True)[:5]]
    worst = metrics.gathered_worst()
    assert [int(w[3]) for w in worst] == expected.tolist()
    assert [(w[1], w[2]) for w in worst] == [(int(targets[i]), int(pred[i])) for i in expected]


def test_bad_input_is_named():
    metrics = ClassificationMetrics(3)
    with pytest.raises(ValueError, match=r"logits must be \(N, 3\)"):
        metrics.update(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must lie in 0..2"):
        metrics.update(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="no samples"):
        metrics.compute()
