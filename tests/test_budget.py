"""`train.budget` / `resnetkit train --budget`: the engine plans the steps that fit a wall-time budget, lays the
schedule over exactly those steps, re-plans as it measures, and ends inside the budget; a resumed run counts the time
spent before. On a small real subset of CIFAR-10, and for every task.

The acceptance asks that a run end "within the budget plus a small stated margin": the margin here is 10% + 3 s. The
planner measures this machine's speed as it goes, so the check holds on a loaded machine too (it is not a speed
assertion: a slow machine plans fewer steps)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from test_engine_tasks import recipe

from resnetkit.checkpoint import load_checkpoint
from resnetkit.config import ConfigError, config_from_dict, parse_duration
from resnetkit.train.fit import train


def within(seconds: float, budget: float) -> bool:
    return seconds <= budget * 1.10 + 3.0


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cifar_subset(cifar10_jpg, tmp_path_factory):
    """1,000 real CIFAR-10 training JPEGs (100 per class) and 200 test ones, linked into an ImageFolder."""
    root = tmp_path_factory.mktemp("cifar1k")
    for split, n in (("train", 100), ("test", 20)):
        for class_dir in sorted((cifar10_jpg / split).iterdir()):
            (root / split / class_dir.name).mkdir(parents=True)
            for i in range(n):
                (root / split / class_dir.name / f"{i:04d}.jpg").symlink_to(class_dir / f"{i:04d}.jpg")
    return root


class LrTrace:
    def __init__(self) -> None:
        self.lrs: list[tuple[int, float]] = []

    def on_step(self, run, info) -> None:
        self.lrs.append((info["step"], info["lr"]))


def cifar_config(data, out, budget, **train) -> dict:
    return {
        "name": "budget",
        "output_dir": str(out),
        "model": {"name": "resnet20"},
        "data": {"name": str(data), "val_split": "test", "batch_size": 64, "cache_dir": str(out / "cache")},
        "optim": {"name": "sgd", "lr": 0.2, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        "schedule": {"name": "cosine", "per": "epoch", "warmup": 1},
        "train": {"epochs": 1000, "budget": budget, "log_every_s": 30, "log_images": False, **train},
    }


def test_budget_plans_fits_and_ends_the_schedule_at_the_last_step(cifar_subset, tmp_path):
    trace = LrTrace()
    cfg = config_from_dict(cifar_config(cifar_subset, tmp_path, "20s"))
    started = time.perf_counter()
    result = train(cfg, quiet=True, callbacks=[trace])
    elapsed = time.perf_counter() - started
    assert within(elapsed, 20), f"{elapsed:.1f} s for a 20 s budget"
    ckpt = load_checkpoint(result.last_checkpoint)
    planned = ckpt["budget"]["total"]
    assert ckpt["global_step"] == planned == trace.lrs[-1][0] > 16  # ended at the planned step: several epochs
    # Cosine to min_lr 0 at the last step. Near the end the plan is redone after every step; if the machine slows
    # down there, the schedule shrinks after the last steps' LRs were set, so the last LR is then that of the
    # schedule's last few steps (under 1% of the peak; a CI run saw 0.43%), not exactly 0. On a steady machine it is 0.
    assert trace.lrs[-1][1] <= 0.2 * 0.01
    assert max(lr for _, lr in trace.lrs) == pytest.approx(0.2, rel=0.05)
    log = (tmp_path / "budget" / "train.log").read_text()
    assert "budget 0m20.0s:" in log and "planned" in log
    assert result.metrics["val_acc"] > 0.12  # it learnt something (chance: 0.10)
    assert ckpt["budget"]["spent"] <= 20


def test_a_resumed_run_counts_the_time_already_spent(cifar_subset, tmp_path):
    class Interrupt:  # Ctrl-C, from inside, half-way through the planned steps (a slow machine plans fewer)
        fired = False

        def on_step(self, run, info) -> None:
            planned = run.budget.total
            if not self.fired and planned is not None and info["step"] >= max(planned // 2, 1):
                self.fired = True
                os.kill(os.getpid(), signal.SIGINT)

    cfg = cifar_config(cifar_subset, tmp_path, "20s", checkpoint_every=10)
    started = time.perf_counter()
    first = train(config_from_dict(cfg), quiet=True, callbacks=[Interrupt()])
    spent_first = time.perf_counter() - started
    assert first.interrupted
    saved = load_checkpoint(tmp_path / "budget" / "last.pt")["budget"]
    assert 0 < saved["spent"] <= spent_first and saved["total"] is not None
    started = time.perf_counter()
    second = train(config_from_dict(cfg), resume=True, quiet=True)
    spent_second = time.perf_counter() - started
    assert not second.interrupted
    final = load_checkpoint(second.last_checkpoint)
    assert final["budget"]["spent"] == pytest.approx(saved["spent"] + spent_second, abs=2.0)
    assert within(spent_first + spent_second, 20), f"{spent_first:.1f} + {spent_second:.1f} s for 20 s"
    assert final["global_step"] == final["budget"]["total"]


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_every_task_keeps_its_budget(task, tmp_path):
    cfg = recipe(task, tmp_path, train={"epochs": 1000, "budget": 12})
    started = time.perf_counter()
    result = train(config_from_dict(cfg), quiet=True)
    elapsed = time.perf_counter() - started
    assert within(elapsed, 12), f"{task}: {elapsed:.1f} s for a 12 s budget"
    ckpt = load_checkpoint(result.last_checkpoint)
    assert ckpt["global_step"] == ckpt["budget"]["total"] > 8 and ckpt["epoch"] >= 1


def test_budget_values_are_validated():
    assert [parse_duration(v) for v in ("90", 90, "30s", "10m", "1.5h")] == [90, 90, 30, 600, 5400]
    assert config_from_dict({"train": {"budget": "10m"}}).train.budget == 600
    for bad in ("ten", "-5", 0, "5d"):
        with pytest.raises(ConfigError, match="train.budget"):
            config_from_dict({"train": {"budget": bad}})
