"""The `loss:` section: every loss against an independent reference (PyTorch's and torchvision's own, or the
formula written out), class weights from the training set's frequencies, clear errors for combinations that do
not fit the task, and a focal, class-weighted run of the real engine on an imbalanced image folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_train import COLOURS, make_folder, tiny_config
from torchvision.ops import sigmoid_focal_loss

from resnetkit.checkpoint import load_checkpoint
from resnetkit.cli import main
from resnetkit.config import ConfigError, LossConfig, config_from_dict
from resnetkit.data import mixup_cutmix
from resnetkit.train.fit import train
from resnetkit.train.losses import (
    asymmetric_loss,
    auto_class_weights,
    build_loss,
    class_counts,
    focal_loss,
    resolve_class_weights,
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(seed: int = 0, n: int = 64, c: int = 6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    multi_hot = (torch.rand(n, c, generator=g) < 0.3).double()
    labels = torch.randint(0, c, (n,), generator=g)
    return logits, multi_hot, labels


def test_multilabel_losses_match_references():
    logits, y, _ = _batch()
    n = len(y)
    # BCE: PyTorch's, summed over classes and averaged over samples.
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / n
    assert asymmetric_loss(logits, y, 0, 0, 0).item() == pytest.approx(bce.item(), rel=1e-5)
    assert build_loss(LossConfig(name="bce"), multilabel=True)(logits, y).item() == pytest.approx(bce.item(), rel=1e-5)
    # Focal: torchvision's sigmoid focal loss without the alpha balance.
    reference = sigmoid_focal_loss(logits, y, alpha=-1, gamma=2.0, reduction="sum") / n
    focal = build_loss(LossConfig(name="focal", focal_gamma=2.0), multilabel=True)(logits, y)
    assert focal.item() == pytest.approx(reference.item(), rel=1e-5)
    # ASL, written out as in the paper (and its official code): shifted negatives, asymmetric focusing.
    p = logits.float().sigmoid()
    p_m = (p - 0.05).clamp_min(0)
    terms = y * (1 - p).pow(1.0) * p.log() + (1 - y) * p_m.pow(4.0) * (1 - p_m).log()
    asl = build_loss(LossConfig(name="asymmetric", asl_gamma_pos=1.0, asl_gamma_neg=4.0, asl_clip=0.05), True)
    assert asl(logits, y).item() == pytest.approx((-terms.sum() / n).item(), rel=1e-5)
    # An easy negative (p below the clip) contributes nothing at all, not even a gradient.
    x = torch.tensor([[-6.0]], requires_grad=True)
    asymmetric_loss(x, torch.zeros(1, 1), 0, 4, 0.05).backward()
    assert x.grad.abs().item() == 0


def test_single_label_focal_and_weighted_cross_entropy():
    logits, _, labels = _batch(1)
    ce = F.cross_entropy(logits.float(), labels)
    assert focal_loss(logits, labels, gamma=0).item() == pytest.approx(ce.item(), rel=1e-6)
    log_p = F.log_softmax(logits.float(), 1)[torch.arange(len(labels)), labels]
    expected = -((1 - log_p.exp()) ** 2 * log_p).mean()
    assert focal_loss(logits, labels, gamma=2).item() == pytest.approx(expected.item(), rel=1e-5)
    # Soft targets (mixup) reduce to the same formula, summed over classes.
    images = torch.zeros(len(labels), 3, 4, 4)
    _, soft = mixup_cutmix(images, labels, logits.shape[1], 0.0, 0.0)
    assert focal_loss(logits, soft, gamma=2).item() == pytest.approx(expected.item(), rel=1e-5)
    # Class weights: each sample's loss times its class's weight, averaged over the batch.
    weight = torch.arange(1.0, 7.0)
    weighted = build_loss(LossConfig(name="ce"), False, weight=weight)(logits, labels)
    per_sample = F.cross_entropy(logits.float(), labels, reduction="none")
    assert weighted.item() == pytest.approx((per_sample * weight[labels]).mean().item(), rel=1e-6)
    focal_w = build_loss(LossConfig(name="focal", focal_gamma=0.0), False, weight=weight)(logits, labels)
    assert focal_w.item() == pytest.approx(weighted.item(), rel=1e-5)
    smoothed = build_loss(LossConfig(name="ce"), False, label_smoothing=0.1)(logits, labels)
    assert smoothed.item() == pytest.approx(F.cross_entropy(logits.float(), labels, label_smoothing=0.1).item())


def test_auto_class_weights_are_inverse_frequency_with_mean_one():
    counts = class_counts(torch.tensor([0] * 90 + [1] * 10 + [3] * 50), 4)
    assert counts.tolist() == [90, 10, 0, 50]
    weights = auto_class_weights(counts)
    present = weights[[0, 1, 3]]
    assert present.mean().item() == pytest.approx(1.0)
    assert weights[2] == 0  # a class without training samples
    assert (weights[1] / weights[0]).item() == pytest.approx(9.0)
    assert (weights[0] / weights[3]).item() == pytest.approx(50 / 90)
    # Multi-label: positives per class.
    assert class_counts(torch.tensor([[1.0, 0, 1], [1, 1, 0]]), 3).tolist() == [2, 1, 1]
    assert resolve_class_weights(LossConfig(class_weights=[1, 2, 3, 4]), counts).tolist() == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="3 weights given, but the training data has 4 classes"):
        resolve_class_weights(LossConfig(class_weights=[1, 2, 3]), counts)
    assert resolve_class_weights(LossConfig(), counts) is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"loss": {"name": "bce"}},
            "loss.name='bce' is a loss for task multilabel; task classification takes ce, focal",
        ),
        ({"task": "multilabel", "loss": {"name": "ce"}}, "task multilabel takes bce, focal, asymmetric"),
        ({"loss": {"name": "dice"}}, "loss.name: unknown value 'dice'"),
        ({"loss": {"class_weights": "inverse"}}, "expected null, 'auto' or a list of weights"),
        ({"loss": {"class_weights": [0, 0]}}, "must be >= 0 and not all 0"),
        ({"loss": {"focal_gamma": -1}}, "loss.focal_gamma: must be >= 0"),
        ({"loss": {"asl_clip": 1.5}}, r"loss.asl_clip: must be in \[0, 1\)"),
        ({"loss": {"name": "focal"}, "train": {"label_smoothing": 0.1}}, "smooths cross-entropy"),
        ({"task": "multilabel", "data": {"mixup_alpha": 0.2}}, "task multilabel takes neither"),
        ({"task": "detection", "data": {"multilabel": True}}, "data.multilabel applies to classification"),
        ({"loss": {"gamma": 2}}, "unknown key 'loss.gamma'"),
    ],
)
def test_loss_config_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_loss_defaults_follow_the_task():
    assert config_from_dict({}).loss.name == "ce"
    cfg = config_from_dict({"data": {"multilabel": True}})
    assert cfg.task == "multilabel" and cfg.loss.name == "bce" and cfg.data.multilabel
    assert config_from_dict({"task": "multilabel"}).data.multilabel
    assert config_from_dict({"loss": {"class_weights": "auto"}}).loss.class_weights == "auto"
    assert config_from_dict({"loss": {"class_weights": [1, 2.5]}}).loss.class_weights == [1.0, 2.5]


def _imbalanced_folder(root: Path) -> Path:
    """Three colour classes, class 2 rare in training (4 images against 20)."""
    make_folder(root, {"train": 20, "val": 4}, size=16)
    for extra in sorted((root / "train" / "class2").glob("*.png"))[4:]:
        extra.unlink()
    return root


def test_focal_loss_with_auto_class_weights_trains_through_the_engine(tmp_path):
    data = _imbalanced_folder(tmp_path / "data")
    cfg = tiny_config(data, tmp_path, loss={"name": "focal", "class_weights": "auto"}, train={"epochs": 1})
    result = train(cfg, quiet=True)
    ckpt = load_checkpoint(result.last_checkpoint)
    assert ckpt["class_counts"] == {"train": [20, 20, 4], "val": [4, 4, 4]}
    weights = torch.tensor(ckpt["class_weights"])
    assert weights.mean().item() == pytest.approx(1.0, rel=1e-6) and weights[2] / weights[0] == pytest.approx(5.0)
    assert ckpt["config"]["loss"]["name"] == "focal"
    assert torch.isfinite(torch.tensor(result.metrics["train_loss"])) and "val_acc" in result.metrics
    assert len(COLOURS) == len(ckpt["classes"]) == 3
    # The report puts each split's class counts beside the per-class metrics (and eval adds balanced accuracy).
    assert main(["report", str(result.run_dir)]) == 0
    evaluated = json.loads((result.run_dir / "eval" / "eval.json").read_text())
    recalls = [r["recall"] for r in evaluated["per_class"]]
    assert evaluated["balanced_accuracy"] == pytest.approx(sum(recalls) / 3)
    assert evaluated["class_distribution"] == {"train": [20, 20, 4], "val": [4, 4, 4], "test": [4, 4, 4]}
    html = (result.run_dir / "report.html").read_text()
    assert "<th>test (support)</th><th>train</th><th>val</th>" in html and "balanced accuracy" in html
    assert "<td>4</td><td>20</td><td>4</td></tr>" in html and "<td>4</td><td>4</td><td>4</td></tr>" in html


def test_class_weights_of_the_wrong_length_stop_before_training(tmp_path):
    data = _imbalanced_folder(tmp_path / "data")
    cfg = tiny_config(data, tmp_path, loss={"class_weights": [1.0, 2.0]})
    with pytest.raises(ConfigError, match="2 weights given, but the training data has 3 classes"):
        train(cfg, quiet=True)
