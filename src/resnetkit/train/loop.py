"""The training step, one epoch of it, and evaluation: pure steps that return metrics; fit.py wires them.

Every option is a value, not a branch: autocast and the GradScaler are disabled rather than skipped, DDP's
no_sync is a nullcontext when there is nothing to skip, and the EMA is optional only at its one call.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from resnetkit.config import Config
from resnetkit.train.distributed import all_reduce_sum, unwrap
from resnetkit.train.optim import LRSchedule, ModelEMA, train_mode

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and step."""


def autocast(device: torch.device, amp: str):
    return torch.autocast(device.type, dtype=_AMP_DTYPES.get(amp, torch.bfloat16), enabled=amp != "none")


@dataclass
class Parts:
    """Everything a training step touches."""

    model: nn.Module  # possibly wrapped in DDP / torch.compile
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: LRSchedule
    ema: ModelEMA | None
    cfg: Config
    num_classes: int
    device: torch.device
    frozen_norms: list[nn.Module] = field(default_factory=list)
    global_step: int = 0  # optimizer steps taken
    mix: Callable | None = None  # resnetkit.data.mixup_cutmix when mixup or cutmix is on


def train_step(p: Parts, images: torch.Tensor, labels: torch.Tensor, sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward one batch; with `sync`, also clip, step, update the EMA and tick a per-step schedule.

    Returns the batch's mean loss and number of correct predictions (both as tensors: no device sync here).
    """
    t = p.cfg.train
    if t.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = labels
    if p.mix is not None:
        images, targets = p.mix(images, labels, p.num_classes, p.cfg.data.mixup_alpha, p.cfg.data.cutmix_alpha)
    # Under DDP, accumulation steps skip the gradient all-reduce; only the step that updates pays for it.
    no_sync = p.model.no_sync if not sync and hasattr(p.model, "no_sync") else contextlib.nullcontext
    with no_sync():
        with autocast(p.device, t.amp):
            logits = p.model(images)
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=t.label_smoothing)
        p.scaler.scale(loss / t.accum_steps).backward()
    if sync:
        if t.grad_clip:
            p.scaler.unscale_(p.optimizer)
            nn.utils.clip_grad_norm_(p.model.parameters(), t.grad_clip)
        p.scaler.step(p.optimizer)
        p.scaler.update()
        p.optimizer.zero_grad(set_to_none=True)
        p.global_step += 1
        if p.ema is not None:
            p.ema.update(unwrap(p.model))
        if p.cfg.schedule.per == "step":
            p.schedule.tick()
    return loss.detach(), (logits.argmax(1) == labels).sum()


def train_one_epoch(
    p: Parts,
    loader: Iterable,
    epoch: int,
    *,
    start_step: int = 0,
    totals: dict[str, float] | None = None,
    after_step: Callable[[int, dict[str, float], bool], bool] | None = None,
    peek: Callable[[torch.Tensor], None] | None = None,
) -> dict[str, float]:
    """Train over the rest of `loader`'s epoch, from batch `start_step`.

    totals: running sums {loss, correct, count} carried over from a resumed checkpoint.
    after_step(batches_done, totals, synced) is called after every batch; returning True stops the epoch early.
    peek(images) sees the first batch as the model will (for a TensorBoard grid of augmented images).
    Raises NonFiniteLoss naming the step when the loss is NaN or infinite (on any rank).
    """
    totals = dict(totals or {"loss": 0.0, "correct": 0.0, "count": 0.0})
    train_mode(p.model, p.frozen_norms)
    n_batches = len(loader)
    for step, (images, labels) in enumerate(loader, start=start_step):
        if peek is not None and step == start_step:
            peek(images)
        sync = (step + 1) % p.cfg.train.accum_steps == 0 or step + 1 == n_batches
        loss, correct = train_step(p, images, labels, sync)
        stats = torch.stack(
            [loss.float() * labels.numel(), correct.float(), torch.tensor(float(labels.numel()), device=loss.device)]
        )
        loss_sum, n_correct, n = all_reduce_sum(stats).tolist()  # every rank stops together on a NaN
        if not math.isfinite(loss_sum):
            raise NonFiniteLoss(
                f"loss is {loss_sum / n} at epoch {epoch + 1}, step {step + 1} of {n_batches} "
                f"(optimizer step {p.global_step})"
            )
        totals["loss"] += loss_sum
        totals["correct"] += n_correct
        totals["count"] += n
        if after_step is not None and after_step(step + 1, totals, sync):
            break
    return totals


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
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
