"""`resnetkit compare`, `resnetkit tune` and `resnetkit lr-find` on small real CIFAR-10 subsets: every study is runs of
the one engine. compare: three optimisers (one an Adam -> SGD switch), three run folders, the table, the figure (one
curve per run), the self-contained page; a Ctrl-C mid-comparison, then a re-run that reuses the finished run and
resumes the interrupted one, then one that reuses all. tune: two worker processes on one SQLite study run the
requested trials in total, each once; a poor lr range is pruned; the best recipe trains with `resnetkit train`.
lr-find: the suggestion on a known problem is within a stated factor of the known-good lr, and nothing of the
recipe's is touched."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_train_real import _wait_for_checkpoint

from resnetkit.cli import main
from resnetkit.config import ConfigError, config_from_dict
from resnetkit.study.compare import _check_same_recipe, parse_vary, variants
from resnetkit.study.recipe import OPTIM_PRESETS, SOURCE_OPTIMIZERS, with_values
from resnetkit.study.tune import Dimension, TuneResult, load_space, write_study_report

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cifar_folder(cifar10_jpg, root, train: int, test: int, classes=None):
    """An ImageFolder of symlinks to the first `train` / `test` real CIFAR-10 JPEGs of each class."""
    for split, n in (("train", train), ("test", test)):
        for class_dir in sorted((cifar10_jpg / split).iterdir()):
            if n and (classes is None or class_dir.name in classes):
                (root / split / class_dir.name).mkdir(parents=True)
                for i in range(n):
                    (root / split / class_dir.name / f"{i:04d}.jpg").symlink_to(class_dir / f"{i:04d}.jpg")
    return root


def recipe(data, out, /, **sections) -> dict:
    cfg = {
        "name": "study",
        "output_dir": str(out),
        "model": {"name": "resnet20"},
        "data": {"name": str(data), "val_split": "test", "batch_size": 32, "cache_dir": str(out / "cache")},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "train": {"epochs": 2, "threads": 1, "log_images": False, "log_every_s": 60},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


# ---- what --vary and a search space may name


def test_vary_takes_keys_option_groups_presets_and_the_optimiser_tricks():
    base = config_from_dict({})
    assert parse_vary("optim=sgd,sgdm,nag,{name: adam, lr: 0.001}") == (
        "optim",
        ["sgd", "sgdm", "nag", {"name": "adam", "lr": 0.001}],
    )
    assert parse_vary("optim.lr=0.1,1e-3") == ("optim.lr", [0.1, "1e-3"])
    runs = variants(
        base,
        [
            ("optim", list(SOURCE_OPTIMIZERS)),
            ("optim.switch", [None, {"epoch": 2, "name": "sgd", "lr": 0.05}]),
        ],
    )
    assert len(runs) == 14 and len({r.label for r in runs}) == 14
    by_label = {r.label: r.config for r in runs}
    nag = by_label["nag_switch=null"].optim
    assert (nag.name, nag.lr, nag.momentum, nag.nesterov, nag.switch) == ("sgd", 0.1, 0.9, True, None)
    sgd = by_label["sgd_switch=epoch-2,name-sgd,lr-0.05"].optim
    assert (sgd.momentum, sgd.nesterov, sgd.switch.epoch, sgd.switch.name, sgd.switch.lr) == (
        0.0,
        False,
        2,
        "sgd",
        0.05,
    )
    assert by_label["adadelta_switch=null"].optim.lr == OPTIM_PRESETS["adadelta"]["lr"] == 1.0
    assert {r.config.seed for r in runs} == {0}  # one seed: the same initial weights and data order for every run
    (warm,) = variants(base, [parse_vary("optim.momentum_warmup={start: 0.5, steps: 100}")])
    assert (warm.config.optim.momentum_warmup.start, warm.config.optim.momentum_warmup.steps) == (0.5, 100)
    plateau = variants(
        base, [parse_vary("schedule={name: plateau, patience: 1, gamma: 0.5}"), ("train.metric", ["val_loss"])]
    )
    assert plateau[0].config.schedule.name == "plateau" and plateau[0].config.train.metric == "val_loss"
    with pytest.raises(ConfigError, match="optim: expected a mapping of its keys or a preset"):
        variants(base, [("optim", ["nesterov"])])
    with pytest.raises(ConfigError, match="unknown key 'optim.lrr'"):
        variants(base, [("optim.lrr", [0.1])])
    with pytest.raises(ConfigError, match="'switch' is not a section"):  # no switch in the base to change a key of
        with_values(base, {"optim.switch.lr": 0.1})


def test_search_space_forms_and_their_errors(tmp_path):
    space = load_space(
        {
            "optim.lr": {"low": "1e-3", "high": 1.0, "log": True},
            "train.epochs": {"low": 2, "high": 8, "int": True},
            "optim.name": ["sgd", "adam", "rmsprop"],
            "optim.switch": [None, {"epoch": 3, "name": "sgd", "lr": 0.05}],
        }
    )
    assert space["optim.lr"].low == 1e-3 and space["optim.lr"].log and not space["optim.lr"].encoded
    assert space["train.epochs"].int and space["train.epochs"].corners() == [2, 8]
    assert not space["optim.name"].encoded and space["optim.switch"].encoded  # a mapping travels as JSON
    assert space["optim.switch"].value('{"epoch": 3, "lr": 0.05, "name": "sgd"}')["lr"] == 0.05
    for bad, match in (
        ({"optim.lr": {"low": 1.0, "high": 0.1}}, "need low < high"),
        ({"optim.lr": {"low": 0.0, "high": 1.0, "log": True}}, "need low < high"),
        ({"optim.lr": {"min": 0.0, "max": 1.0}}, r"expected \{low: A, high: B\}"),
        ({"optim.name": []}, "an empty list"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_space(bad)
    path = tmp_path / "space.yaml"
    path.write_text("optim.lrr: [0.1]\n")
    assert main(["tune", "--config", "none.yaml", "--space", str(path), "--trials", "1"]) == 2  # config not found
    path.write_text("[0.1]\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_space(path)


# ---- compare


def _curve_pixels(png) -> list[int]:
    """Pixels of each of matplotlib's first three cycle colours (the three runs' curves)."""
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44)]  # tab:blue, tab:orange, tab:green
    return [int((np.abs(pixels - c).sum(axis=2) < 40).sum()) for c in colours]


def test_compare_three_optimisers_table_figure_page_and_reuse(cifar10_jpg, tmp_path, capsys):
    data = cifar_folder(cifar10_jpg, tmp_path / "data", 30, 10)
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(recipe(data, tmp_path, train={"checkpoint_every": 2})))
    adam_then_sgd = "{name: adam, lr: 0.002, switch: {epoch: 1, name: sgd, lr: 0.02, momentum: 0.9}}"
    argv = ["compare", "--config", str(base), "--vary", f"optim=sgdm,nag,{adam_then_sgd}", "--subset", "200"]
    out = tmp_path / "study-compare"
    labels = ["sgdm", "nag", "name-adam,lr-0.002,switch-epoch-1,name-sgd,lr-0.02,momentum-0.9"]

    # Ctrl-C while the second run is under way: the first is finished, the second stops with its last.pt saved.
    child = subprocess.Popen(
        [sys.executable, "-m", "resnetkit", *argv], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    _wait_for_checkpoint(child, out / "nag" / "last.pt", lambda c: c["epoch"] == 0 and c["step"] > 0)
    child.send_signal(signal.SIGINT)
    child.send_signal(signal.SIGCONT)
    stdout, _ = child.communicate(timeout=120)
    assert child.returncode == 130, stdout
    assert "interrupted: run the same command again to continue" in stdout
    first_run = (out / "sgdm" / "last.pt").stat().st_mtime_ns

    # The same command again: the finished run reused, the interrupted one resumed, the third trained.
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rows = [line.split(" | ") for line in (out / "comparison.md").read_text().splitlines()[2:]]
    assert [r[0].strip("| ") for r in rows] == labels
    assert [r[-1].strip("| ") for r in rows] == ["reused", "resumed", "new"]
    assert (out / "sgdm" / "last.pt").stat().st_mtime_ns == first_run
    assert "resumed" in (out / "nag" / "train.log").read_text()
    for label in labels:
        run = out / label
        assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
        assert "200 train / 100 val images" in (run / "train.log").read_text()  # --subset, the same for all
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["seed"] == 0 and saved["data"]["subset"] == 200
    assert "optim.switch: sgd (lr 0.02) from epoch 2 on" in (out / labels[2] / "train.log").read_text()
    header = rows and (out / "comparison.md").read_text().splitlines()[0]
    for column in ("best val_acc", "final val_acc", "best val_loss", "final val_loss", "epochs", "train wall s"):
        assert column in header and column in printed
    assert len((out / "comparison.csv").read_text().splitlines()) == 4

    # The figure: one curve per run in its own colour (each drawn across both panels, train and val).
    assert all(n > 300 for n in _curve_pixels(out / "comparison.png")), _curve_pixels(out / "comparison.png")
    page = (out / "comparison.html").read_text()
    assert page.count("data:image/png;base64,") == 1 and "http" not in page.replace("http-equiv", "")
    assert all(label in page for label in labels) and "<table>" in page

    # Once more: everything reused, nothing trained (no row, no checkpoint written).
    stamps = {label: (out / label / "last.pt").stat().st_mtime_ns for label in labels}
    assert main(argv) == 0
    rows = [line.split(" | ") for line in (out / "comparison.md").read_text().splitlines()[2:]]
    assert [r[-1].strip("| ") for r in rows] == ["reused"] * 3
    assert stamps == {label: (out / label / "last.pt").stat().st_mtime_ns for label in labels}

    # A run folder of another recipe is not reused.
    assert main([*argv[:-1], "100"]) == 2
    assert "holds a run of another recipe (data.subset differ)" in capsys.readouterr().err


def test_a_run_folder_is_kept_across_machine_settings_and_refused_for_another_recipe(tmp_path):
    base = {"model": {"name": "resnet20"}, "data": {"name": "shapes"}, "train": {"epochs": 2}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config_from_dict(base).to_dict()))
    machine = {"threads": 1, "device": "cpu", "log_every_s": 5, "keep_freed_memory": False}
    _check_same_recipe(tmp_path, config_from_dict({**base, "train": {"epochs": 2, **machine}}))
    with pytest.raises(ValueError, match="another recipe \\(train.epochs differ\\)"):
        _check_same_recipe(tmp_path, config_from_dict({**base, "train": {"epochs": 3}}))


# ---- tune


def _study(url: str, name: str):
    import optuna

    from resnetkit.study.tune import _storage

    # tune's own storage opener: the test reads the database while the first worker may still be writing its schema
    return optuna.load_study(study_name=name, storage=_storage(url, heartbeat=60))


def test_tune_two_workers_share_one_study_prune_a_poor_range_and_write_a_recipe(cifar10_jpg, tmp_path):
    import optuna

    data = cifar_folder(cifar10_jpg, tmp_path / "data", 50, 20)
    # The base (trial 0): Adam with a momentum warm-up, switching to SGD after its first epoch. The space searches
    # nested keys of both tricks, a whole schedule group (plateau on val_acc among them), and an lr range so low
    # that nothing is learnt: every sampled trial is worse after one epoch than the base, which has finished by
    # then, so the median pruner must prune each at its first report.
    cfg = recipe(
        data,
        tmp_path,
        optim={
            "name": "adam",
            "lr": 0.002,
            "momentum_warmup": {"start": 0.5, "steps": 10},
            "switch": {"epoch": 1, "name": "sgd", "lr": 0.02, "momentum": 0.9},
        },
    )
    base, space = tmp_path / "base.yaml", tmp_path / "space.yaml"
    base.write_text(yaml.safe_dump(cfg))
    space.write_text(
        "optim.lr: {low: 1.0e-7, high: 1.0e-6, log: true}\n"
        "optim.switch.lr: {low: 0.01, high: 0.05, log: true}\n"
        "optim.momentum_warmup.start: {low: 0.3, high: 0.8}\n"
        "schedule: [{name: constant}, {name: plateau, patience: 0, gamma: 0.5}]\n"
    )
    out, url = tmp_path / "study-tune", f"sqlite:///{tmp_path / 'study-tune' / 'study.db'}"
    cmd = [sys.executable, "-m", "resnetkit", "tune", "--config", str(base), "--space", str(space)]
    cmd += ["--trials", "4", "--startup-trials", "1"]
    first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not (out / "study.db").is_file() or not _study(url, "study-tune").get_trials(
        states=(optuna.trial.TrialState.COMPLETE,)
    ):  # the second worker joins once the base trial has finished, as one on another machine may at any time
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
        time.sleep(0.2)
    second = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs = [p.communicate(timeout=300)[0] for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], logs

    trials = [t for t in _study(url, "study-tune").get_trials() if not t.user_attrs.get("given_back")]
    assert sorted(t.number for t in trials) == list(range(4))  # four in total, each number once
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers ran trials
    folders = sorted(p.name for p in out.iterdir() if p.name.startswith("trial-"))
    assert folders == [f"trial-{n:04d}" for n in range(4)]
    for t in trials:  # each trial's run started once, with its own values
        log = (out / f"trial-{t.number:04d}" / "train.log").read_text()
        assert log.count("training classification") == 1 and "resumed" not in log
        saved = yaml.safe_load((out / f"trial-{t.number:04d}" / "config.yaml").read_text())
        if t.number == 0:
            assert t.user_attrs["base"] and t.params == {} and t.state == optuna.trial.TrialState.COMPLETE
            assert saved["optim"]["lr"] == 0.002 and "optim.switch: sgd (lr 0.02) from epoch 2 on" in log
            continue
        assert t.state == optuna.trial.TrialState.PRUNED and list(t.intermediate_values) == [1], t
        assert saved["optim"]["lr"] == t.params["optim.lr"] and 1e-7 <= t.params["optim.lr"] <= 1e-6
        assert saved["optim"]["switch"]["lr"] == t.params["optim.switch.lr"]
        assert saved["optim"]["momentum_warmup"]["start"] == t.params["optim.momentum_warmup.start"]
        assert saved["schedule"]["name"] == json.loads(t.params["schedule"])["name"]

    table = (out / "trials.md").read_text()
    assert table.count("| pruned |") == 3 and table.count("| complete |") == 1
    assert (out / "history.png").is_file() and (out / "trials.csv").is_file()
    best = out / "best.yaml"
    assert "the best of 4 trials" in best.read_text() and yaml.safe_load(best.read_text())["optim"]["lr"] == 0.002
    assert main(["train", "--config", str(best), "--set", "train.epochs=1", "--set", "data.subset=100"]) == 0
    assert (tmp_path / "study-tune-best" / "last.pt").is_file()

    # The study is complete: another worker runs nothing and only rewrites the report.
    from resnetkit.study.tune import tune

    again = tune(base, space, 4, startup_trials=1, quiet=True)
    assert again.trials_run == 0 and again.best_config == best


def test_tune_runs_a_dead_workers_trial_again_resuming_its_run(cifar10_jpg, tmp_path):
    """A worker SIGKILLed mid-trial stops sending its heartbeat; the next worker fails that trial and runs it again as
    a new trial with the same values, continuing the dead run's folder from its last checkpoint (every epoch once),
    and the study counts it once."""
    import optuna

    from resnetkit.study.tune import tune

    data = cifar_folder(cifar10_jpg, tmp_path / "data", 20, 5)
    base, space = tmp_path / "base.yaml", tmp_path / "space.yaml"
    base.write_text(yaml.safe_dump(recipe(data, tmp_path, train={"epochs": 3})))
    space.write_text("optim.lr: {low: 0.01, high: 0.1, log: true}\n")
    out, url = tmp_path / "study-tune", f"sqlite:///{tmp_path / 'study-tune' / 'study.db'}"
    cmd = [sys.executable, "-m", "resnetkit", "tune", "--config", str(base), "--space", str(space)]
    cmd += ["--trials", "2", "--no-base-trial", "--heartbeat", "1"]
    dead = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_checkpoint(dead, out / "trial-0000" / "last.pt", lambda ckpt: ckpt["epoch"] == 1)
    dead.kill()  # stopped by _wait_for_checkpoint after its first epoch: SIGKILL, no chance to tidy up
    dead.wait()
    assert _study(url, "study-tune").get_trials()[0].state == optuna.trial.TrialState.RUNNING
    time.sleep(5)  # four silent beats of a second: stale

    result = tune(base, space, 2, base_trial=False, heartbeat=1, quiet=True)
    trials = _study(url, "study-tune").get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert result.trials_run == 2  # the retry and one new trial: the dead one does not count
    retry = trials[1]
    assert retry.system_attrs["retry_history"] == [0] and retry.params == trials[0].params
    assert retry.user_attrs["run_dir"] == str(out / "trial-0000")
    log = (out / "trial-0000" / "train.log").read_text()
    assert "resumed" in log
    rows = [json.loads(line) for line in (out / "trial-0000" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # the first epoch from the dead worker, two from the retry
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("trial-")) == ["trial-0000", "trial-0002"]
    table = result.table.read_text()
    assert "| complete (retry of 0) |" in table and len(table.splitlines()) == 2 + 2


def test_study_report_writes_the_best_recipe_and_optunas_plots(tmp_path):
    """The report of a study from the storage alone: best.yaml, the table, history.png and importance.png."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    base = config_from_dict({"name": "r", "output_dir": str(tmp_path)})
    space = {
        "optim.lr": Dimension("optim.lr", 1e-3, 1.0, log=True),
        "optim.switch": Dimension("optim.switch", choices=[None, {"epoch": 2, "name": "sgd", "lr": 0.05}]),
    }
    study = optuna.create_study(direction="maximize", study_name="r-tune")
    choices = [json.dumps(c) for c in space["optim.switch"].choices]
    dists = {"optim.lr": FloatDistribution(1e-3, 1.0, log=True), "optim.switch": CategoricalDistribution(choices)}
    rng = np.random.default_rng(0)
    for i in range(12):
        lr = float(10 ** rng.uniform(-3, 0))
        params = {"optim.lr": lr, "optim.switch": choices[i % 2]}
        value = 0.9 - abs(np.log10(lr) + 1) * 0.2  # best near lr 0.1; the switch does not matter
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value))
    given_back = optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"given_back": "surplus"})
    study.add_trial(given_back)  # asked for past the total: not a trial of the table
    result = write_study_report(study, base, space, TuneResult(tmp_path, "r-tune", "memory", "val_acc"))
    best = yaml.safe_load(result.best_config.read_text())
    assert best["optim"]["lr"] == study.best_params["optim.lr"] and best["name"] == "r-tune-best"
    assert best["optim"]["switch"] == space["optim.switch"].value(study.best_params["optim.switch"])
    config_from_dict(best)  # a valid recipe
    for png in (result.history, result.importance):
        pixels = np.asarray(Image.open(png).convert("L"))
        assert pixels.std() > 10, png  # drawn, not blank
    assert len(result.table.read_text().splitlines()) == 2 + 12


# ---- lr-find


def test_lr_find_suggests_the_known_good_lr_and_touches_nothing(cifar10_jpg, tmp_path, monkeypatch):
    """The known problem: ResNet-20 on airplane vs frog, 100 real training images each, batch 32, no augmentation.
    Its known-good learning rates were measured once with `resnetkit compare --vary optim.lr=...` (6 epochs, constant
    lr, 100 test images per class): Adam best at 1e-3 (91.5% against <= 88% at 1e-4, 3e-4, 3e-3, 1e-2), SGD with
    momentum 0.9 best at 1e-2 (88.5%; 0.003 to 0.1 within 1.5 points, 0.3 at 71%). The stated factor: 3."""
    from resnetkit.models import create_model
    from resnetkit.study.lr_find import lr_find

    data = cifar_folder(cifar10_jpg, tmp_path / "data", 100, 0, classes=("airplane", "frog"))
    weights = tmp_path / "init.pt"
    torch.manual_seed(1)
    torch.save(create_model("resnet20", num_classes=2).state_dict(), weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    known_good = {"adam": 1e-3, "sgd": 1e-2}
    for name, optim in (("adam", {"name": "adam", "weight_decay": 0.0}), ("sgd", {"name": "sgd", "weight_decay": 0.0})):
        cfg = recipe(data, tmp_path, optim=optim, data={"train_augment": False}, model={"weights": str(weights)})
        cfg["name"] = name
        found = lr_find(config_from_dict(cfg), start=1e-5, end=1.0, steps=50)
        assert len(found.lrs) == len(found.losses) == 50 and found.lrs[0] == pytest.approx(1e-5)
        assert found.lrs[-1] == pytest.approx(1e-5 * (1.0 / 1e-5) ** (49 / 50))  # exponential, step by step
        assert known_good[name] / 3 <= found.suggestion <= known_good[name] * 3, (name, found.suggestion)
        assert found.figure.is_file() and json.loads(found.json.read_text())["suggestion"] == found.suggestion
        assert found.figure.parent == tmp_path / f"{name}-lr-find"
        assert not (tmp_path / name).exists()  # the recipe's run folder: never created
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest  # the weights file: untouched
    assert not list(scratch.glob("resnetkit-lr-find-*"))  # the sweep's own run folder: deleted
