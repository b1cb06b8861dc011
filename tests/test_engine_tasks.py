"""The one training engine, proved the same way for every task (classification, detection, segmentation): a run
killed with SIGKILL mid-epoch and Ctrl-C'd in the next epoch resumes to weights bit-equal to an uninterrupted run's;
a NaN loss stops naming the step and keeps the last good checkpoint; two torchrun processes end with identical
weights and exact validation metrics; torchrun restarts a group whose worker was SIGKILLed, and the run resumes by
itself to the uninterrupted run's weights. Real processes, real files, CPU and gloo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_detection import detection_recipe, make_coco
from test_segmentation import _write_folder as write_mask_folder
from test_train import make_folder, tiny_config
from test_train_real import _wait_for_checkpoint

from resnetkit.checkpoint import load_checkpoint
from resnetkit.config import config_from_dict
from resnetkit.train.fit import train
from resnetkit.train.loop import NonFiniteLoss

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TASKS = ("classification", "detection", "segmentation")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same as OMP_NUM_THREADS=1 in the subprocesses: bitwise-comparable results
    yield
    torch.set_num_threads(threads)


def recipe(task: str, root: Path, **sections) -> dict:
    """A tiny run of `task` on data written under `root`: 3 to 6 optimizer steps per epoch."""
    if task == "classification":
        data = root / "cls-data"
        if not data.exists():
            make_folder(data, {"train": 16, "val": 3}, size=16)  # 48 training images: 6 batches of 8
        cfg = tiny_config(data, root)
    elif task == "detection":
        data = root / "det-data"
        if not data.exists():
            make_coco(data, splits=(("train", 8), ("val", 3)), size=64)  # 4 batches of 2
        cfg = detection_recipe(data, root, data={"image_size": 64})
    else:
        data = root / "seg-data"
        if not data.exists():
            write_mask_folder(data, "train", 8, size=32)
            write_mask_folder(data, "val", 3, size=32, seed=1)
        cfg = {
            "task": "segmentation",
            "output_dir": str(root),
            "model": {"name": "resnet20"},
            "data": {"name": str(data), "image_size": 32, "batch_size": 2, "workers": 0},  # 4 batches of 2
            "optim": {"name": "adamw", "lr": 0.002},
            "schedule": {"name": "cosine", "per": "step", "warmup": 2},
            "train": {"epochs": 2, "log_every_s": 30},
            "segmentation": {"decoder_channels": 16},
        }
    cfg["name"] = task
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


@pytest.mark.parametrize("task", TASKS)
def test_sigkill_and_ctrl_c_then_resume_equal_an_uninterrupted_run(task, tmp_path):
    train_opts = {"epochs": 3, "deterministic": True, "checkpoint_every": 1, "ema": True}
    mixing = (
        {"data": {"mixup_alpha": 0.2}, "optim": {"name": "sgd", "nesterov": True}} if task == "classification" else {}
    )
    base = recipe(task, tmp_path, train=train_opts, **mixing)
    reference = train(config_from_dict({**base, "name": "reference"}), quiet=True)
    steps_per_epoch = load_checkpoint(reference.last_checkpoint)["global_step"] // 3
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**base, "name": "killed"}))
    cmd = [sys.executable, "-m", "resnetkit", "train", "--config", str(path)]
    last = tmp_path / "killed" / "last.pt"

    # 1. SIGKILL in the middle of epoch 2.
    child = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed_at = _wait_for_checkpoint(child, last, lambda c: c["epoch"] == 1 and c["step"] > 0)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert 0 < killed_at["step"] < steps_per_epoch

    # 2. Resume; Ctrl-C (SIGINT) in the middle of epoch 3: it saves and exits cleanly.
    child = subprocess.Popen([*cmd, "--resume"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_checkpoint(child, last, lambda c: c["epoch"] == 2 and c["step"] > 0)
    child.send_signal(signal.SIGINT)
    child.send_signal(signal.SIGCONT)
    out, _ = child.communicate(timeout=180)
    assert child.returncode == 130, out
    assert f"resumed {last} at epoch 2, step {killed_at['step']}" in out
    assert "interrupted at epoch 3, step" in out and "Traceback" not in out

    # 3. Resume to the end: the weights (and the EMA's) equal the uninterrupted run's, bit for bit.
    done = subprocess.run([*cmd, "--resume"], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    final, expected = load_checkpoint(last), load_checkpoint(reference.last_checkpoint)
    assert final["task"] == task and (final["epoch"], final["step"]) == (3, 0)
    assert final["global_step"] == expected["global_step"] == 3 * steps_per_epoch
    for key, value in expected["model"].items():
        assert torch.equal(final["model"][key], value), (
            f"{task} {key}: max diff {(final['model'][key] - value).abs().max()}"
        )
    for key, value in expected["model_ema"].items():
        assert torch.equal(final["model_ema"][key], value), f"{task} EMA {key}"
    rows = [json.loads(line) for line in (tmp_path / "killed/metrics.jsonl").read_text().splitlines()]
    assert sorted({r["epoch"] for r in rows}) == [1, 2, 3]


@pytest.mark.parametrize("task", TASKS)
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(task, tmp_path):
    # Epoch 1 trains normally and is checkpointed; at epoch 2 the lr jumps x1e12 and the loss blows up.
    jump = {"name": "multistep", "per": "epoch", "milestones": [1], "gamma": 1e12, "warmup": 0}
    cfg = recipe(task, tmp_path, schedule=jump, optim={"name": "sgd", "lr": 0.05}, train={"epochs": 3})
    with pytest.raises(NonFiniteLoss, match=r"loss is (nan|inf|-inf) at epoch 2, step \d+ of \d+"):
        train(config_from_dict(cfg), quiet=True)
    ckpt = load_checkpoint(tmp_path / task / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["task"] == task
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    log = (tmp_path / task / "train.log").read_text()
    assert "stopped: loss is" in log and "last.pt" in log


def _torchrun(script: Path, *args, restarts: int = 0, timeout: float = 300) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    if restarts:
        cmd += ["--max-restarts", str(restarts)]
    return subprocess.Popen(
        [*cmd, str(script), *map(str, args)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


TRAIN_SCRIPT = (
    "import os, sys, torch\n"
    "from resnetkit.train.fit import train\n"
    "result = train(sys.argv[1])\n"
    "torch.save(result.model.state_dict(), os.path.join(sys.argv[2], f\"rank{os.environ['RANK']}.pt\"))\n"
)


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_torchrun_two_processes_identical_weights_and_exact_metrics(task, tmp_path):
    """(Classification: tests/test_train_real.py, which also compares with a one-process run.)"""
    cfg = recipe(task, tmp_path, data={"batch_size": 4}, train={"epochs": 2})
    cfg_path = tmp_path / "ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    script = tmp_path / "ddp_train.py"
    script.write_text(TRAIN_SCRIPT)
    proc = _torchrun(script, cfg_path, tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"ranks differ at {key}"
    run = tmp_path / task
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and (run / "train.log").read_text().count("2 process(es)") == 1
    # The validation the two ranks computed together (each on its shard) equals one process evaluating every image.
    from resnetkit.tasks import get_task
    from resnetkit.train.distributed import DistInfo

    config = config_from_dict(cfg)
    task_ = get_task(task)
    task_.build_loaders(config, DistInfo())
    model, _, _ = task_.build_model(config, load_weights=False)
    model.load_state_dict(rank0)
    expected = task_.evaluate(model, task_.eval_loader(config, "val", DistInfo()), config, torch.device("cpu"))
    assert load_checkpoint(run / "last.pt")["model"].keys() == rank0.keys()
    for key, value in expected.items():
        exact = key != "loss"  # mAP, mIoU and pixel accuracy come from exact counts; a loss is a float sum
        assert rows[-1][f"val_{key}"] == (value if exact else pytest.approx(value, rel=1e-6)), key


def _workers(parent: int) -> list[int]:
    """The pids of `parent`'s child processes (torchrun's workers), from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                children.append(int(entry.name))
    return children


def test_torchrun_restarts_a_killed_worker_and_the_run_resumes_by_itself(tmp_path):
    cfg = recipe(
        "classification",
        tmp_path,
        data={"train_augment": True},
        train={"epochs": 3, "deterministic": True, "checkpoint_every": 1},
    )
    script = tmp_path / "ddp_train.py"
    script.write_text(TRAIN_SCRIPT)
    paths = {}
    for name in ("straight", "restarted"):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump({**cfg, "name": name}))
        (tmp_path / name).mkdir()
    straight = _torchrun(script, paths["straight"], tmp_path / "straight")
    out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out[-4000:]

    agent = _torchrun(script, paths["restarted"], tmp_path / "restarted", restarts=1)
    last = tmp_path / "restarted" / "last.pt"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # wait for a checkpoint in the middle of epoch 2, then kill a worker
        assert agent.poll() is None, agent.stdout.read()[-4000:]
        try:
            ckpt = load_checkpoint(last) if last.is_file() else None
        except Exception:  # noqa: BLE001 - being replaced as we read: the rename is atomic, retry
            ckpt = None
        if ckpt is not None and ckpt["epoch"] == 1 and ckpt["step"] > 0:
            break
        time.sleep(0.02)
    else:
        agent.kill()
        pytest.fail("no mid-epoch checkpoint within 180 s")
    victim = max(_workers(agent.pid))
    os.kill(victim, signal.SIGKILL)
    out, _ = agent.communicate(timeout=300)
    assert agent.returncode == 0, out[-4000:]
    log = (tmp_path / "restarted" / "train.log").read_text()
    assert "resumed" in log, log
    for rank in (0, 1):
        a = torch.load(tmp_path / "straight" / f"rank{rank}.pt", weights_only=True)
        b = torch.load(tmp_path / "restarted" / f"rank{rank}.pt", weights_only=True)
        for key in a:
            assert torch.equal(a[key], b[key]), f"rank {rank} {key}: the restarted run's weights differ"
