"""Multi-label data: shapes-multi (labels, boxes and masks of the same shapes) and CIFAR-10 mosaics of the real
JPEGs, through build_dataset and both loaders."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from resnetkit.data import build_dataset, build_loader
from resnetkit.data.synthetic import SHAPE_CLASSES


def test_shapes_multi_items_boxes_masks_agree():
    ds = build_dataset("shapes-multi:200", "train")
    assert ds.multilabel and ds.classes == SHAPE_CLASSES and len(ds) == 200
    counts = Counter(len(s) for s in ds.label_sets)
    assert set(counts) == {1, 2, 3, 4}  # 1 to 4 shapes per image, each count common
    assert min(counts.values()) > 25
    for i in range(30):
        image, target = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
        assert target.dtype == torch.float32 and target.shape == (10,)
        assert torch.flatnonzero(target).tolist() == ds.label_sets[i]
        boxes, labels, mask = ds.boxes(i), ds.box_labels(i), ds.mask(i)
        assert boxes.dtype == torch.float32 and boxes.shape == (len(labels), 4)
        assert labels.dtype == torch.int64 and sorted(labels.tolist()) == ds.label_sets[i]  # different classes
        assert mask.dtype == torch.int64 and mask.shape == (64, 64)
        assert set(mask.unique().tolist()) == {0, *(labels + 1).tolist()}
        for box, label in zip(boxes, labels):
            x0, y0, x1, y1 = box.tolist()
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            ys, xs = torch.nonzero(mask == label + 1, as_tuple=True)
            # The mask's pixels (pixel i spans [i, i + 1)) lie inside the box, and fill it to within a pixel.
            assert xs.min() >= x0 - 1 and xs.max() + 1 <= x1 + 1 and ys.min() >= y0 - 1 and ys.max() + 1 <= y1 + 1
            assert xs.min() <= x0 + 3 and xs.max() + 1 >= x1 - 3  # (a star's thin tips cover under half a pixel)
        # The shapes' pixels differ from the background's: the image shows what the mask says.
        assert (image.float().std((1, 2)) > 0).all()


def test_shapes_multi_is_deterministic_with_distinct_splits():
    a, b = build_dataset("shapes-multi:50", "train"), build_dataset("shapes-multi:50", "train")
    assert a.label_sets == b.label_sets and torch.equal(a[7][0], b[7][0]) and torch.equal(a.mask(7), b.mask(7))
    splits = {s: build_dataset("shapes-multi:50", s) for s in ("train", "val", "test")}
    assert len(splits["val"]) == len(splits["test"]) == 10
    firsts = [splits[s][0][0] for s in splits]
    assert not torch.equal(firsts[0], firsts[1]) and not torch.equal(firsts[1], firsts[2])
    big = build_dataset("shapes-multi:50", "train", image_size=96)
    assert big[3][0].shape == (3, 96, 96) and big.label_sets == a.label_sets  # labels do not depend on the size
    assert torch.allclose(big.boxes(3), a.boxes(3) * 1.5, atol=1e-3)
    with pytest.raises(ValueError, match="shapes-multi:N"):
        build_dataset("shapes-multi:few")


@pytest.mark.parametrize("fast", [True, False])
def test_loaders_carry_multi_hot_targets(fast, tmp_path):
    loader = build_loader(
        "shapes-multi:60",
        "train",
        preset="cifar",
        batch_size=16,
        train=True,
        fast=fast,
        workers=0,
        cache_dir=tmp_path,
        seed=1,
    )
    ds = build_dataset("shapes-multi:60", "train")
    truth = torch.stack([ds.target(i) for i in range(len(ds))])
    plan = torch.cat(loader.plan())
    seen = []
    for images, targets in loader:
        assert images.shape == (16, 3, 64, 64) and images.dtype == torch.float32
        assert targets.shape == (16, 10) and targets.dtype == torch.float32
        seen.append(targets)
    # Augmentation (crops and flips) keeps the image-level targets: each row is its sample's multi-hot row.
    assert torch.equal(torch.cat(seen), truth[plan])
    val = build_loader(
        "shapes-multi:60",
        "val",
        preset=loader.preprocess,
        batch_size=8,
        train=False,
        fast=fast,
        workers=0,
        cache_dir=tmp_path,
    )
    rows = torch.cat([t for _, t in val])
    assert rows.shape == (12, 10)
    sub = build_loader(
        "shapes-multi:60",
        "train",
        preset="cifar",
        batch_size=8,
        train=True,
        fast=fast,
        workers=0,
        cache_dir=tmp_path,
        subset=30,
    )
    assert sub.num_samples == 30


def test_cifar10_mosaics_of_real_jpegs(cifar10_jpg, tmp_path):
    train = build_dataset(f"cifar10-mosaic:{cifar10_jpg}:40", "train")
    test = build_dataset(f"cifar10-mosaic:{cifar10_jpg}:40", "test")
    val = build_dataset(f"cifar10-mosaic:{cifar10_jpg}:40", "val")
    assert train.multilabel and len(train) == 40 and len(test) == len(val) == 10
    assert train.classes == sorted(p.name for p in (cifar10_jpg / "train").iterdir())
    # Tiles come from the matching split, four distinct images, and the labels are their classes.
    for ds, folder in ((train, "train"), (test, "test")):
        for i in range(len(ds)):
            paths = ds.paths(i)
            assert len(set(paths)) == 4 and all(f"/{folder}/" in p for p in paths)
            assert ds.label_sets[i] == sorted({ds.classes.index(p.split("/")[-2]) for p in paths})
    image, target = train[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    assert torch.flatnonzero(target).tolist() == train.label_sets[0]
    tile = train.source.load(train.tiles[0][3])  # the bottom-right tile, decoded by the one decoder
    assert torch.equal(image[:, 32:, 32:], tile)
    again = build_dataset(f"cifar10-mosaic:{cifar10_jpg}:40", "train")
    assert again.tiles == train.tiles and torch.equal(again[5][0], train[5][0])
    for fast in (True, False):
        loader = build_loader(
            f"cifar10-mosaic:{cifar10_jpg}:40",
            "train",
            preset="cifar",
            batch_size=8,
            train=True,
            fast=fast,
            workers=0,
            cache_dir=tmp_path,
        )
        images, targets = next(iter(loader))
        assert images.shape == (8, 3, 64, 64) and targets.shape == (8, 10)
        assert (targets.sum(1) >= 1).all() and (targets.sum(1) <= 4).all()
    with pytest.raises(FileNotFoundError, match="cifar10-jpg tree"):
        build_dataset(f"cifar10-mosaic:{tmp_path / 'nowhere'}", "train")
