"""CSV/TSV listings of real CIFAR-10 JPEGs: columns found or named, single- and multi-label, splits from a column
or from data.val_fraction, and every bad row in one error."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from resnetkit.config import config_from_dict
from resnetkit.data import build_dataset, build_loader
from resnetkit.data.splits import prepare_splits, write_lists
from resnetkit.data.transforms import IMAGENET_MEAN


def link_images(cifar10_jpg: Path, root: Path, per_class: int) -> list[tuple[str, str]]:
    """(relative path, class) of per_class real training JPEGs of each class, linked under root/img/<class>/."""
    rows = []
    for class_dir in sorted((cifar10_jpg / "train").iterdir()):
        (root / "img" / class_dir.name).mkdir(parents=True)
        for i in range(per_class):
            rel = f"img/{class_dir.name}/{i:04d}.jpg"
            (root / rel).symlink_to(class_dir / f"{i:04d}.jpg")
            rows.append((rel, class_dir.name))
    return rows


def write_table(path: Path, header: list[str], rows: list[list], delimiter: str = ",") -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_single_label_csv_with_split_column(cifar10_jpg, tmp_path):
    rows = link_images(cifar10_jpg, tmp_path, 4)
    table = [[rel, label, "train" if i % 4 else "valid"] for i, (rel, label) in enumerate(rows)]
    listing = write_table(tmp_path / "labels.csv", ["filename", "label", "split"], table)
    train, val = build_dataset(listing, "train"), build_dataset(listing, "val")
    assert (len(train), len(val)) == (30, 10) and not train.multilabel
    assert train.classes == sorted({label for _, label in rows}) == val.classes
    image, label = val[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and val.classes[label] == rows[0][1]
    assert train.relative_paths()[0] == rows[1][0]  # what split lists name: the path as the listing writes it
    with pytest.raises(ValueError, match="no rows of split 'test'.*train, val"):
        build_dataset(listing, "test")
    # Named columns, in a TSV, through the fast loader (the tensor cache) with the listing's own statistics.
    tsv = write_table(tmp_path / "x.tsv", ["img", "cls"], [[r, c] for r, c in rows], delimiter="\t")
    loader = build_loader(
        tsv,
        "train",
        preset="cifar",
        batch_size=8,
        train=True,
        workers=0,
        cache_dir=tmp_path / "cache",
        columns={"path_column": "img", "label_column": "cls"},
    )
    images, labels = next(iter(loader))
    assert images.shape == (8, 3, 32, 32) and labels.dtype == torch.int64 and loader.num_samples == 40
    assert tuple(loader.preprocess["mean"]) != tuple(IMAGENET_MEAN)  # measured on these images, not ImageNet's
    with pytest.raises(ValueError, match="data.path_column 'image_file' is not a column.*columns: img, cls"):
        build_dataset(tsv, "train", columns={"path_column": "image_file"})


def test_multilabel_csv_separator_and_class_columns(cifar10_jpg, tmp_path):
    rows = link_images(cifar10_jpg, tmp_path, 2)
    # Made-up tags: each image's class, plus "vehicle" for the vehicles (several labels per image).
    vehicles = {"airplane", "automobile", "ship", "truck"}
    tags = [[rel, f"{c};vehicle" if c in vehicles else c] for rel, c in rows]
    listing = write_table(tmp_path / "tags.csv", ["path", "labels"], tags)
    ds = build_dataset(listing, "train", columns={"multilabel": True})
    assert ds.multilabel and "vehicle" in ds.classes and len(ds.classes) == 11
    truck = next(i for i, (_, c) in enumerate(rows) if c == "truck")
    assert [ds.classes[k] for k in ds.label_sets[truck]] == ["truck", "vehicle"]
    image, target = ds[truck]
    assert target.dtype == torch.float32 and torch.nonzero(target).flatten().tolist() == ds.label_sets[truck]
    with pytest.raises(AttributeError):
        ds.targets  # noqa: B018 - a multi-label listing has label sets, not one target per image
    # One 0/1 column per class (every column but the path): multi-label without saying so.
    onehot = write_table(
        tmp_path / "onehot.csv",
        ["path", "animal", "vehicle"],
        [[rel, int(c not in vehicles), int(c in vehicles)] for rel, c in rows],
    )
    cols = build_dataset(onehot, "train")
    assert cols.multilabel and cols.classes == ["animal", "vehicle"]
    assert cols.label_sets[truck] == [1] and cols.label_sets[0] == [1]  # rows[0] is an airplane
    loader = build_loader(onehot, "train", preset="cifar", batch_size=4, train=True, workers=0, fast=False)
    _, targets = next(iter(loader))
    assert targets.shape == (4, 2) and targets.dtype == torch.float32 and (targets.sum(1) == 1).all()
    # Split lists (data.val_fraction's) select from a listing as from a folder.
    write_lists(tmp_path / "lists", cols, {"train": list(range(0, 20, 2)), "val": [1, 3]}, {})
    val = build_dataset(onehot, "val", splits=tmp_path / "lists")
    assert val.relative_paths() == [rows[1][0], rows[3][0]] and val.label_sets == [cols.label_sets[1]] * 2
    # data.val_fraction on a listing without a split column: multi-label rows stratified by their labels.
    cfg = config_from_dict({"data": {"name": str(onehot), "val_fraction": 0.2}})
    cfg = prepare_splits(cfg, tmp_path / "run", resume=False, write=True)
    val = build_dataset(onehot, "val", splits=cfg.data.splits)
    assert len(val) == 4 and sorted(c for s in val.label_sets for c in s) == [0, 0, 1, 1]  # 2 animals, 2 vehicles
    assert (tmp_path / "run" / "splits" / "val.txt").read_text().startswith("img/")  # relative to the listing


def test_bad_rows_are_reported_together_with_their_lines(cifar10_jpg, tmp_path):
    rows = link_images(cifar10_jpg, tmp_path, 1)
    table = [[rel, c, "train"] for rel, c in rows]
    table[1][0] = "img/cat/missing.jpg"  # line 3
    table[3][2] = "tset"  # line 5
    table[5][1] = ""  # line 7
    listing = write_table(tmp_path / "bad.csv", ["path", "label", "split"], table)
    with pytest.raises(ValueError) as info:
        build_dataset(listing, "train")
    message = str(info.value)
    assert message.startswith(f"{listing}: 3 bad row(s)")
    assert f"{listing}:3: image 'img/cat/missing.jpg' not found" in message
    assert f"{listing}:5: unknown split 'tset'" in message
    assert f"{listing}:7: empty label in column 'label'" in message
    onehot = write_table(tmp_path / "bad01.csv", ["path", "cat", "dog"], [[rows[0][0], 1, 0], [rows[1][0], 2, "yes"]])
    with pytest.raises(ValueError, match=r"bad01.csv:3: class columns must hold 0 or 1, got cat='2', dog='yes'"):
        build_dataset(onehot, "train")
    nolabel = write_table(tmp_path / "nolabel.csv", ["path"], [[rows[0][0]]])
    with pytest.raises(ValueError, match="no label column"):
        build_dataset(nolabel, "train")
