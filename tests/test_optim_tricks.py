"""The CUB-200 reproduction's optimiser tricks, one config key each: `optim.momentum_warmup` (a small momentum first,
raised to the optimiser's own over N steps) and `optim.switch` (e.g. Adam first, SGD for the final tuning), with the
optimiser state they promise at the steps they promise, and a run SIGKILLed before the switch resumed across it to
the uninterrupted run's weights, bit for bit."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch
import yaml
from test_train import make_folder, tiny_config
from test_train_real import _wait_for_checkpoint

from resnetkit.checkpoint import load_checkpoint
from resnetkit.config import config_from_dict
from resnetkit.train.fit import train

ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("tricks"), {"train": 8, "val": 3}, size=16)  # 3 steps per epoch


class Watch:
    """Each optimizer step's optimiser class, lr and momentum (beta1 for Adam), as the next step will use them."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, str, float, float]] = []

    def on_step(self, run, info) -> None:
        group = run.parts.optimizer.param_groups[-1]
        momentum = group["momentum"] if "momentum" in group else group["betas"][0]
        self.seen.append((info["step"], info["epoch"], type(run.parts.optimizer).__name__, group["lr"], momentum))


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_momentum_warmup_rises_linearly_over_its_steps(data, tmp_path, name):
    watch = Watch()
    optim = {"name": name, "lr": 0.01, "momentum": 0.9, "momentum_warmup": {"start": 0.5, "steps": 5}}
    train(
        config_from_dict(tiny_config(data, tmp_path, optim=optim, train={"epochs": 3})), quiet=True, callbacks=[watch]
    )
    expected = {step: 0.5 + 0.4 * min(step / 5, 1.0) for step in range(1, 10)}  # SGD momentum 0.9, Adam beta1 0.9
    assert {step: pytest.approx(m) for step, _, _, _, m in watch.seen} == expected


def test_switch_changes_the_optimiser_at_its_epoch_and_keeps_the_schedule_shape(data, tmp_path):
    watch = Watch()
    optim = {"name": "adam", "lr": 0.003, "switch": {"epoch": 2, "name": "sgd", "lr": 0.03, "momentum": 0.8}}
    schedule = {"name": "cosine", "per": "step", "warmup": 0}
    cfg = tiny_config(data, tmp_path, optim=optim, schedule=schedule, train={"epochs": 4})
    result = train(config_from_dict(cfg), quiet=True, callbacks=[watch])
    kinds = {epoch: {kind for _, e, kind, _, _ in watch.seen if e == epoch} for epoch in range(4)}
    assert kinds == {0: {"Adam"}, 1: {"Adam"}, 2: {"SGD"}, 3: {"SGD"}}
    total = 12  # 4 epochs x 3 steps: one cosine over the whole run, its peak scaled from 0.003 to 0.03
    import math

    for step, epoch, _, lr, momentum in watch.seen:
        peak = 0.003 if epoch < 2 else 0.03
        assert lr == pytest.approx(peak * (1 + math.cos(math.pi * step / total)) / 2, abs=1e-12), step
        if epoch >= 2:
            assert momentum == 0.8
    ckpt = load_checkpoint(result.last_checkpoint)
    assert ckpt["switched"] is True and "momentum_buffer" in next(iter(ckpt["optimizer"]["state"].values()))
    assert "optim.switch: sgd (lr 0.03) from epoch 3 on" in (tmp_path / "tiny/train.log").read_text()


def test_sigkill_before_the_switch_and_resume_across_it_is_bit_equal(data, tmp_path):
    optim = {"name": "adam", "lr": 0.003, "switch": {"epoch": 1, "name": "sgd", "lr": 0.05}}
    base = tiny_config(
        data,
        tmp_path,
        optim=optim,
        schedule={"name": "cosine", "per": "step", "warmup": 0},
        train={"epochs": 3, "deterministic": True, "checkpoint_every": 1},
    )
    reference = train(config_from_dict({**base, "name": "reference"}), quiet=True)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**base, "name": "killed"}))
    cmd = [sys.executable, "-m", "resnetkit", "train", "--config", str(path)]
    last = tmp_path / "killed" / "last.pt"
    import os

    env = {**os.environ, **ENV}
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed_at = _wait_for_checkpoint(child, last, lambda c: c["epoch"] == 0 and c["step"] > 0)  # still Adam
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert killed_at["switched"] is False
    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    final, expected = load_checkpoint(last), load_checkpoint(reference.last_checkpoint)
    assert final["switched"] and final["global_step"] == expected["global_step"] == 9
    for key, value in expected["model"].items():
        assert torch.equal(final["model"][key], value), key
    for key, value in expected["optimizer"]["state"].items():
        assert torch.equal(final["optimizer"]["state"][key]["momentum_buffer"], value["momentum_buffer"]), key
