"""Optimisers, learning-rate schedules with linear warmup, an EMA of the weights, and fine-tuning freezes.

Parameter groups: the backbone and the head apart (the backbone's lr is scaled by model.backbone_lr_scale), and
within each, the 1-d parameters (BN weights, biases) without weight decay unless optim.decay_bn_and_bias.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn as nn

from resnetkit.config import ModelConfig, MomentumWarmup, OptimConfig, OptimSwitch, ScheduleConfig


def param_groups(
    model: nn.Module, optim: OptimConfig, backbone_lr_scale: float = 1.0, head: set[int] | None = None
) -> list[dict[str, Any]]:
    """Trainable parameters in up to four groups: {backbone, head} x {decayed, not decayed}.

    head: ids of the head's parameters (default: the classifier's, `model.get_classifier()`); the task says which
    they are (a detector's RPN and box heads, a segmentation decoder). Each group carries `lr_scale`, which the
    schedule multiplies into its learning rate.
    """
    if head is None:
        head = {id(p) for p in model.get_classifier().parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 and not optim.decay_bn_and_bias
        groups.setdefault((id(p) in head, no_decay), []).append(p)
    out = []
    for (is_head, no_decay), params in sorted(groups.items()):
        scale = 1.0 if is_head else backbone_lr_scale
        out.append(
            {
                "params": params,
                "weight_decay": 0.0 if no_decay else optim.weight_decay,
                "lr": optim.lr * scale,
                "lr_scale": scale,
                "name": f"{'head' if is_head else 'backbone'}{'_no_decay' if no_decay else ''}",
            }
        )
    if not out:
        raise ValueError("no trainable parameters: check model.freeze")
    return out


def build_optimizer(
    model: nn.Module, optim: OptimConfig, model_cfg: ModelConfig, head: set[int] | None = None
) -> torch.optim.Optimizer:
    groups = param_groups(model, optim, model_cfg.backbone_lr_scale, head)
    name, lr = optim.name, optim.lr
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum, nesterov=optim.nesterov and optim.momentum > 0)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=tuple(optim.betas), eps=optim.eps)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim.betas), eps=optim.eps)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=optim.momentum, eps=optim.eps)
    if name == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr, eps=optim.eps)
    if name == "adadelta":
        return torch.optim.Adadelta(groups, lr=lr, eps=optim.eps)
    raise ValueError(f"optim.name: unknown optimizer {name!r}")


def switched(optim: OptimConfig, switch: OptimSwitch) -> OptimConfig:
    """The optimiser config from the switch on: the first one's, with the switch's fields that are set."""
    import dataclasses

    changes = {f.name: getattr(switch, f.name) for f in dataclasses.fields(switch) if f.name != "epoch"}
    changes = {k: v for k, v in changes.items() if v is not None}
    return dataclasses.replace(optim, **changes, switch=None)


def lr_factor(cfg: ScheduleConfig, t: float, total: float, min_lr_frac: float = 0.0) -> float:
    """The schedule's multiplier of the peak lr after `t` ticks of a `total`-tick run (ticks: epochs or steps).

    min_lr_frac: cosine's final lr as a fraction of the peak.
    """
    if cfg.name == "onecycle":  # rises from lr/div_factor to lr, then cosine to lr/div_factor/final_div_factor
        start, end = 1 / cfg.div_factor, 1 / (cfg.div_factor * cfg.final_div_factor)
        peak_t = cfg.pct_start * total
        if t < peak_t:
            return start + (1 - start) * (1 - math.cos(math.pi * t / peak_t)) / 2
        frac = min((t - peak_t) / max(total - peak_t, 1e-12), 1.0)
        return end + (1 - end) * (1 + math.cos(math.pi * frac)) / 2
    if cfg.warmup > 0 and t < cfg.warmup:
        return cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * t / cfg.warmup
    if cfg.name == "step":
        return cfg.gamma ** math.floor(t / cfg.step_size)
    if cfg.name == "multistep":
        return cfg.gamma ** sum(t >= m for m in cfg.milestones)
    if cfg.name == "exponential":
        return cfg.gamma ** (t - cfg.warmup)
    if cfg.name in ("cosine", "linear"):  # from the end of warmup to `total`, down to min_lr (a fraction of the peak)
        frac = min(max(t - cfg.warmup, 0) / max(total - cfg.warmup, 1e-12), 1.0)
        shape = (1 + math.cos(math.pi * frac)) / 2 if cfg.name == "cosine" else 1 - frac
        return min_lr_frac + (1 - min_lr_frac) * shape
    return 1.0  # constant, plateau (its reductions are applied on top)


class LRSchedule:
    """Sets every group's lr to peak lr x group lr_scale x schedule factor x plateau factor, and, with a momentum
    warm-up, its momentum (Adam's beta1) from the warm-up's start to the optimiser's own over its first steps.

    tick() once per unit of `per` (optimizer step or epoch); epoch_end(metric) feeds reduce-on-plateau.
    `set_total` re-lays the schedule over another length (a time budget's re-plan); `use(optimizer, peak_lr)` moves it
    to a new optimiser (optim.switch), keeping its shape.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        cfg: ScheduleConfig,
        peak_lr: float,
        total: float,
        maximize: bool = True,
        momentum_warmup: MomentumWarmup | None = None,
        steps_per_tick: int = 1,
    ) -> None:
        self.cfg = cfg
        self.min_lr_frac = cfg.min_lr / peak_lr
        self.total = max(total, 1)
        self.maximize = maximize
        self.momentum_warmup = momentum_warmup
        self.steps_per_tick = steps_per_tick  # optimizer steps per tick: the momentum warm-up counts steps
        self.t = 0
        self.plateau_scale = 1.0
        self.best: float | None = None
        self.bad_epochs = 0
        self.use(optimizer, peak_lr)

    def use(self, optimizer: torch.optim.Optimizer, peak_lr: float) -> None:
        self.optimizer, self.peak_lr = optimizer, peak_lr
        self.min_lr_frac = self.cfg.min_lr / peak_lr
        # The momentum each group warms up to: what the optimiser was built with.
        self.target_momentum = [_momentum(group) for group in optimizer.param_groups]
        self._apply()

    def set_total(self, total: float) -> None:
        self.total = max(total, 1)
        self._apply()

    def lr(self) -> float:
        return self.peak_lr * lr_factor(self.cfg, self.t, self.total, self.min_lr_frac) * self.plateau_scale

    def momentum_factor(self) -> float:
        """How far the momentum warm-up has come: 0 at its start value, 1 at the optimiser's own."""
        w = self.momentum_warmup
        return 1.0 if w is None else min(self.t * self.steps_per_tick / w.steps, 1.0)

    def _apply(self) -> None:
        lr = self.lr()
        frac = self.momentum_factor()
        for group, target in zip(self.optimizer.param_groups, self.target_momentum):
            group["lr"] = lr * group.get("lr_scale", 1.0)
            if self.momentum_warmup is not None and target:  # no momentum to warm up to: plain SGD, Adagrad
                _set_momentum(group, self.momentum_warmup.start + (target - self.momentum_warmup.start) * frac)

    def tick(self) -> None:
        self.t += 1
        self._apply()

    def epoch_end(self, metric: float | None) -> None:
        if self.cfg.name != "plateau" or metric is None:
            return
        better = self.best is None or (metric > self.best if self.maximize else metric < self.best)
        if better:
            self.best, self.bad_epochs = metric, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.cfg.patience:
                self.plateau_scale *= self.cfg.gamma
                self.bad_epochs = 0
                self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "total": self.total,
            "plateau_scale": self.plateau_scale,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t, self.plateau_scale = state["t"], state["plateau_scale"]
        self.total = state.get("total", self.total)
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]
        self._apply()


def _momentum(group: dict[str, Any]) -> float | None:
    if "momentum" in group:
        return group["momentum"]
    return group["betas"][0] if "betas" in group else None


def _set_momentum(group: dict[str, Any], value: float) -> None:
    if "momentum" in group:
        group["momentum"] = value
    else:
        group["betas"] = (value, group["betas"][1])


class ModelEMA:
    """An exponential moving average of a model's weights (buffers copied): decay ramps up as (1+n)/(10+n) early
    on, so the average does not remember the random initialisation for thousands of steps."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema_v, v in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema_v.dtype.is_floating_point:
                ema_v.lerp_(v.detach(), 1 - d)
            else:
                ema_v.copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any], updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = updates


def apply_freeze(model: nn.Module, mode: str) -> list[nn.Module]:
    """Turn off requires_grad for the frozen parameters; returns the BN layers whose statistics must stay frozen
    (keep them in eval mode while training: see `train_mode`).

    mode: "none", "head" (all but the classifier), "stages:N" (the stem and the first N stages).
    """
    if mode == "none":
        return []
    head = {id(p) for p in model.get_classifier().parameters()}
    if mode == "head":
        frozen = {id(p) for p in model.parameters() if id(p) not in head}
    else:
        n = int(mode.partition(":")[2])
        stages = model.feature_info  # stem first, then each stage
        if n >= len(stages):
            raise ValueError(f"model.freeze={mode!r}: this model has {len(stages) - 1} stages")
        frozen = set()
        if n + 1 < len(stages):  # everything registered before the first parameter of stage n+1
            boundary = {id(p) for p in model.get_submodule(stages[n + 1]["name"]).parameters()}
            for p in model.parameters():
                if id(p) in boundary:
                    break
                frozen.add(id(p))
        else:
            frozen = {id(p) for p in model.parameters() if id(p) not in head}
    for p in model.parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
    norm_types = (nn.modules.batchnorm._BatchNorm,)
    return [
        m
        for m in model.modules()
        if isinstance(m, norm_types) and all(id(p) in frozen for p in m.parameters(recurse=False))
    ]


def train_mode(model: nn.Module, frozen_norms: list[nn.Module]) -> None:
    """model.train(), except frozen BN layers, which keep using (and not updating) their running statistics."""
    model.train()
    for m in frozen_norms:
        m.eval()
