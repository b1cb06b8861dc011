"""Optimisers, schedules, EMA, and the atomic checkpoint write."""

from __future__ import annotations

import pytest
import torch

from resnetkit.checkpoint import load_checkpoint, save_checkpoint
from resnetkit.config import ModelConfig, OptimConfig, ScheduleConfig
from resnetkit.models import create_model
from resnetkit.train.optim import LRSchedule, ModelEMA, build_optimizer, lr_factor, param_groups


def test_no_weight_decay_on_bn_and_bias_and_backbone_lr_scale():
    model = create_model("resnet20", num_classes=4)
    groups = {g["name"]: g for g in param_groups(model, OptimConfig(lr=0.1, weight_decay=1e-4), 0.1)}
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    assert (
        all(p.ndim <= 1 for p in groups["backbone_no_decay"]["params"])
        and groups["backbone_no_decay"]["weight_decay"] == 0.0
    )
    assert groups["backbone"]["weight_decay"] == 1e-4 and groups["backbone"]["lr"] == pytest.approx(0.01)
    assert [p.shape for p in groups["head"]["params"]] == [model.fc.weight.shape] and groups["head"]["lr"] == 0.1
    everything = param_groups(model, OptimConfig(weight_decay=1e-4, decay_bn_and_bias=True), 1.0)
    assert all(g["weight_decay"] == 1e-4 for g in everything)
    assert sum(len(g["params"]) for g in everything) == len(list(model.parameters()))


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop", "adagrad", "adadelta"])
def test_every_optimizer_steps(name):
    model = create_model("resnet20", num_classes=2)
    opt = build_optimizer(model, OptimConfig(name=name, lr=0.01, nesterov=name == "sgd"), ModelConfig())
    before = model.fc.weight.clone()
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    assert not torch.equal(before, model.fc.weight)


def test_schedules():
    f = lambda t, total=100, **kw: lr_factor(ScheduleConfig(**kw), t, total)  # noqa: E731
    assert [f(t, name="step", step_size=30) for t in (0, 29, 30, 60)] == pytest.approx([1, 1, 0.1, 0.01])
    assert [f(t, name="multistep", milestones=[32, 48]) for t in (31, 32, 48)] == pytest.approx([1, 0.1, 0.01])
    assert f(3, name="exponential", gamma=0.5) == pytest.approx(0.125)
    assert f(0, name="cosine") == 1 and f(50, name="cosine") == pytest.approx(0.5) and f(100, name="cosine") == 0
    assert lr_factor(ScheduleConfig(name="cosine", min_lr=0.01), 100, 100, min_lr_frac=0.1) == pytest.approx(0.1)
    # Linear warmup from 0.1x, then the schedule.
    assert [f(t, name="cosine", warmup=10) for t in (0, 5, 10)] == pytest.approx([0.1, 0.55, 1.0])
    # One-cycle: lr/div_factor, up to the peak at pct_start, down to lr/div_factor/final_div_factor.
    oc = dict(name="onecycle", pct_start=0.3, div_factor=25, final_div_factor=1e4)
    assert f(0, **oc) == pytest.approx(1 / 25) and f(30, **oc) == pytest.approx(1.0)
    assert f(100, **oc) == pytest.approx(1 / 25 / 1e4) and f(15, **oc) < 1 and f(65, **oc) < 1


def test_plateau_and_state_roundtrip():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD([{"params": model.parameters(), "lr_scale": 0.5}], lr=1.0)
    sched = LRSchedule(opt, ScheduleConfig(name="plateau", patience=1, gamma=0.1), 0.2, 10, maximize=True)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)  # peak x lr_scale
    for metric in (0.5, 0.6, 0.6, 0.6):
        sched.epoch_end(metric)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    other = LRSchedule(opt, ScheduleConfig(name="plateau", patience=1), 0.2, 10)
    other.load_state_dict(sched.state_dict())
    assert other.lr() == pytest.approx(sched.lr())


def test_ema_tracks_weights():
    model = torch.nn.Linear(3, 1)
    ema = ModelEMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(200):
        ema.update(model)
    assert torch.allclose(ema.module.weight, torch.ones_like(model.weight), atol=1e-3)
    assert not ema.module.weight.requires_grad


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full")  # stands in for any failure in the middle of writing


def test_atomic_checkpoint_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "epoch": 1})
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, {"model": {"w": torch.zeros(1000)}, "epoch": 2, "bad": _Unpicklable()})
    assert load_checkpoint(path)["epoch"] == 1 and torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
