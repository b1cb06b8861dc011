"""Multi-label classification as a task of the engine: several labels per image, one sigmoid per class.

    resnetkit train --config configs/cifar10_mosaic.yaml       # task: multilabel (or data.multilabel: true)

The classification task with multi-hot targets (the same data, model, freezing and head code): the loss of `loss:`
(BCE on the logits, or the focal or asymmetric loss; class weights), validation mAP (macro), F1, exact-match ratio
and Hamming loss, exact under DDP (every rank's scores gathered). After each validation the per-class decision
thresholds that maximise each class's F1 on the validation split are chosen and stored in the checkpoint
(`thresholds`; `thresholds_ema` for the EMA weights), where predict, serve, export and eval find them. The
validation F1, exact match and Hamming loss are reported at 0.5, not at thresholds fit to the same split.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from resnetkit.config import Config, ConfigError
from resnetkit.evaluation.metrics import MultilabelMetrics, f1_thresholds, multilabel_metrics
from resnetkit.tasks.classification import ClassificationTask
from resnetkit.train.distributed import unwrap
from resnetkit.train.loop import autocast


class MultilabelTask(ClassificationTask):
    name = "multilabel"
    metric = "val_map"
    multilabel = True

    def build_loaders(self, cfg: Config, info):
        self.thresholds: list[float] | None = None
        self.thresholds_ema: list[float] | None = None
        return super().build_loaders(cfg, info)

    def build_model(self, cfg: Config, load_weights: bool):
        if cfg.model.num_classes is not None and cfg.model.num_classes != len(self.classes):
            raise ConfigError(
                f"model.num_classes={cfg.model.num_classes}: a multi-label head has one output per class of the "
                f"data ({len(self.classes)}); leave it unset"
            )
        model, name, kwargs = super().build_model(cfg, load_weights)
        self.model = model  # the weights `thresholds` belong to (the EMA copy's go to thresholds_ema)
        return model, name, kwargs

    def batch_sums(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        predicted = logits > 0  # sigmoid >= 0.5
        agree = predicted == labels.bool()
        return {"labels_right": agree.sum().float(), "exact": agree.all(1).sum().float()}

    def train_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        count = max(totals["count"], 1)
        return {
            "train_loss": totals["loss"] / count,
            "train_exact_match": totals["exact"] / count,
            "train_hamming_loss": 1 - totals["labels_right"] / (count * len(self.classes)),
        }

    def evaluate(self, model: nn.Module, loader, cfg: Config, device: torch.device) -> dict[str, float]:
        t = cfg.train
        metrics = multilabel_scores_of(model, loader, len(self.classes), device, t.amp, t.channels_last, t.eval_tta)
        scores, targets, loss_sum = metrics.gathered()
        thresholds = f1_thresholds(scores, targets)
        if unwrap(model) is getattr(self, "model", None):
            self.thresholds = thresholds
        else:
            self.thresholds_ema = thresholds
        result = multilabel_metrics(scores, targets, loss_sum=loss_sum)
        keys = ("loss", "map", "f1_macro", "exact_match", "hamming_loss")
        return {**{k: result[k] for k in keys}, "count": result["num_samples"]}

    def checkpoint_extras(self) -> dict[str, Any]:
        return {**super().checkpoint_extras(), "thresholds": self.thresholds, "thresholds_ema": self.thresholds_ema}


@torch.no_grad()
def multilabel_scores_of(
    model: nn.Module,
    loader,
    num_classes: int,
    device: torch.device,
    amp: str = "none",
    channels_last: bool = False,
    tta: str = "none",
) -> MultilabelMetrics:
    """The loader's sigmoid scores and targets, accumulated (every rank its shard; `gathered()` joins them).

    tta: test-time augmentation, the views' sigmoids averaged (`resnetkit.evaluation.tta`)."""
    from resnetkit.evaluation.tta import tta_logits

    was_training = model.training
    model.eval()
    metrics = MultilabelMetrics(num_classes)
    for images, targets in loader:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = tta_logits(model, images, tta, multilabel=True)
        metrics.update(logits, targets)
    model.train(was_training)
    return metrics


TASK = MultilabelTask
