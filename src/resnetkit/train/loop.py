"""The training step and one epoch of it, for every task: pure steps that return running sums; fit.py wires them.

Every option is a value, not a branch: autocast and the GradScaler are disabled rather than skipped, DDP's
no_sync is a nullcontext when there is nothing to skip, and the EMA is optional only at its one call. What a batch
is and how its loss is computed belongs to the task (`resnetkit.tasks.Task.training_step`).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from resnetkit.config import Config
from resnetkit.train.distributed import all_reduce_sum, unwrap
from resnetkit.train.optim import LRSchedule, ModelEMA, train_mode

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and step."""


def resolve_amp(amp: str, device: torch.device) -> str:
    """train.amp on this device: `auto` becomes bf16 on a CUDA GPU that has it (fp16 on older ones) and on a CPU
    with bf16 arithmetic in hardware: AMX tiles (recent Xeons: the bf16 step ran 2.5x ours in fp32 in BENCHMARKS.md)
    or AVX512-BF16 instructions (e.g. AMD Zen 4: 1.6-1.9x); none elsewhere (AVX2 only: CPU bf16 is emulated and
    slower than fp32)."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()):
        return "bf16"
    return "none"


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_KEEP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Let this process reuse the memory it frees instead of handing it back to the OS (train.keep_freed_memory).

    glibc's malloc maps every block over its mmap threshold (128 KB, rising to at most 32 MB) fresh from the OS and
    unmaps it when freed, so each CPU training step page-faults in new memory for every large activation and
    gradient: about a fifth of a ResNet-50 step here (BENCHMARKS.md). Raising the mmap and trim thresholds to 1 GB
    keeps freed blocks in the heap for the next step, as a preloaded jemalloc or tcmalloc would. Process-wide, and
    inherited by forked loader workers; the process's memory then stays near its peak. Returns whether it applied:
    False off Linux or where the C library has no working mallopt (musl's does nothing)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))


def autocast(device: torch.device, amp: str):
    amp = resolve_amp(amp, device)
    return torch.autocast(device.type, dtype=_AMP_DTYPES.get(amp, torch.bfloat16), enabled=amp != "none")


@dataclass
class Parts:
    """Everything a training step touches."""

    model: nn.Module  # possibly wrapped in DDP / torch.compile
    task: Any  # resnetkit.tasks.Task: the batch's loss and running sums
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: LRSchedule
    ema: ModelEMA | None
    cfg: Config
    device: torch.device
    frozen_norms: list[nn.Module] = field(default_factory=list)
    global_step: int = 0  # optimizer steps taken


def train_step(p: Parts, batch: Any, sync: bool) -> dict[str, torch.Tensor]:
    """Forward and backward one batch; with `sync`, also clip, step, update the EMA and tick a per-step schedule.

    Returns the batch's running sums (tensors: no device sync here).
    """
    t = p.cfg.train
    # Under DDP, accumulation steps skip the gradient all-reduce; only the step that updates pays for it.
    no_sync = p.model.no_sync if not sync and hasattr(p.model, "no_sync") else contextlib.nullcontext
    with no_sync():
        with autocast(p.device, t.amp):
            loss, sums = p.task.training_step(p.model, batch)
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
        if p.schedule.cfg.per == "step":  # the schedule's own unit (a budget counts it in steps)
            p.schedule.tick()
    return sums


def train_one_epoch(
    p: Parts,
    loader: Iterable,
    epoch: int,
    *,
    start_step: int = 0,
    totals: dict[str, float] | None = None,
    after_step: Callable[[int, dict[str, float], bool, dict[str, float]], bool] | None = None,
    peek: Callable[[Any], None] | None = None,
) -> dict[str, float]:
    """Train over the rest of `loader`'s epoch, from batch `start_step`.

    totals: running sums carried over from a resumed checkpoint.
    after_step(batches_done, totals, synced, batch_sums) is called after every batch; returning True stops the epoch
    early.
    peek(inputs) sees the first batch's inputs as the model will (for a TensorBoard grid of augmented images).
    Raises NonFiniteLoss naming the step when the loss is NaN or infinite (on any rank).
    """
    totals = dict(totals or {})
    train_mode(p.model, p.frozen_norms)
    n_batches = len(loader)
    for step, batch in enumerate(loader, start=start_step):
        if peek is not None and step == start_step:
            peek(batch[0])
        sync = (step + 1) % p.cfg.train.accum_steps == 0 or step + 1 == n_batches
        sums = train_step(p, batch, sync)
        keys = list(sums)
        values = all_reduce_sum(torch.stack([sums[k].float().reshape(()) for k in keys])).tolist()
        batch_sums = dict(zip(keys, values))  # every rank sees the same sums: all stop together on a NaN
        if not math.isfinite(batch_sums["loss"]):
            raise NonFiniteLoss(
                f"loss is {batch_sums['loss'] / max(batch_sums['count'], 1)} at epoch {epoch + 1}, step {step + 1} "
                f"of {n_batches} (optimizer step {p.global_step})"
            )
        for key, value in batch_sums.items():
            totals[key] = totals.get(key, 0.0) + value
        if after_step is not None and after_step(step + 1, totals, sync, batch_sums):
            break
    return totals
