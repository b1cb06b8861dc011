"""The classification losses, single- and multi-label, with class weights: what `loss:` in a config chooses.

    loss: {name: focal, focal_gamma: 2.0, class_weights: auto}        # task: classification
    loss: {name: asymmetric, asl_gamma_neg: 4, asl_clip: 0.05}        # task: multilabel

Single-label (logits (N, C), targets class indices (N,) or soft rows (N, C) from mixup/cutmix):
- ce: cross-entropy (with train.label_smoothing);
- focal: -sum_c t_c (1 - p_c)^gamma log p_c over the softmax p (Lin et al. 2017, "Focal Loss for Dense Object
  Detection"); gamma 0 is cross-entropy.
Multi-label (logits (N, C), multi-hot targets (N, C)), each class a sigmoid p:
- bce: -[y log p + (1 - y) log(1 - p)];
- focal: -[y (1 - p)^g log p + (1 - y) p^g log(1 - p)];
- asymmetric: ASL (Ridnik et al. 2021, "Asymmetric Loss For Multi-Label Classification"): positives focused by
  gamma_pos, negatives by gamma_neg on the shifted probability p_m = max(p - clip, 0), so that easy negatives
  (p < clip) count nothing. gamma_pos = gamma_neg = g with clip 0 is the focal loss, all 0 is BCE.

Reduction: a sample's loss is the sum over its classes' terms (each times its class weight), and a batch's is the
mean over its samples (multi-label: as in the ASL paper; the scale of cross-entropy, so learning rates carry over).
Class weights "auto" are the inverse class frequencies of the training set (multi-label: of each class's
positives), normalised to mean 1 over the classes present; a class absent from the training set gets weight 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from resnetkit.config import ConfigError, LossConfig

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
FOCUS_FLOOR = 1e-12


def class_counts(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Samples per class (float64, (C,)): of class indices (N,), or positives per class of multi-hot rows (N, C)."""
    targets = targets.detach().cpu()
    if targets.dim() == 2:
        return targets.double().sum(0)
    return torch.bincount(targets.long(), minlength=num_classes).double()


def auto_class_weights(counts: torch.Tensor) -> torch.Tensor:
    """Inverse frequency, normalised to mean 1 over the classes with samples; 0 for a class without any."""
    present = counts > 0
    if not present.any():
        raise ValueError("no class has any training sample: cannot weight classes by frequency")
    weights = torch.where(present, 1 / counts.clamp_min(1), torch.zeros_like(counts))
    return weights * present.sum() / weights.sum()


def resolve_class_weights(cfg: LossConfig, counts: torch.Tensor) -> torch.Tensor | None:
    """The weights `loss.class_weights` asks for, (C,) float32, from the training set's class `counts`."""
    if cfg.class_weights is None:
        return None
    if cfg.class_weights == "auto":
        return auto_class_weights(counts).float()
    if len(cfg.class_weights) != len(counts):
        raise ConfigError(
            f"loss.class_weights: {len(cfg.class_weights)} weights given, but the training data has {len(counts)} "
            "classes (one weight per class, in the order of the class names)"
        )
    return torch.tensor(cfg.class_weights, dtype=torch.float32)


def _weighted(terms: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """(N, C) per-class terms -> the batch loss: weighted sum over classes, mean over samples."""
    if weight is not None:
        terms = terms * weight.to(terms.device, terms.dtype)
    return terms.sum(1).mean()


def focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Single-label (softmax) focal loss; targets are class indices (N,) or soft rows (N, C)."""
    log_probs = F.log_softmax(logits.float(), 1)
    if targets.dim() == 1:
        targets = F.one_hot(targets.long(), logits.shape[1]).to(log_probs.dtype)
    if gamma > 0:
        log_probs = log_probs * (1 - log_probs.exp()).clamp_min(FOCUS_FLOOR).pow(gamma)
    return _weighted(-targets * log_probs, weight)


def asymmetric_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma_pos: float = 0.0,
    gamma_neg: float = 4.0,
    clip: float = 0.05,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-label asymmetric loss over multi-hot targets; (0, 0, 0) is BCE, (g, g, 0) the sigmoid focal loss."""
    logits, targets = logits.float(), targets.float()
    log_pos = F.logsigmoid(logits)  # log p, stable for large |logits|
    p = log_pos.exp()
    if clip > 0:
        shifted = (p - clip).clamp_min(0)  # p_m
        log_neg = (1 - shifted).log()  # 1 - p_m >= clip > 0
    else:
        shifted = p
        log_neg = F.logsigmoid(-logits)
    # The focusing weights (1 - p)^gamma_pos and p_m^gamma_neg; their base is kept off 0, where the gradient of
    # x^gamma (gamma < 1) is infinite: a confident sample's term is ~0 either way.
    if gamma_pos > 0:
        log_pos = log_pos * (1 - p).clamp_min(FOCUS_FLOOR).pow(gamma_pos)
    if gamma_neg > 0:
        log_neg = log_neg * shifted.clamp_min(FOCUS_FLOOR).pow(gamma_neg)
    terms = targets * log_pos + (1 - targets) * log_neg
    return _weighted(-terms, weight)


def build_loss(cfg: LossConfig, multilabel: bool, label_smoothing: float = 0.0, weight: torch.Tensor | None = None):
    """The loss function `loss:` names (cfg.name resolved by Config), as (logits, targets) -> scalar."""
    name = cfg.name or ("bce" if multilabel else "ce")
    if multilabel:
        gammas = {"bce": (0.0, 0.0, 0.0), "focal": (cfg.focal_gamma, cfg.focal_gamma, 0.0)}
        gamma_pos, gamma_neg, clip = gammas.get(name, (cfg.asl_gamma_pos, cfg.asl_gamma_neg, cfg.asl_clip))
        return lambda logits, targets: asymmetric_loss(logits, targets, gamma_pos, gamma_neg, clip, weight)
    if name == "focal":
        return lambda logits, targets: focal_loss(logits, targets, cfg.focal_gamma, weight)

    def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        w = weight.to(logits.device) if weight is not None else None
        if w is None:  # F.cross_entropy's own mean (as before class weights existed)
            return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
        # Weighted: the mean over samples of w[y] x their loss (not PyTorch's division by the weights' sum, under
        # which a batch of only one class would cancel its weight out).
        return F.cross_entropy(
            logits.float(), targets, weight=w, label_smoothing=label_smoothing, reduction="none"
        ).mean()

    return cross_entropy


__all__ = [
    "asymmetric_loss",
    "auto_class_weights",
    "build_loss",
    "class_counts",
    "focal_loss",
    "resolve_class_weights",
]
