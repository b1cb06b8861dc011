"""data.pixel_cache: image files decoded once (at full size, or with the transform's fixed resize done) into an
uncompressed cache read through a memory map. Batches read from it are the batches decoded from the files, bit for
bit; bad files are reported as without it; the cache is reused while the files are unchanged, rebuilt when it is
damaged, and refused when the disk is too small."""

from __future__ import annotations

import logging
import os
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

from resnetkit.config import config_from_dict
from resnetkit.data import build_loader
from resnetkit.data import fast as fastlib
from resnetkit.data.datasets import ImageFolder
from resnetkit.data.image import BadImageError, decode_image
from resnetkit.data.transforms import TrimAspect, fixed_head


def photo_folder(imagenet_sample: Path, root: Path, per_class: int = 3) -> Path:
    """root/train/{a,b}/ with links to real ImageNet photos, and one file that is not an image."""
    photos = sorted(imagenet_sample.glob("*.JPEG"))
    for c, name in enumerate("ab"):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for p in photos[c * per_class : (c + 1) * per_class]:
            (folder / p.name).symlink_to(p)
    (root / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg at all")
    return root


@pytest.mark.parametrize(("preset", "train"), [("imagenet", True), ("imagenet", False), ("cub448", True)])
def test_batches_from_the_pixel_cache_equal_the_batches_decoded_from_the_files(cub_root, tmp_path, preset, train):
    options = dict(preset=preset, batch_size=6, train=train, workers=0, subset=18, seed=3, cache_dir=tmp_path)
    files = build_loader(cub_root, "train", **options)
    cached = build_loader(cub_root, "train", pixel_cache=True, **options)
    assert files.dataset.pixels is None and isinstance(cached.dataset.pixels, fastlib.PixelCache)
    assert len(list((tmp_path / "pixels").glob("*.u8"))) == 1
    for epoch in (0, 1):  # training: the random crops and flips of two epochs
        files.set_epoch(epoch)
        cached.set_epoch(epoch)
        pairs = list(zip(files, cached, strict=True))
        assert len(pairs) == 3
        for (a, labels_a), (b, labels_b) in pairs:
            assert torch.equal(a, b) and torch.equal(labels_a, labels_b)


FIXED = [("cub448", True, 512), ("imagenet", False, 256), ("imagenet", True, 0)]


@pytest.mark.parametrize(("preset", "train", "side"), FIXED)
def test_the_cache_stores_images_with_the_transforms_fixed_first_steps_done(cub_root, tmp_path, preset, train, side):
    """cub448 (training and evaluation) and imagenet evaluation start with the same resize for every image: the cache
    holds the images resized, and the workers' transform leaves it out (the batches are the same bits: the test
    above); the imagenet training crop needs the full image."""
    options = dict(preset=preset, batch_size=6, train=train, workers=0, subset=12, seed=3, cache_dir=tmp_path)
    loader = build_loader(cub_root, "train", pixel_cache=True, **options)
    cache, dataset = loader.dataset.pixels, loader.dataset
    assert cache.head == [repr(step) for step in fixed_head(loader.preprocess, train)]
    head = fixed_head(loader.preprocess, train)
    assert cache.path.stat().st_size == fastlib._pixel_bytes(dataset, head)  # the disk check's estimate
    if not side:
        full = [list(decode_image(path).shape) for path, _ in dataset.samples]
        assert cache.head == [] and cache.shapes == full
        return
    assert all(min(shape[1:]) == side for shape in cache.shapes)
    for augmenting in (True, False):
        loader.set_augmentation(augmenting)
        assert not any(isinstance(step, (v2.Resize, TrimAspect)) for step in dataset.transform.transforms)


def test_the_cache_holds_each_decoded_image_and_cuts_regions_from_it(imagenet_sample, tmp_path):
    dataset = ImageFolder(photo_folder(imagenet_sample, tmp_path / "data") / "train")
    cache = fastlib.pixel_cache(dataset, tmp_path / "cache")
    assert len(cache) == len(dataset.samples) == 7
    for i, (path, _) in enumerate(dataset.samples):
        if path.endswith("broken.jpg"):
            assert cache.size(i) is None
            with pytest.raises(BadImageError, match="broken.jpg"):
                cache.read(i, path)
            continue
        full = decode_image(path)
        assert cache.size(i) == (full.shape[2], full.shape[1])
        assert torch.equal(cache.read(i, path), full)
        assert torch.equal(cache.read(i, path, (10, 20, 100, 150)), full[:, 10:110, 20:170])
    pixels = sum(s[0] * s[1] * s[2] for s in cache.shapes if s)
    assert cache.path.parent == tmp_path / "cache" / "pixels" and cache.path.stat().st_size == pixels


def test_a_training_loader_over_files_names_the_cache_when_it_is_off(imagenet_sample, tmp_path, caplog):
    root = photo_folder(imagenet_sample, tmp_path / "data")
    options = dict(preset="imagenet", batch_size=4, workers=0, cache_dir=tmp_path / "cache")
    for pixel_cache, train, hinted in ((False, True, True), (True, True, False), (False, False, False)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="resnetkit"):
            build_loader(root, "train", train=train, pixel_cache=pixel_cache, **options)
        assert ("each epoch decodes the 7 image files again" in caplog.text) == hinted, (pixel_cache, train)


def test_a_bad_file_is_reported_once_and_strict_names_it(imagenet_sample, tmp_path, caplog):
    root = photo_folder(imagenet_sample, tmp_path / "data")
    options = dict(preset="imagenet", batch_size=4, train=False, workers=0, cache_dir=tmp_path / "cache")
    loader = build_loader(root, "train", pixel_cache=True, **options)
    with caplog.at_level(logging.WARNING, logger="resnetkit"):
        count = sum(len(labels) for _, labels in loader)
    assert count == 6 and [Path(p).name for p, _ in loader.skipped] == ["broken.jpg"]
    assert "skipped 1 of 7" in caplog.text
    strict = build_loader(root, "train", pixel_cache=True, strict=True, **options)
    with pytest.raises(BadImageError, match="broken.jpg"):
        list(strict)


def test_the_cache_is_reused_rebuilt_when_damaged_and_keyed_by_the_files(imagenet_sample, tmp_path, caplog):
    root = photo_folder(imagenet_sample, tmp_path / "data")
    cache_dir = tmp_path / "cache"
    first = fastlib.pixel_cache(ImageFolder(root / "train"), cache_dir)
    written = first.path.stat().st_mtime_ns
    again = fastlib.pixel_cache(ImageFolder(root / "train"), cache_dir)
    assert again.path == first.path and again.path.stat().st_mtime_ns == written  # read, not rebuilt
    with open(first.path, "r+b") as f:  # a pixel file cut short (a full disk, a copy interrupted)
        f.truncate(1000)
    with caplog.at_level(logging.WARNING, logger="resnetkit"):
        rebuilt = fastlib.pixel_cache(ImageFolder(root / "train"), cache_dir)
    assert "rebuilding" in caplog.text and rebuilt.path.stat().st_size == first.path.stat().st_size > 1000
    path = next(p for p, _ in ImageFolder(root / "train").samples if not p.endswith("broken.jpg"))
    index = {p: i for i, (p, _) in enumerate(ImageFolder(root / "train").samples)}
    assert torch.equal(rebuilt.read(index[path], path), decode_image(path))
    link = root / "train" / "b" / sorted(os.listdir(root / "train" / "b"))[0]
    link.unlink()
    link.symlink_to(sorted(imagenet_sample.glob("*.JPEG"))[10])  # the same name, another photo (another size)
    changed = fastlib.pixel_cache(ImageFolder(root / "train"), cache_dir)
    assert changed.path != first.path


def test_a_disk_too_small_for_the_cache_is_one_clear_error(imagenet_sample, tmp_path, monkeypatch):
    root = photo_folder(imagenet_sample, tmp_path / "data")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(fastlib.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**5, 10**5))
    with pytest.raises(ValueError, match=r"data.pixel_cache: the 7 decoded images need 0\.0 GB.*data.cache_dir"):
        fastlib.pixel_cache(ImageFolder(root / "train"), tmp_path / "cache")
    assert not list((tmp_path / "cache" / "pixels").glob("*"))


def test_the_recipe_key_reaches_the_training_and_validation_loaders(imagenet_sample, tmp_path):
    from resnetkit.tasks import get_task
    from resnetkit.train.distributed import DistInfo

    root = photo_folder(imagenet_sample, tmp_path / "data")
    (root / "train" / "a" / "broken.jpg").unlink()
    (root / "val").symlink_to(root / "train")
    cfg = config_from_dict(
        {
            "model": {"name": "resnet18"},
            "data": {
                "name": str(root),
                "preset": "imagenet",
                "val_split": "val",
                "batch_size": 2,
                "workers": 0,
                "pixel_cache": True,
                "cache_dir": str(tmp_path / "cache"),
            },
        }
    )
    train, val = get_task("classification").build_loaders(cfg, DistInfo())
    assert train.dataset.pixels is not None and val.dataset.pixels is not None
    assert next(iter(train))[0].shape == (2, 3, 224, 224)
