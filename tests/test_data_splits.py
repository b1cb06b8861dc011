"""Splits of one collection (data.val_fraction, iterative stratification) and the class-balanced sampler."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from resnetkit.checkpoint import load_checkpoint
from resnetkit.config import config_from_dict
from resnetkit.data import build_loader
from resnetkit.data.loader import Loader, _mix
from resnetkit.data.splits import iterative_stratification
from resnetkit.evaluation.evaluate import evaluate
from resnetkit.train.fit import train


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def flat_cifar(cifar10_jpg: Path, root: Path, per_class: int) -> Path:
    """A folder of class folders (no train/ or val/) of real CIFAR-10 training JPEGs, linked."""
    for class_dir in sorted((cifar10_jpg / "train").iterdir()):
        (root / class_dir.name).mkdir(parents=True)
        for i in range(per_class):
            (root / class_dir.name / f"{i:04d}.jpg").symlink_to(class_dir / f"{i:04d}.jpg")
    return root


def test_iterative_stratification_spreads_every_label_and_sizes_exactly():
    rng = np.random.default_rng(0)
    # 600 items, 6 labels of very different frequencies (one in 3% of the items), 1-3 labels each, some unlabelled.
    freq = np.array([0.5, 0.3, 0.2, 0.1, 0.05, 0.03])
    sets = [sorted(np.flatnonzero(rng.random(6) < freq).tolist()) for _ in range(600)]
    parts = iterative_stratification(sets, 6, [0.6, 0.2, 0.2], seed=1)
    assert Counter(parts.tolist()) == {0: 360, 1: 120, 2: 120}  # each part exactly its share
    for label in range(6):
        holders = [p for s, p in zip(sets, parts) if label in s]
        counts = Counter(holders)
        for part, share in enumerate((0.6, 0.2, 0.2)):
            assert abs(counts[part] - share * len(holders)) <= 2, (label, counts, len(holders))
    assert np.array_equal(parts, iterative_stratification(sets, 6, [0.6, 0.2, 0.2], seed=1))
    assert not np.array_equal(parts, iterative_stratification(sets, 6, [0.6, 0.2, 0.2], seed=2))
    # Single-label: each class split as close to 80/20 as whole items allow (7 -> 6 + 1, 3 -> 2 + 1).
    single = iterative_stratification([[c] for c in [0] * 50 + [1] * 7 + [2] * 3], 3, [0.8, 0.2], seed=0)
    assert Counter(single[50:57].tolist()) == {0: 6, 1: 1} and Counter(single[57:].tolist()) == {0: 2, 1: 1}


def test_flat_folder_val_fraction_is_stratified_reused_on_resume_and_by_eval(cifar10_jpg, tmp_path):
    flat = flat_cifar(cifar10_jpg, tmp_path / "flat", per_class=10)
    cfg = {
        "name": "flat",
        "output_dir": str(tmp_path / "runs"),
        "model": {"name": "resnet20"},
        "data": {"name": str(flat), "batch_size": 10, "workers": 0, "cache_dir": str(tmp_path / "cache")},
        "optim": {"lr": 0.05},
        "train": {"epochs": 1, "log_every_s": 0.0, "log_images": False},
    }
    with pytest.raises(FileNotFoundError, match="set data.val_fraction"):
        train(config_from_dict(cfg), quiet=True)
    cfg["data"].update(val_fraction=0.2, test_fraction=0.1)
    cfg["name"] = "flat2"
    result = train(config_from_dict(cfg), quiet=True)
    splits = result.run_dir / "splits"
    lists = {s: (splits / f"{s}.txt").read_text().splitlines() for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in lists.items()} == {"train": 70, "val": 20, "test": 10}
    assert not set(lists["train"]) & set(lists["val"]) and not set(lists["val"]) & set(lists["test"])
    assert sorted(sum(lists.values(), [])) == sorted(f"{c.name}/{f.name}" for c in flat.iterdir() for f in c.iterdir())
    for split, per_class in (("train", 7), ("val", 2), ("test", 1)):  # stratified: every class its share
        assert Counter(p.split("/")[0] for p in lists[split]) == {c.name: per_class for c in flat.iterdir()}
    assert json.loads((splits / "split.json").read_text())["sizes"] == {"train": 70, "val": 20, "test": 10}
    assert "70 train / 20 val images" in (result.run_dir / "train.log").read_text()

    # A resumed run (one epoch more) reads the same lists: not rewritten, and its checkpoint names them.
    stamps = {p.name: p.stat().st_mtime_ns for p in splits.iterdir()}
    cfg["train"]["epochs"] = 2
    resumed = train(config_from_dict(cfg), resume=True, quiet=True)
    assert {p.name: p.stat().st_mtime_ns for p in splits.iterdir()} == stamps
    ckpt = load_checkpoint(resumed.last_checkpoint)
    assert ckpt["config"]["data"]["splits"] == str(splits.resolve()) and ckpt["epoch"] == 2
    with pytest.raises(ValueError, match="val_fraction"):  # a resume that would cut another split is refused
        cfg["data"]["val_fraction"] = 0.3
        train(config_from_dict(cfg), resume=True, quiet=True)

    # eval with the checkpoint's data: exactly the listed images, even after the run folder moved.
    moved = shutil.move(str(result.run_dir), str(tmp_path / "moved"))
    val = evaluate(Path(moved) / "best.pt", split="val", workers=0, device="cpu")
    test = evaluate(Path(moved) / "best.pt", split="test", workers=0, device="cpu")
    assert val["num_samples"] == 20 and test["num_samples"] == 10
    assert [c["support"] for c in val["per_class"]] == [2] * 10


def small_folder(root: Path, counts: dict[str, int]) -> Path:
    """class folders of tiny PNGs, each image's pixels telling its class and number apart."""
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = np.full((32, 32, 3), (c * 60, i * 4 % 256, 0), dtype=np.uint8)
            pixels[..., 2] = np.arange(32, dtype=np.uint8) * 8  # a ramp: an asymmetric image, flips show
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("fast", [True, False])
def test_balanced_sampler_draws_each_class_equally_and_resumes_exactly(fast, tmp_path):
    root = small_folder(tmp_path / "imbalanced", {"common": 40, "rare": 8, "rarest": 3})
    splits = tmp_path / "lists"
    splits.mkdir()
    (splits / "train.txt").write_text(
        "".join(f"{c}/{f.name}\n" for c in ("common", "rare", "rarest") for f in sorted((root / c).iterdir()))
    )
    common = dict(
        preset="cifar",
        batch_size=3,
        train=True,
        fast=fast,
        workers=0,
        cache_dir=tmp_path / "cache",
        seed=3,
        splits=splits,
        sampler="balanced",
    )
    loader = build_loader(str(root), "train", **common)
    drawn: Counter = Counter()
    rarest = set()  # the augmented images of the 3-image class: its 17 draws an epoch are augmented afresh
    for epoch in range(4):
        loader.set_epoch(epoch)
        for images, labels in loader:
            drawn.update(labels.tolist())
            rarest |= {x.numpy().tobytes() for x in images[labels == 2]}
    assert drawn == {0: 68, 1: 68, 2: 68}  # 17 draws of each class in each epoch of 51
    assert len(rarest) > 20
    plain = build_loader(str(root), "train", **{**common, "sampler": "none"})
    assert Counter(torch.cat([t for _, t in plain]).tolist()) == {0: 40, 1: 8, 2: 3}

    # Resume mid-epoch: a new loader from the state after 3 batches gives the same remaining batches.
    loader.set_epoch(5)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    rest = list(it)
    again = build_loader(str(root), "train", **common)
    again.load_state_dict(state)
    again.set_epoch(5)
    rest_again = list(again)
    assert len(rest) == len(rest_again) == 14
    for (x, y), (x2, y2) in zip(rest, rest_again):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    plain_state = plain.state_dict()
    with pytest.raises(ValueError, match="sampler"):
        again.load_state_dict(plain_state)


def test_balanced_plan_shards_across_ranks_and_weights_multilabel_by_rarest_label():
    # Multi-label: 30 images of {0}, 10 of {0, 1}, 5 of {2}: grouped under their rarest label -> 0, 1, 2.
    sets = [[0]] * 30 + [[0, 1]] * 10 + [[2]] * 5
    ranks = []
    for rank in range(2):
        loader = Loader(45, 4, True, 7, rank, 2, ["a", "b", "c"], {}, torch.device("cpu"))
        loader.balance(sets)
        loader.set_epoch(1)
        ranks.append(torch.cat(loader.plan()))
    groups = [0] * 30 + [1] * 10 + [2] * 5
    whole = Loader(45, 4, True, 7, 0, 1, ["a", "b", "c"], {}, torch.device("cpu"))
    whole.balance(sets)
    whole.set_epoch(1)
    g = torch.Generator().manual_seed(_mix(7, 1))  # the generator plan() draws epoch 1 from
    order = whole._epoch_order(g)
    assert Counter(groups[i] for i in order.tolist()) == {0: 15, 1: 15, 2: 15}
    # Each rank gets every other draw of the same epoch order (22 each, 20 in full batches), disjoint positions.
    assert torch.equal(ranks[0], order[0::2][:20]) and torch.equal(ranks[1], order[1::2][:20])


def test_compare_runs_share_one_set_of_split_lists(cifar10_jpg, tmp_path):
    from resnetkit.study.compare import compare

    flat = flat_cifar(cifar10_jpg, tmp_path / "flat", per_class=5)
    base = {
        "name": "cmp",
        "output_dir": str(tmp_path / "runs"),
        "model": {"name": "resnet20"},
        "data": {"name": str(flat), "batch_size": 8, "workers": 0, "val_fraction": 0.2},
        "optim": {"lr": 0.05},
        "train": {"epochs": 1, "log_every_s": 60, "log_images": False},
    }
    base["data"]["cache_dir"] = str(tmp_path / "cache")
    # Even runs that vary the seed see the same images: the lists are cut once, in the comparison's folder.
    result = compare(config_from_dict(base), {"seed": [0, 1]}, quiet=True)
    shared = (tmp_path / "runs" / "cmp-compare" / "splits").resolve()
    assert (shared / "val.txt").read_text().count("\n") == 10
    for run in result.runs:
        saved = yaml.safe_load((run.run_dir / "config.yaml").read_text())
        assert saved["data"]["splits"] == str(shared) and not (run.run_dir / "splits").exists()
        assert "40 train / 10 val images" in (run.run_dir / "train.log").read_text()
    again = compare(config_from_dict(base), {"seed": [0, 1]}, quiet=True)  # the same recipe: both runs reused
    assert [r.status for r in again.runs] == ["reused", "reused"]
