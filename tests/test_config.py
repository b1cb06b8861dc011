"""resnetkit.config: YAML recipes, --set overrides, and validation messages that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from resnetkit.config import ConfigError, load_config, save_config

RECIPES = [
    "demo",
    "cifar10_resnet18",
    "cifar10_resnet50_finetune",
    "cifar10_resnet20",
    "cifar10_resnet56",
    "cifar10_resnet110",
    "cifar10_fast",
    "cub200_resnet50",
    "imagenet_resnet50",
]
CONFIGS = [Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml" for name in RECIPES]


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  name: resnet20\noptim:\n  lr: 0.2\n  weight_decay: 5e-4\ntrain:\n  epochs: 4\n")
    cfg = load_config(path, ["optim.lr=0.05", "train.amp=bf16", "schedule.milestones=[2, 3]", "model.num_classes=7"])
    assert cfg.name == "exp" and cfg.run_dir == Path("runs/exp")
    assert cfg.model.name == "resnet20" and cfg.optim.lr == 0.05 and cfg.optim.weight_decay == 5e-4
    assert cfg.train.epochs == 4 and cfg.train.amp == "bf16" and cfg.schedule.milestones == [2.0, 3.0]
    assert cfg.model.num_classes == 7 and isinstance(cfg.optim.lr, float)
    saved = save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(saved) == cfg  # the resolved config round-trips


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=0.1"], "unknown key 'optim.lrr' (did you mean 'optim.lr'"),
        (["trian.epochs=3"], "unknown key 'trian' (did you mean 'train'"),
        (["optim.lr=fast"], "optim.lr: expected float, got str 'fast'"),
        (["train.epochs=2.5"], "train.epochs: expected int, got float 2.5"),
        (["train.ema=maybe"], "train.ema: expected bool, got str 'maybe'"),
        (["schedule.milestones=5"], "schedule.milestones: expected a list of float"),
        (["optim.name=sgdd"], "optim.name: unknown value 'sgdd' (did you mean 'sgd'"),
        (["train.amp=fp8"], "train.amp: unknown value 'fp8'"),
        (["model.freeze=stage2"], "model.freeze: expected 'none', 'head' or 'stages:N'"),
        (["optim.lr"], "expected KEY=VALUE"),
        (["optim.lr.x=1"], "'lr' is not a section"),
        (["train.eval_tta=mirror"], "train.eval_tta: unknown value 'mirror'"),
        (["train.eval_flip=3"], "train.eval_flip: expected bool, got int 3 (now train.eval_tta)"),
    ],
)
def test_errors_name_the_key(tmp_path, overrides, message):
    path = tmp_path / "exp.yaml"
    path.write_text("optim:\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert message in str(err.value) and str(path) in str(err.value)


def test_older_eval_flip_reads_as_eval_tta(tmp_path):
    """Recipes and checkpoints written before train.eval_tta said `train.eval_flip: true`; they still load."""
    path = tmp_path / "old.yaml"
    path.write_text("train:\n  eval_flip: true\n")
    assert load_config(path).train.eval_tta == "flip"
    assert load_config(path, ["train.eval_flip=false"]).train.eval_tta == "none"
    assert load_config(path, ["train.eval_tta=flip-translate"]).train.eval_tta == "flip-translate"


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found: .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("optim: 3\n")
    with pytest.raises(ConfigError, match="wrong.yaml: optim: expected a mapping"):
        load_config(wrong)


def test_cli_prints_one_line_error(tmp_path, capsys):
    from resnetkit.cli import main

    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  epoch: 3\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown key 'train.epoch' (did you mean 'train.epochs'" in err


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_recipe_validates(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert path.read_text().lstrip().startswith("#"), "each recipe starts with a comment saying where it comes from"
