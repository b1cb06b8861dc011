"""Image classification as a task of the engine: `build_loader` data, a zoo model, the loss of `loss:`
(cross-entropy with label smoothing and mixup/cutmix, or focal; class weights), top-1 accuracy.

    resnetkit train --config configs/cifar10_fast.yaml

`tasks/multilabel.py` is this task with several labels per image: the same data, model and freezing code.
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
from resnetkit.train.losses import build_loss, class_counts, resolve_class_weights
from resnetkit.train.optim import apply_freeze


class ClassificationTask(Task):
    name = "classification"
    metric = "val_acc"
    multilabel = False

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
            sampler=d.sampler,
            **_loader_options(cfg, info),
        )
        train_loader.set_augmentation(d.train_augment)
        self.classes = list(train_loader.classes)
        self.preprocess = dict(train_loader.preprocess)
        # val_split "" trains without validation (as for detection and segmentation), e.g. an lr range test.
        val_loader = self.eval_loader(cfg, d.val_split, info) if d.val_split else None
        # Samples per class of each split, by the split's name (the report shows them beside per-class metrics).
        self.class_counts = {d.train_split: self._counts(train_loader, d.train_split, d.name)}
        if val_loader is not None:
            self.class_counts[d.val_split] = self._counts(val_loader, d.val_split, d.name)
        self.setup_objective(cfg, self.classes, self.class_counts[d.train_split])
        return train_loader, val_loader

    def setup_objective(self, cfg: Config, classes: list[str], train_counts: torch.Tensor) -> None:
        """The rest of what a training step needs: the config, the classes, the loss (with the class weights
        `loss.class_weights` asks for, from the training split's samples per class) and batch mixing.
        build_loaders calls it; a caller that feeds its own batches (benchmarks/train_throughput.py) calls it alone."""
        self.cfg, self.classes = cfg, list(classes)
        self.class_weights = resolve_class_weights(cfg.loss, train_counts)
        self.loss = build_loss(cfg.loss, self.multilabel, cfg.train.label_smoothing, self.class_weights)
        self.mix = None
        if cfg.data.mixup_alpha > 0 or cfg.data.cutmix_alpha > 0:
            from resnetkit.data import mixup_cutmix

            self.mix = mixup_cutmix

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

    def _counts(self, loader, split: str, data: str) -> torch.Tensor:
        """Samples per class of a loader's split (positives per class for multi-label data), checking that the
        data has one label per image (or several, for the multilabel task)."""
        targets = loader_targets(loader)
        if (targets.dim() == 2) != self.multilabel:
            if self.multilabel:
                raise ConfigError(
                    f"data.name {data!r} ({split}): one label per image; task multilabel needs several labels per "
                    "image (shapes-multi, cifar10-mosaic:PATH, or a CSV with several labels)"
                )
            raise ConfigError(f"data.name {data!r} ({split}) has several labels per image: set task: multilabel")
        return class_counts(targets, len(loader.classes))

    def build_model(self, cfg: Config, load_weights: bool):
        from resnetkit.models import create_model

        self.num_classes = cfg.model.num_classes or len(self.classes)
        if self.class_weights is not None and len(self.class_weights) != self.num_classes:
            raise ConfigError(
                f"loss.class_weights: {len(self.class_weights)} weights for a head of {self.num_classes} classes"
            )
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
        loss = self.loss(logits, targets)
        n = torch.tensor(float(labels.shape[0]), device=loss.device)
        return loss, {"loss": loss.detach() * n, "count": n, **self.batch_sums(logits.detach(), labels)}

    def batch_sums(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Running sums of a training batch beyond loss and count."""
        return {"correct": (logits.argmax(1) == labels).sum().float()}

    def train_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        count = max(totals["count"], 1)
        return {"train_loss": totals["loss"] / count, "train_acc": totals["correct"] / count}

    def evaluate(self, model: nn.Module, loader, cfg: Config, device: torch.device) -> dict[str, float]:
        t = cfg.train
        return evaluate_loss_acc(model, loader, device=device, amp=t.amp, channels_last=t.channels_last, tta=t.eval_tta)

    def checkpoint_extras(self) -> dict[str, Any]:
        """The class distribution of the training and validation data (the report shows it), and the class weights
        the loss used."""
        weights = self.class_weights
        return {
            "class_counts": {split: [int(c) for c in counts] for split, counts in self.class_counts.items()},
            "class_weights": weights.tolist() if weights is not None else None,
        }


def loader_targets(loader) -> torch.Tensor:
    """The targets of every sample a loader holds (all ranks' together): class indices (N,) or multi-hot rows (N, C).

    The tensor pipeline holds them as a tensor; a file loader's dataset lists them (`targets`, or `label_sets` for
    multi-label datasets)."""
    if isinstance(getattr(loader, "labels", None), torch.Tensor):
        return loader.labels.cpu()
    dataset = loader.dataset
    if getattr(dataset, "multilabel", False):
        return multi_hot(dataset.label_sets, len(dataset.classes))
    return torch.as_tensor(list(dataset.targets), dtype=torch.int64)


def multi_hot(label_sets, num_classes: int) -> torch.Tensor:
    """Per item, a float32 row with 1 at each of its class indices."""
    rows = torch.zeros(len(label_sets), num_classes)
    for i, labels in enumerate(label_sets):
        rows[i, list(labels)] = 1
    return rows


def _loader_options(cfg: Config, info: DistInfo) -> dict[str, Any]:
    """What the training and evaluation loaders of a recipe share."""
    from resnetkit.data.splits import dataset_options

    d = cfg.data
    return dict(
        device=info.device,
        seed=cfg.seed,
        workers=d.workers,
        rank=info.rank,
        world_size=info.world_size,
        fast=d.fast,
        cache_dir=d.cache_dir,
        pixel_cache=d.pixel_cache,
        image_size=d.image_size,
        **dataset_options(d, task=cfg.task),  # root, split lists, a listing's columns
    )


@torch.no_grad()
def evaluate_loss_acc(
    model: nn.Module,
    loader,
    *,
    device: torch.device,
    amp: str = "none",
    channels_last: bool = False,
    tta: str = "none",
) -> dict[str, float]:
    """Mean loss and top-1 accuracy over the loader, summed over DDP ranks (each rank holds a distinct shard).

    tta: test-time augmentation (none, flip, flip-translate: `resnetkit.evaluation.tta`).
    """
    from resnetkit.evaluation.tta import tta_logits

    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for images, labels in loader:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = tta_logits(model, images, tta)
        sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums[1] += (logits.argmax(1) == labels).sum()
        sums[2] += labels.numel()
    loss, correct, count = all_reduce_sum(sums).tolist()
    model.train(was_training)
    return {"loss": loss / max(count, 1), "acc": correct / max(count, 1), "count": int(count)}


TASK = ClassificationTask
