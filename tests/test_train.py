"""resnetkit train end to end on tiny data: run folder, resume, NaN handling, freezes, the CLI.

The heavier proofs (real CIFAR-10, SIGKILL + resume, torchrun DDP) live in test_train_real.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnetkit.checkpoint import load_checkpoint
from resnetkit.config import config_from_dict
from resnetkit.evaluation.evaluate import evaluate
from resnetkit.train.fit import train
from resnetkit.train.loop import NonFiniteLoss, autocast, resolve_amp

COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]


def make_folder(root: Path, per_class: dict[str, int], size: int = 16, seed: int = 0) -> Path:
    """An ImageFolder of noisy colour patches: class i is dominated by colour i (learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for c, colour in enumerate(COLOURS):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(rng.normal(colour, 60, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train fastest on one thread, and a shared machine's cores are busy: don't wait on a second."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("tiny"), {"train": 16, "val": 6})


def tiny_config(data_dir: Path, out: Path, /, **sections) -> dict:
    cfg = {
        "name": "tiny",
        "output_dir": str(out),
        "model": {"name": "resnet20"},
        "data": {"name": str(data_dir), "batch_size": 8, "workers": 0, "cache_dir": str(out / "cache")},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "cosine", "per": "step", "warmup": 2},
        "train": {"epochs": 2, "log_every_s": 0.0},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def test_run_folder_and_checkpoint_contents(tiny, tmp_path):
    cfg = config_from_dict(tiny_config(tiny, tmp_path, train={"ema": True, "eval_tta": "flip-translate"}))
    result = train(cfg, quiet=True)
    run = tmp_path / "tiny"
    assert result.run_dir == run and result.last_checkpoint == run / "last.pt"
    for name in ("config.yaml", "last.pt", "best.pt", "metrics.jsonl", "curves.png", "train.log"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "val_ema_acc", "lr", "images_per_s"} <= set(rows[-1])
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 0 and ckpt["global_step"] == 2 * 6
    assert ckpt["classes"] == ["class0", "class1", "class2"] and ckpt["model_kwargs"] == {"num_classes": 3}
    assert ckpt["config"]["train"]["ema"] is True and ckpt["model_ema"] is not None
    # one TTA: the run's last validation pass is what `resnetkit eval` of last.pt gives with the same TTA
    evaluated = evaluate(run / "last.pt", split="val", tta="flip-translate", workers=0)
    assert evaluated["top1"] == pytest.approx(rows[-1]["val_acc"])
    assert evaluated["loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-5)
    assert set(ckpt["rng"][0]) >= {"python", "numpy", "torch"} and ckpt["loader"]["epoch"] == 1
    assert ckpt["preprocess"]["input_size"] == 16 and ckpt["version"]
    # The weights in the checkpoint are the ones the run ended with.
    for key, value in result.model.state_dict().items():
        assert torch.equal(ckpt["model"][key], value), key
    # A finished run resumed does nothing more; a new run into the same folder is refused.
    again = train(cfg, resume=True, quiet=True)
    assert load_checkpoint(again.last_checkpoint)["global_step"] == 12
    with pytest.raises(ValueError, match="already holds a run.*--resume"):
        train(cfg, quiet=True)


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tiny, tmp_path, capsys):
    # Epoch 1 trains normally and is checkpointed; at epoch 2 the lr jumps x1e12 and the loss blows up.
    cfg = tiny_config(
        tiny, tmp_path, schedule={"name": "multistep", "per": "epoch", "milestones": [1], "gamma": 1e12, "warmup": 0}
    )
    with pytest.raises(NonFiniteLoss, match=r"loss is (nan|inf|-inf) at epoch 2, step \d+ of 6"):
        train(config_from_dict(cfg), quiet=True)
    ckpt = load_checkpoint(tmp_path / "tiny/last.pt")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    log = (tmp_path / "tiny/train.log").read_text()
    assert "stopped: loss is" in log and "last.pt" in log
    # The CLI turns it into one line naming the step.
    from resnetkit.cli import main

    path = tmp_path / "nan.yaml"
    import yaml

    path.write_text(yaml.safe_dump({**cfg, "name": "nan2"}))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at epoch 2, step" in err[0]


def _bn_stats(model):
    return {n: b.clone() for n, b in model.named_buffers() if "running" in n}


@pytest.mark.parametrize("mode", ["head", "stages:2"])
def test_freeze_modes_keep_frozen_weights_and_bn_statistics(tiny, tmp_path, mode):
    from resnetkit.models import create_model

    pretrained = create_model("resnet20", num_classes=5)  # a 5-class "pretrained" model: the head is replaced
    torch.nn.init.normal_(pretrained.bn1.running_mean)  # non-default statistics, so that a reset would show
    torch.save(pretrained.state_dict(), tmp_path / "pre.pt")
    cfg = tiny_config(
        tiny,
        tmp_path,
        model={"name": "resnet20", "weights": str(tmp_path / "pre.pt"), "freeze": mode, "backbone_lr_scale": 0.1},
        train={"epochs": 1},
    )
    model = train(config_from_dict(cfg), quiet=True).model.cpu()
    before, after = pretrained.state_dict(), model.state_dict()
    frozen_prefixes = ("conv1", "bn1", "layer1", "layer2") if mode == "stages:2" else ("conv1", "bn1", "layer")
    for key, value in after.items():
        if key.startswith("fc."):
            assert value.shape[0] == 3  # the new 3-class head
            continue
        if key.startswith(frozen_prefixes):
            assert torch.equal(value, before[key]), f"{mode}: frozen {key} changed"
        elif key.endswith(("weight", "running_mean")):
            assert not torch.equal(value, before[key]), f"{mode}: trainable {key} did not change"
    assert not torch.equal(after["fc.weight"], create_model("resnet20", num_classes=3).fc.weight)


def test_cli_train_set_and_resume(tiny, tmp_path, capsys):
    import yaml

    from resnetkit.cli import main

    path = tmp_path / "cli.yaml"
    cfg = tiny_config(tiny, tmp_path)
    cfg.pop("name")
    path.write_text(yaml.safe_dump(cfg))
    adamw = ["--set", "optim.name=adamw", "--set", "optim.lr=0.001"]
    assert main(["train", "--config", str(path), "--set", "train.epochs=1", *adamw]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and f"outputs in {tmp_path / 'cli'}" in out
    saved = yaml.safe_load((tmp_path / "cli/config.yaml").read_text())
    assert saved["optim"]["name"] == "adamw" and saved["train"]["epochs"] == 1
    assert main(["train", "--config", str(path), "--set", "train.epochs=2", "--resume"]) == 2
    assert "trained with optim.name='adamw' but the config says 'sgd'" in capsys.readouterr().err
    assert main(["train", "--config", str(path), "--set", "train.epochs=2", *adamw, "--resume"]) == 0
    assert "resumed" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "cli/last.pt")["epoch"] == 2
    assert main(["train", "--config", str(path), "--set", "name=other", "--resume"]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_optimisation_flags_together(tiny, tmp_path):
    """bf16 autocast, channels_last, accumulation, clipping, smoothing, cutmix+mixup, EMA, plateau with warmup."""
    cfg = tiny_config(
        tiny,
        tmp_path,
        data={"mixup_alpha": 0.2, "cutmix_alpha": 1.0},
        optim={"name": "adamw", "lr": 0.003, "weight_decay": 0.05},
        schedule={"name": "plateau", "per": "epoch", "warmup": 1, "patience": 0},
        train={
            "amp": "bf16",
            "channels_last": True,
            "accum_steps": 2,
            "grad_clip": 1.0,
            "label_smoothing": 0.1,
            "ema": True,
            "metric": "val_loss",
        },
    )
    result = train(config_from_dict(cfg), quiet=True)
    ckpt = load_checkpoint(result.last_checkpoint)
    assert ckpt["global_step"] == 2 * 3  # 6 batches per epoch, 2 per optimizer step
    assert ckpt["best"] == min(
        json.loads(line)["val_loss"] for line in (tmp_path / "tiny/metrics.jsonl").read_text().splitlines()
    )
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_amp_auto_picks_bf16_only_on_a_cpu_with_bf16_in_hardware(tiny, tmp_path, monkeypatch):
    """train.amp auto: bf16 autocast where the CPU has AMX tiles or AVX512-BF16, fp32 elsewhere; explicit values stay
    as set."""
    cpu = torch.device("cpu")
    for amx, avx512_bf16 in ((True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda has=avx512_bf16: has)
        assert resolve_amp("auto", cpu) == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    for amx, expected in ((True, "bf16"), (False, "none")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        assert resolve_amp("auto", cpu) == expected
        assert [resolve_amp(a, cpu) for a in ("none", "bf16", "fp16")] == ["none", "bf16", "fp16"]
        with autocast(cpu, "auto"):
            y = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
        assert y.dtype == (torch.bfloat16 if amx else torch.float32)
        cfg = tiny_config(tiny, tmp_path, name=f"auto_{expected}", train={"amp": "auto", "epochs": 1})
        result = train(config_from_dict(cfg), quiet=True)
        log = (result.run_dir / "train.log").read_text()
        assert f"mixed precision {expected} (train.amp auto)" in log
        assert load_checkpoint(result.last_checkpoint)["config"]["train"]["amp"] == "auto"  # resolved per machine


KEEP_FREED = """
import ctypes, torch
from resnetkit.train.loop import keep_freed_memory

class MallInfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def free_in_heap():  # bytes malloc holds free for reuse, after a 64 MB tensor is freed
    x = torch.ones(64 << 20, dtype=torch.uint8)
    del x
    return libc.mallinfo2().fordblks

before = free_in_heap()
applied = keep_freed_memory()
print(applied, before, free_in_heap())
"""


def test_keep_freed_memory_keeps_a_freed_block_for_reuse():
    """glibc returns a freed 64 MB block to the OS at once; after keep_freed_memory it stays in the heap (in a
    process of its own: the setting is process-wide)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", KEEP_FREED], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    applied, before, after = done.stdout.split()
    assert applied == "True" and int(before) < 64 << 20 <= int(after), done.stdout


BATCH_MEMORY = """
import resource, torch
from resnetkit.data.transforms import normalize
from resnetkit.train.loop import keep_freed_memory

keep_freed_memory()
x = torch.randint(0, 256, (32, 3, 448, 448), dtype=torch.uint8)  # a CUB batch: 77 MB of floats
held = None
for i in range(8):  # each batch made while the previous one is held, as in a training loop
    if i == 4:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = normalize(x, [0.5] * 3, [0.25] * 3)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


def test_normalised_batches_reuse_freed_memory():
    """normalize's CPU batches come from malloc, which under keep_freed_memory hands back a freed block of the same
    size; torch's own (64-byte-aligned) blocks got fresh pages most times: 18,816 page faults per 77 MB batch."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", BATCH_MEMORY], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 2000, done.stdout  # four batches: 75,000 faults on fresh pages


def test_the_engine_keeps_freed_memory_unless_the_recipe_says_not(tiny, tmp_path, monkeypatch):
    import resnetkit.train.fit as fit

    for keep in (True, False):
        calls: list[int] = []
        monkeypatch.setattr(fit, "keep_freed_memory", lambda calls=calls: calls.append(1) or True)
        cfg = tiny_config(tiny, tmp_path, name=f"keep_{keep}", train={"epochs": 1, "keep_freed_memory": keep})
        train(config_from_dict(cfg), quiet=True)
        assert calls == ([1] if keep else [])


def test_classification_without_validation(tiny, tmp_path):
    """data.val_split "" trains without a validation split, as detection and segmentation already do."""
    result = train(
        config_from_dict(tiny_config(tiny, tmp_path, data={"val_split": ""}, train={"epochs": 1})), quiet=True
    )
    rows = [json.loads(line) for line in (tmp_path / "tiny/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and "train_loss" in rows[0] and not any(k.startswith("val_") for k in rows[0])
    assert result.last_checkpoint is not None and result.best_checkpoint is None  # no metric to choose a best by
    assert "train / 0 val images" in (tmp_path / "tiny/train.log").read_text()
