"""Test-time augmentation: the views of a batch a prediction averages over, and the averaged prediction.

The one owner of TTA: training's evaluation (`train.eval_tta`), `resnetkit eval --tta` and calibration's logits
all come from `tta_logits`, so a run's val_acc and `eval` of its checkpoint with the same TTA agree.

    none            the batch as it is
    flip            the batch and its horizontal mirror, 1/2 each
    flip-translate  airbench's: the batch and its mirror (1/4 each), and the batch shifted one pixel down-right and
                    one up-left, borders reflected, each with its mirror (1/8 each): 6 forward passes
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from resnetkit.config import TTA_CHOICES


def tta_views(images: torch.Tensor, tta: str) -> list[tuple[float, torch.Tensor]]:
    """(weight, view) pairs of an (N, C, H, W) batch; the weights sum to 1."""
    if tta not in TTA_CHOICES:
        raise ValueError(f"tta must be one of {', '.join(TTA_CHOICES)}, got {tta!r}")
    if tta == "none":
        return [(1.0, images)]
    if tta == "flip":
        return [(0.5, images), (0.5, images.flip(3))]
    height, width = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    if images.is_contiguous(memory_format=torch.channels_last):
        padded = padded.contiguous(memory_format=torch.channels_last)
    shifted = (padded[..., :height, :width], padded[..., 2:, 2:])
    views = [(0.25, images), (0.25, images.flip(3))]
    return views + [(0.125, view) for s in shifted for view in (s, s.flip(3))]


def tta_logits(
    model: nn.Module, images: torch.Tensor, tta: str = "none", multilabel: bool = False, temperature: float = 1.0
) -> torch.Tensor:
    """float32 logits / temperature; with TTA, the logits of the views' weighted mean probability: the log of the
    mean softmax (single-label), or the log-odds of the mean sigmoids (multi-label)."""
    views = tta_views(images, tta)
    if len(views) == 1:
        return model(images).float() / temperature
    if multilabel:
        p = sum(w * (model(view).float() / temperature).sigmoid() for w, view in views)
        p = p.clamp(1e-12, 1 - 1e-12)
        return p.log() - (1 - p).log()
    log_probs = [F.log_softmax(model(view).float() / temperature, 1) + math.log(w) for w, view in views]
    return torch.logsumexp(torch.stack(log_probs), 0)
