"""k-fold cross-validation on 60 real CIFAR-10 JPEGs: stratified folds, a run folder each, the summary, and a
resume after the command was killed in the middle of a fold."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
import yaml
from test_train_real import _wait_for_checkpoint

from resnetkit.cli import main
from resnetkit.train.folds import train_folds


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_kfold_writes_every_fold_and_summary_and_resumes_after_a_kill(cifar10_jpg, tmp_path, capsys):
    flat = tmp_path / "flat"
    for class_dir in sorted((cifar10_jpg / "train").iterdir()):
        (flat / class_dir.name).mkdir(parents=True)
        for i in range(6):
            (flat / class_dir.name / f"{i:04d}.jpg").symlink_to(class_dir / f"{i:04d}.jpg")
    cfg = {
        "name": "kfold",
        "output_dir": str(tmp_path / "runs"),
        "model": {"name": "resnet20"},
        "data": {"name": str(flat), "batch_size": 8, "workers": 0, "cache_dir": str(tmp_path / "cache")},
        "optim": {"lr": 0.05},
        "train": {"epochs": 1, "log_every_s": 60, "log_images": False, "checkpoint_every": 1},
    }
    config = tmp_path / "kfold.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "runs" / "kfold"
    # `resnetkit train --folds 3` killed (SIGKILL) in the middle of fold 1, once its last.pt holds a mid-epoch state.
    child = subprocess.Popen(
        [sys.executable, "-m", "resnetkit", "train", "--config", str(config), "--folds", "3"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_for_checkpoint(child, run / "fold-1" / "last.pt", lambda c: c["epoch"] == 0 and c["step"] > 0)
    child.kill()
    child.communicate(timeout=60)
    summary = json.loads((run / "folds.json").read_text())
    assert [f["fold"] for f in summary["folds"]] == [0]  # fold 0 finished and recorded, fold 1 killed
    assert not (run / "fold-2").exists()
    fold0_rows = (run / "fold-0" / "metrics.jsonl").read_text()

    result = train_folds(cfg, 3, resume=True, quiet=True)
    assert not result.interrupted and [f["fold"] for f in result.folds] == [0, 1, 2]
    assert (run / "fold-0" / "metrics.jsonl").read_text() == fold0_rows  # a finished fold is not trained again
    assert "resumed" in (run / "fold-1" / "train.log").read_text()  # the killed one continued from its last.pt

    # Stratified folds: each fold's val holds 2 images of every class; together they are all 60, once each.
    vals = [(run / f"fold-{k}" / "splits" / "val.txt").read_text().split() for k in range(3)]
    assert sorted(sum(vals, [])) == sorted(f"{c.name}/{f.name}" for c in flat.iterdir() for f in c.iterdir())
    for k, val in enumerate(vals):
        assert Counter(p.split("/")[0] for p in val) == {c.name: 2 for c in flat.iterdir()}
        train_list = (run / f"fold-{k}" / "splits" / "train.txt").read_text().split()
        assert len(train_list) == 40 and not set(train_list) & set(val)
        saved = yaml.safe_load((run / f"fold-{k}" / "config.yaml").read_text())
        assert saved["data"]["splits"] == str((run / f"fold-{k}" / "splits").resolve())

    summary = json.loads((run / "folds.json").read_text())
    assert summary["k"] == 3 and len(summary["folds"]) == 3
    accs = [f["metrics"]["val_acc"] for f in summary["folds"]]
    mean = sum(accs) / 3
    assert summary["summary"]["val_acc"]["mean"] == pytest.approx(mean)
    assert summary["summary"]["val_acc"]["std"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in accs) / 2))
    assert {"val_loss", "val_acc", "best_val_acc"} <= set(summary["summary"])

    # The command: --resume on a finished k-fold run trains nothing and prints the table.
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--folds", "3", "--resume"]) == 0
    table = capsys.readouterr().out
    assert "3 of 3 folds" in table and "val_acc" in table and f"{mean:.4f}" in table
    assert (run / "fold-0" / "metrics.jsonl").read_text() == fold0_rows
    assert main(["train", "--config", str(config), "--folds", "3"]) == 2  # not over a finished one without --resume
