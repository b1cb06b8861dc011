"""A wall-time budget: how many optimizer steps fit, measured on this machine, re-planned as the run goes.

    resnetkit train --config configs/cifar10_cpu10m.yaml --budget 10m

The engine (`train/fit.py`) asks `Budget.plan` for the run's total number of steps after a short warm-up (the first
steps are timed; one evaluation is estimated from timing two validation batches), lays its schedule over exactly
that many steps, and asks again every REPLAN_EVERY steps (after every step near the end) and after each epoch's end,
when the measurements are better: the remaining steps are re-planned rather than overrun. `Budget.over` is the hard
edge: when one more step and the final evaluation would not fit, the run stops there, evaluates and saves. A resumed
run counts the time spent before.

What counts is the whole run's wall time: building the loaders and the model included, the final evaluation included.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

WARMUP_STEPS = 8  # steps timed before the first plan; the first two are left out (allocator, first batch)
REPLAN_EVERY = 25  # steps between re-plans
REPLAN_NEAR_END = 1  # ... and in the last 10 x REPLAN_EVERY: a slowing machine shrinks the schedule, not the edge


@dataclass
class Budget:
    """The time left, the measured cost of a step and of an epoch's end, and the plan that follows."""

    seconds: float
    spent_before: float = 0.0
    """Seconds a resumed run had already spent."""
    margin: float = field(init=False)
    """Kept free at the end: 1.5% of the budget plus 1 s, for what the estimates miss (the last checkpoint write)."""
    started: float = field(default_factory=time.perf_counter)
    step_times: list[float] = field(default_factory=list)
    last_step_end: float | None = None
    eval_seconds: float | None = None
    """One evaluation of the validation split, as measured (or estimated before the first one)."""
    epoch_end_seconds: float = 0.0
    """The rest of an epoch's end: checkpoint, logging, the next epoch's loader start."""
    total: int | None = None
    planned_at: int = 0

    def __post_init__(self) -> None:
        self.margin = 0.015 * self.seconds + 1.0

    # ---- measurements

    def elapsed(self) -> float:
        return self.spent_before + time.perf_counter() - self.started

    def step_done(self) -> None:
        now = time.perf_counter()
        if self.last_step_end is not None:
            self.step_times.append(now - self.last_step_end)
        self.last_step_end = now

    def pause(self) -> None:
        """Time that is not a step's (an epoch's end) is not counted as one: the next step starts the clock again."""
        self.last_step_end = None

    def step_seconds(self) -> float | None:
        """A step's cost: the median of the recent steps (robust to a slow batch), the first two left out."""
        recent = self.step_times[2:][-50:]
        return statistics.median(recent) if len(recent) >= 3 else None

    # ---- the plan

    def due(self, step: int) -> bool:
        """Is it time to (re-)plan after optimizer step `step`?"""
        if self.step_seconds() is None:  # a few steps must be timed first (after a resume too)
            return False
        if self.total is None:
            return step >= WARMUP_STEPS
        every = REPLAN_NEAR_END if self.total - step <= 10 * REPLAN_EVERY else REPLAN_EVERY
        return step - self.planned_at >= every

    def plan(self, step: int, step_in_epoch: int, steps_per_epoch: int, evals_per_epoch: float, cap: int) -> int:
        """The run's total optimizer steps from now: as many as fit in what is left of the budget, with the final
        evaluation and the coming epochs' ends (and their evaluations) paid for; at most `cap`, at least `step`."""
        tau = self.step_seconds()
        if tau is None:
            raise RuntimeError("Budget.plan needs a few timed steps first")
        final_eval = self.eval_seconds or 0.0
        left = self.seconds - self.elapsed() - self.margin - final_eval
        epoch_cost = self.epoch_end_seconds + evals_per_epoch * final_eval

        def cost(n: int) -> float:  # n more steps, and the epoch ends they cross
            return n * tau + math.floor((step_in_epoch + n) / steps_per_epoch) * epoch_cost

        lo, hi = 0, max(int(left / tau), 0)  # the most steps whose cost fits: cost grows with n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cost(mid) <= left else (lo, mid - 1)
        extra = lo
        self.total = max(min(step + extra, cap), step)
        self.planned_at = step
        return self.total

    def over(self) -> bool:
        """Would one more step and the final evaluation overrun the budget?"""
        tau = self.step_seconds() or 0.0
        return self.elapsed() + tau + (self.eval_seconds or 0.0) + self.margin > self.seconds

    def state_dict(self) -> dict:
        return {
            "seconds": self.seconds,
            "spent": self.elapsed(),
            "total": self.total,
            "eval_seconds": self.eval_seconds,
        }

    def describe(self, steps_per_epoch: int, batch_size: int) -> str:
        tau = self.step_seconds() or float("nan")
        return (
            f"budget {_clock(self.seconds)}: {tau:.3f} s per step ({batch_size / tau:.0f} images/s), evaluation "
            f"{self.eval_seconds or 0:.1f} s, {_clock(self.elapsed())} spent; planned {self.total} steps "
            f"({self.total / steps_per_epoch:.2f} epochs), {_clock(self.margin)} kept free"
        )


def _clock(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


__all__ = ["Budget"]
