"""Tasks: what is particular to classification (single- and multi-label), detection and segmentation, as small
adapters of the one engine.

The engine (`resnetkit.train.fit`) owns the loop, the optimiser and schedule, devices, precision, EMA, checkpoints,
resume, DDP, logging and the run folder. A task supplies only what is its own (see `Task`): its data, its model, the
loss and running sums of one batch, its validation metrics, and what its checkpoints carry beyond the common keys.

    >>> from resnetkit.tasks import get_task
    >>> task = get_task("detection")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from resnetkit.config import Config
    from resnetkit.data.loader import Loader
    from resnetkit.train.distributed import DistInfo

_MODULES = {
    "classification": "resnetkit.tasks.classification",
    "multilabel": "resnetkit.tasks.multilabel",
    "detection": "resnetkit.tasks.detection",
    "segmentation": "resnetkit.tasks.segmentation",
}


class Task:
    """The interface the engine trains through. Subclasses set `name` and `metric` and implement every method."""

    name: str = ""
    metric: str = ""
    """The validation metric that chooses best.pt unless train.metric says otherwise."""

    def build_loaders(self, cfg: Config, info: DistInfo) -> tuple[Loader, Loader | None]:
        """The training loader (shuffled, sharded by rank, resumable) and the validation loader (each sample once
        across ranks), both yielding (inputs, targets) on `info.device`. Sets `self.classes` and
        `self.preprocess` (the checkpoint's dict of how images are prepared)."""
        raise NotImplementedError

    classes: list[str]
    preprocess: dict[str, Any]

    def build_model(self, cfg: Config, load_weights: bool) -> tuple[nn.Module, str, dict[str, Any]]:
        """(model, model_name, model_kwargs): the model and what `rebuild` needs to make it again."""
        raise NotImplementedError

    @staticmethod
    def rebuild(model_name: str, model_kwargs: dict[str, Any]) -> nn.Module:
        """The untrained model a checkpoint's model_name and model_kwargs describe (its weights are loaded after)."""
        raise NotImplementedError

    def head_parameters(self, model: nn.Module) -> set[int]:
        """ids of the parameters that learn at the full lr; the rest (the backbone) learns at lr x
        model.backbone_lr_scale."""
        raise NotImplementedError

    def freeze(self, model: nn.Module, mode: str) -> list[nn.Module]:
        """Apply model.freeze; returns the normalisation layers whose statistics must stay frozen."""
        raise NotImplementedError

    def training_step(self, model: nn.Module, batch: tuple[Any, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch's mean loss (to backpropagate) and its running sums: tensors summed over batches and ranks,
        with "loss" (the loss times the batch's samples) and "count" (its samples) among them."""
        raise NotImplementedError

    def train_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        """The epoch's training metrics (train_loss, train_acc, ...) from the summed running sums."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader: Loader, cfg: Config, device: torch.device) -> dict[str, float]:
        """Validation metrics without the val_ prefix, exact under DDP (every rank holds a distinct shard)."""
        raise NotImplementedError

    def checkpoint_extras(self) -> dict[str, Any]:
        """Entries a checkpoint of this task carries beyond the common keys."""
        return {}


def get_task(name: str) -> Task:
    """A fresh adapter for the task `name` (classification, multilabel, detection or segmentation)."""
    if name not in _MODULES:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[name]).TASK()


def task_of(checkpoint: dict[str, Any]) -> str:
    """The task a checkpoint was trained for (checkpoints older than the task key are classifiers)."""
    return checkpoint.get("task") or (checkpoint.get("config") or {}).get("task") or "classification"


__all__ = ["Task", "get_task", "task_of"]
