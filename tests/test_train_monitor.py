"""resnetkit.train.monitor: plain progress lines off a terminal, metrics.jsonl, TensorBoard events, curves.png."""

from __future__ import annotations

import io
import json

import torch
from PIL import Image

from resnetkit.train.monitor import Progress, RunLogger


def test_progress_prints_plain_lines_off_a_terminal():
    out = io.StringIO()
    with Progress(4, desc="epoch 1/2", every_s=0.0, file=out) as bar:
        for i in range(4):
            bar.update(images=8, loss=1.0 / (i + 1), lr=0.1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 5  # one per update with every_s=0, plus the closing line
    assert lines[-1].startswith("epoch 1/2 4/4 loss=0.2500 lr=0.1000")
    assert "img/s" in lines[-1] and "ETA 00:00" in lines[-1]


def test_progress_disabled_prints_nothing():
    out = io.StringIO()
    with Progress(3, every_s=0.0, file=out, enabled=False) as bar:
        bar.update(loss=1.0)
    assert out.getvalue() == ""


def test_run_logger_writes_jsonl_tensorboard_and_curves(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLogger(tmp_path / "run") as logger:
        for epoch in range(3):
            logger.log_scalars(epoch * 10, {"train/loss_step": 2.0 - epoch, "throughput": torch.tensor(100.0)})
            trace = [(epoch + f, 0.1 * (1 - (epoch + f) / 3)) for f in (0.0, 0.5)]
            logger.log_epoch(
                epoch,
                {
                    "train_loss": 2.0 - epoch,
                    "val_loss": 2.1 - epoch,
                    "train_acc": 0.3 * epoch,
                    "val_acc": 0.25 * epoch,
                    "lr": trace[-1][1],
                    "lr_trace": trace,
                },
            )
        logger.log_images("train/augmented", torch.rand(4, 3, 8, 8), 0)
        logger.log_hparams({"optim": {"lr": 0.1, "name": "sgd"}, "model": {"name": "resnet20"}}, {"val_acc": 0.5})
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[2]["val_acc"] == 0.5 and "lr_trace" not in rows[2]
    image = Image.open(tmp_path / "run/curves.png")
    assert image.size[0] > 2 * image.size[1]  # three panels side by side
    events = EventAccumulator(str(tmp_path / "run/tb")).Reload()
    tags = events.Tags()
    assert {"epoch/train/loss", "epoch/val/acc", "epoch/lr", "throughput"} <= set(tags["scalars"])
    assert "train/augmented" in tags["images"]
    assert all(abs(a.value - b) < 1e-6 for a, b in zip(events.Scalars("epoch/val/loss"), [2.1, 1.1, 0.1]))
    # A resumed run keeps the history and replaces a repeated epoch.
    logger = RunLogger(tmp_path / "run")
    logger.log_epoch(2, {"train_loss": 0.5, "val_loss": 0.6})
    assert [r["epoch"] for r in logger.rows] == [0, 1, 2] and logger.rows[-1]["train_loss"] == 0.5
    logger.close()
