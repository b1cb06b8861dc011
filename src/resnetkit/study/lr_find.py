"""`lr-find`: the learning-rate range test (Smith 2017, "Cyclical learning rates for training neural networks",
sec. 3.3): train from the recipe's initial weights with a learning rate rising exponentially from `start` to `end`
over `steps` optimizer steps, stop once the loss diverges, and suggest the learning rate where it stopped falling.

    resnetkit lr-find --config configs/cifar10_resnet20.yaml        # writes runs/cifar10_resnet20-lr-find/

    from resnetkit.study.lr_find import lr_find
    found = lr_find("configs/cifar10_resnet20.yaml")
    found.suggestion

The sweep is a run of the one engine (`optim.lr` = start, an exponential per-step schedule, `train.max_steps`, no
validation, a step callback that records the loss and stops at divergence) in a temporary run folder that is
deleted after: the recipe's run folder, its weights file and its checkpoints are not touched. Outputs:
lr_find.png (loss against lr, log scale, the suggestion marked) and lr_find.json.

The suggestion is where the loss stops falling: the smallest lr at which the loss, smoothed by a centred moving
average one decade of lr wide, has made 90% of its fall to its minimum. Centred, because a running average
(fastai's, beta 0.98) lags the loss by ~50 steps, several decades of lr in a 100-step sweep, which is why its minimum
is divided by 10 by convention; that lag, and so the rule's error, depends on the sweep's range (on the problem
below it made fastai's rule 36x too high for Adam with the default sweep). Not the minimum itself: along a flat
valley the noise moves it by a decade or more. On the two-class CIFAR-10 problem of tests/test_study.py, whose best
constant lrs a 6-epoch grid puts at 1e-3 (Adam) and 1e-2 (SGD with momentum 0.9), the suggestion came within 2x of
both in every sweep tried (start 1e-7 or 1e-5, end 10 or 1, 50 to 120 steps, three initial weights).
Divergence (the sweep's end) is judged on a running average: the smoothed loss above `diverge` x its minimum.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from resnetkit.config import Config, load_config
from resnetkit.study.recipe import with_values


@dataclass
class LRFind:
    lrs: list[float] = field(default_factory=list)
    """The learning rate of each optimizer step (the head's; the backbone's is scaled by model.backbone_lr_scale)."""
    losses: list[float] = field(default_factory=list)
    """Each step's batch loss, before that step's update."""
    smoothed: list[float] = field(default_factory=list)
    """The losses under a centred moving average one decade of lr wide."""
    suggestion: float | None = None
    """Where the smoothed loss stops falling (see the module's docstring)."""
    diverged: bool = False
    """The sweep stopped at divergence (the loss's running average above `diverge` x its minimum, or not finite)."""
    figure: Path | None = None
    json: Path | None = None


class _RangeTest:
    """The engine's step callback: records (lr, loss); stops when a running average of the loss diverges."""

    def __init__(self, found: LRFind, start: float, beta: float, diverge: float) -> None:
        self.found, self.lr, self.beta, self.diverge = found, start, beta, diverge
        self.average, self.best = 0.0, math.inf

    def on_step(self, run, info) -> bool:
        loss, f = float(info["loss"]), self.found
        f.lrs.append(self.lr)  # the lr this step used; info["lr"] is the next step's, after the schedule's tick
        f.losses.append(loss)
        self.lr = info["lr"]
        self.average = self.beta * self.average + (1 - self.beta) * loss
        smoothed = self.average / (1 - self.beta ** len(f.losses))
        self.best = min(self.best, smoothed)
        if not math.isfinite(smoothed) or smoothed > self.diverge * self.best:
            f.diverged = True
            return True
        return False


def sweep_config(cfg: Config, start: float, end: float, steps: int, output_dir: str | Path) -> Config:
    """The recipe as a range test: lr from `start` rising by (end/start)**(1/steps) each step for `steps` steps,
    no validation, no optimiser switch or time budget, run folder `output_dir`/lr-find."""
    return with_values(
        cfg,
        {
            "name": "lr-find",
            "output_dir": str(output_dir),
            "optim": {"lr": start, "switch": None},
            "schedule": {"name": "exponential", "per": "step", "gamma": (end / start) ** (1 / steps), "warmup": 0},
            "data.val_split": "",
            "train": {
                "max_steps": steps,
                "epochs": steps,  # at least one batch per epoch: max_steps ends the run first
                "budget": None,
                "ema": False,
                "checkpoint_every": 0,
                "log_images": False,
            },
        },
        "lr-find",
    )


def smooth(losses: list[float], window: int) -> list[float]:
    """A centred moving average of `window` points (fewer at the ends); non-finite losses are left out."""
    half = window // 2
    out = []
    for i in range(len(losses)):
        near = [v for v in losses[max(i - half, 0) : i + half + 1] if math.isfinite(v)]
        out.append(sum(near) / len(near) if near else math.nan)
    return out


def suggest(lrs: list[float], smoothed: list[float], window: int, fall: float = 0.9) -> float | None:
    """The smallest lr at which the smoothed loss has made `fall` of its fall from its highest point to its minimum:
    where it stops falling. (The minimum itself wanders along a flat valley with the noise.) The last half-window,
    averaged over one side only, is left out."""
    points = [(lr, v) for lr, v in zip(lrs, smoothed) if math.isfinite(v)]
    points = points[: max(len(points) - window // 2, 1)]
    if not points:
        return None
    low = min(range(len(points)), key=lambda i: points[i][1])
    top = max(v for _, v in points[: low + 1])
    target = points[low][1] + (1 - fall) * (top - points[low][1])
    return next(lr for lr, v in points if v <= target)


def lr_find(
    config: Config | str | Path,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    start: float = 1e-7,
    end: float = 10.0,
    steps: int = 100,
    beta: float = 0.98,
    diverge: float = 4.0,
    out: str | Path | None = None,
    quiet: bool = True,
) -> LRFind:
    """Run the range test on `config` (a Config, or a YAML path with `overrides`); write lr_find.png and
    lr_find.json into `out` (default <output_dir>/<name>-lr-find) and return the curve and the suggestion.

    beta, diverge: the sweep stops once a running average of the loss (this weight of the past) exceeds `diverge`
    times its minimum.
    """
    from resnetkit.train.fit import train
    from resnetkit.train.loop import NonFiniteLoss

    if not 0 < start < end:
        raise ValueError(f"lr-find: need 0 < start < end, got start={start:g}, end={end:g}")
    if steps < 2:
        raise ValueError(f"lr-find: need at least 2 steps, got {steps}")
    cfg = config if isinstance(config, Config) else load_config(config, list(overrides))
    out_dir = Path(out) if out is not None else Path(cfg.output_dir) / f"{cfg.name}-lr-find"
    found = LRFind()
    with tempfile.TemporaryDirectory(prefix="resnetkit-lr-find-") as tmp:
        test = _RangeTest(found, start, beta, diverge)
        try:
            train(sweep_config(cfg, start, end, steps, tmp), quiet=quiet, callbacks=[test])
        except NonFiniteLoss:  # the loss overflowed before the smoothed one crossed the threshold: divergence
            found.diverged = True
    if not found.losses:
        raise ValueError("lr-find: no optimizer step was taken (is the training split empty?)")
    window = max(5, round(steps / math.log10(end / start))) | 1  # one decade of lr, an odd number of steps
    found.smoothed = smooth(found.losses, window)
    found.suggestion = suggest(found.lrs, found.smoothed, window)
    out_dir.mkdir(parents=True, exist_ok=True)
    found.figure = plot_lr_find(found, out_dir / "lr_find.png")
    found.json = out_dir / "lr_find.json"
    record = {k: v for k, v in asdict(found).items() if k not in ("figure", "json")}
    found.json.write_text(json.dumps({**record, "start": start, "end": end, "steps": steps}, indent=1) + "\n")
    return found


def plot_lr_find(found: LRFind, path: str | Path) -> Path:
    """Loss (raw and smoothed) against lr on a log axis, the minimum and the suggestion marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(found.lrs, found.losses, color="tab:blue", alpha=0.3, linewidth=1, label="batch loss")
    ax.plot(found.lrs, found.smoothed, color="tab:blue", linewidth=2, label="smoothed (one decade, centred)")
    if found.suggestion is not None:
        ax.axvline(found.suggestion, color="tab:red", ls="--", label=f"suggested lr {found.suggestion:.2g}")
    finite = [v for v in found.smoothed if math.isfinite(v)]
    if finite:  # the divergence would squash the interesting part: show up to a little above the start
        ax.set_ylim(min(finite) * 0.9, max(finite[0], min(finite)) * 1.3)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("learning-rate range test" + ("" if found.diverged else " (no divergence: raise --end)"))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    from resnetkit.evaluation.figures import save_figure

    return save_figure(fig, path)
