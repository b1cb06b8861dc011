"""Image classification as a task of the engine: `build_loader` data, a zoo model, cross-entropy (with label
smoothing and mixup/cutmix), top-1 accuracy.

    resnetkit train --config configs/cifar10_fast.yaml
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from resnetkit.config import Config, ConfigError
from resnetkit.tasks import Task
from resnetkit.train.distributed import DistInfo, all_reduce_sum
from resnetkit.train.loop import autocast
from resnetkit.train.optim import apply_freeze


class ClassificationTask(Task):
    name = "classification"
    metric = "val_acc"

    def build_loaders(self, cfg: Config, info: DistInfo):
        from resnetkit.data import build_loader

        self.cfg = cfg
        d = cfg.data
        train_loader = build_loader(
            d.name,
            d.train_split,
            batch_size=d.batch_size // info.world_size,
            train=True,
            preset=d.preset,
            augment=tuple(d.augment),
            subset=d.subset,
            **_loader_options(cfg, info),
        )
        train_loader.set_augmentation(d.train_augment)
        self.classes = list(train_loader.classes)
        self.preprocess = dict(train_loader.preprocess)
        # val_split "" trains without validation (as for detection and segmentation), e.g. an lr range test.
        val_loader = self.eval_loader(cfg, d.val_split, info) if d.val_split else None
        self.mix = None
        if d.mixup_alpha > 0 or d.cutmix_alpha > 0:
            from resnetkit.data import mixup_cutmix

            self.mix = mixup_cutmix
        return train_loader, val_loader

    def eval_loader(self, cfg: Config, split: str, info: DistInfo):
        """The loader of `split` as validation reads it (training's validation and `resnetkit calibrate`): images
        prepared exactly as the checkpoint says (`self.preprocess`, the training loader's), each sample once across
        ranks. Set `self.cfg`, `self.classes` and `self.preprocess` first (build_loaders does)."""
        from resnetkit.data import build_loader

        d = cfg.data
        batch = max((d.eval_batch_size or 2 * d.batch_size) // info.world_size, 1)
        return build_loader(
            d.name, split, batch_size=batch, train=False, preset=self.preprocess, **_loader_options(cfg, info)
        )

    def build_model(self, cfg: Config, load_weights: bool):
        from resnetkit.models import create_model

        self.num_classes = cfg.model.num_classes or len(self.classes)
        kwargs = {**cfg.model.options, "num_classes": self.num_classes}
        try:
            model = create_model(cfg.model.name, weights=cfg.model.weights if load_weights else None, **kwargs)
        except TypeError as e:  # unknown create_model option: name the config key
            raise ConfigError(f"model.options: {e}") from None
        return model, cfg.model.name, kwargs

    @staticmethod
    def rebuild(model_name: str, model_kwargs: dict[str, Any]) -> nn.Module:
        from resnetkit.models import create_model

        return create_model(model_name, **model_kwargs)

    def head_parameters(self, model: nn.Module) -> set[int]:
        return {id(p) for p in model.get_classifier().parameters()}

    def freeze(self, model: nn.Module, mode: str) -> list[nn.Module]:
        return apply_freeze(model, mode)

    def training_step(self, model: nn.Module, batch):
        t, d = self.cfg.train, self.cfg.data
        images, labels = batch
        if t.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = labels
        if self.mix is not None:
            images, targets = self.mix(images, labels, self.num_classes, d.mixup_alpha, d.cutmix_alpha)
        logits = model(images)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=t.label_smoothing)
        n = torch.tensor(float(labels.shape[0]), device=loss.device)
        correct = (logits.argmax(1) == labels).sum().float()
        return loss, {"loss": loss.detach() * n, "correct": correct, "count": n}

    def train_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        count = max(totals["count"], 1)
        return {"train_loss": totals["loss"] / count, "train_acc": totals["correct"] / count}

    def evaluate(self, model: nn.Module, loader, cfg: Config, device: torch.device) -> dict[str, float]:
        t = cfg.train
        return evaluate_loss_acc(
            model, loader, device=device, amp=t.amp, channels_last=t.channels_last, flip=t.eval_flip
        )


def _loader_options(cfg: Config, info: DistInfo) -> dict[str, Any]:
    """What the training and evaluation loaders of a recipe share."""
    d = cfg.data
    return dict(
        device=info.device,
        seed=cfg.seed,
        workers=d.workers,
        rank=info.rank,
        world_size=info.world_size,
        fast=d.fast,
        cache_dir=d.cache_dir,
        root=d.root,
        image_size=d.image_size,
    )


@torch.no_grad()
def evaluate_loss_acc(
    model: nn.Module,
    loader,
    *,
    device: torch.device,
    amp: str = "none",
    channels_last: bool = False,
    flip: bool = False,
) -> dict[str, float]:
    """Mean loss and top-1 accuracy over the loader, summed over DDP ranks (each rank holds a distinct shard).

    flip: average the logits of each image and its mirror (test-time augmentation).
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for images, labels in loader:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(images).float()
            if flip:
                logits = (logits + model(images.flip(3)).float()) / 2
        sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums[1] += (logits.argmax(1) == labels).sum()
        sums[2] += labels.numel()
    loss, correct, count = all_reduce_sum(sums).tolist()
    model.train(was_training)
    return {"loss": loss / max(count, 1), "acc": correct / max(count, 1), "count": int(count)}


TASK = ClassificationTask
