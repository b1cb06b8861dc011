"""Bad input gets a clear answer: bad files skipped, counted and reported once (or an error under strict), odd image
modes converted to RGB, missing files and folders named, decompression bombs refused."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from resnetkit.cli import main
from resnetkit.data import CUB200, BadImageError, build_dataset, build_loader, preprocess_info
from resnetkit.data.image import decode_image


@pytest.fixture
def messy_folder(tmp_path):
    """train/ and val/ with two classes of good 12 px images plus four bad files in train/b."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(4):
                arr = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(arr).save(tmp_path / split / c / f"{i}.jpg", quality=95)
    bad = tmp_path / "train" / "b"
    (bad / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 256, 300, dtype=np.uint8)))
    good = (bad / "0.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.png").write_text("this is text, not a PNG")
    return tmp_path, {str(bad / n) for n in ("corrupt.jpg", "truncated.jpg", "empty.jpg", "notes.png")}


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "resnetkit.data"]


def test_bad_files_are_skipped_counted_and_reported_once_fast_pipeline(messy_folder, caplog):
    root, bad = messy_folder
    caplog.set_level(logging.WARNING, "resnetkit.data")
    loader = build_loader(
        root, "train", preset="cifar", batch_size=4, train=True, device="cpu", cache_dir=root / "cache"
    )
    assert loader.num_samples == 8 and {p for p, _ in loader.skipped} == bad
    reasons = dict(loader.skipped)
    assert reasons[str(root / "train/b/empty.jpg")] == "empty file (0 bytes)"
    assert "not an image" in reasons[str(root / "train/b/notes.png")]
    assert "truncated" in reasons[str(root / "train/b/truncated.jpg")]
    messages = _warnings(caplog)
    assert len(messages) == 1 and "skipped 4 of 12" in messages[0]
    assert all(path in messages[0] for path in bad)
    assert sum(len(y) for _, y in loader) == 8


def test_bad_files_are_skipped_and_reported_once_dataloader_pipeline(messy_folder, caplog):
    root, bad = messy_folder
    caplog.set_level(logging.WARNING, "resnetkit.data")
    preprocess = preprocess_info("imagenet", input_size=32)
    loader = build_loader(root, "train", preset=preprocess, batch_size=5, train=False, device="cpu", workers=0)
    labels = torch.cat([y for _, y in loader])
    assert labels.tolist() == [0] * 4 + [1] * 4  # every good image once, every bad one dropped
    assert {p for p, _ in loader.skipped} == bad
    assert len(loader) == 3 and len(list(loader)) == 2  # the third batch held only bad files: nothing to yield
    # ... and this second epoch reported nothing new
    messages = _warnings(caplog)
    assert len(messages) == 1 and "skipped 4 of 12" in messages[0] and all(p in messages[0] for p in bad)


def test_strict_stops_with_the_offending_path(messy_folder):
    root, bad = messy_folder
    with pytest.raises(BadImageError) as e:
        build_loader(
            root, "train", preset="cifar", batch_size=4, train=True, device="cpu", strict=True, cache_dir=root / "cache"
        )
    assert e.value.path in bad and e.value.path in str(e.value)
    loader = build_loader(
        root, "train", preset="imagenet", batch_size=4, train=False, device="cpu", workers=1, strict=True
    )
    with pytest.raises(BadImageError) as e:  # raised in this process, not re-wrapped from the worker
        list(loader)
    assert e.value.path in bad and "Traceback" not in str(e.value)
    ds = build_dataset(root, "train", strict=True)
    with pytest.raises(BadImageError, match="empty file"):
        ds[[p for p, _ in ds.samples].index(str(root / "train/b/empty.jpg"))]


def test_odd_modes_become_rgb(tmp_path):
    cases = {}
    cases["grey.png"] = (Image.new("L", (4, 4), 77), (77, 77, 77))
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    cases["palette.png"] = (palette, (10, 200, 30))
    transparent = palette.copy()
    transparent.info["transparency"] = 1
    cases["palette_transparent.png"] = (transparent, (255, 255, 255))
    cases["rgba.png"] = (Image.new("RGBA", (4, 4), (200, 0, 0, 0)), (255, 255, 255))  # fully transparent: white
    cases["rgba_opaque.png"] = (Image.new("RGBA", (4, 4), (200, 10, 0, 255)), (200, 10, 0))
    cases["la.png"] = (Image.new("LA", (4, 4), (50, 255)), (50, 50, 50))
    cases["cmyk.tif"] = (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0))
    cases["grey16.png"] = (Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)), (128, 128, 128))
    cases["grey.jpg"] = (Image.new("L", (8, 8), 120), (120, 120, 120))
    cases["rgb.bmp"] = (Image.new("RGB", (4, 4), (1, 2, 3)), (1, 2, 3))
    cases["rgb.webp"] = (Image.new("RGB", (4, 4), (90, 40, 200)), (90, 40, 200))
    for name, (img, expected) in cases.items():
        img.save(tmp_path / name, **({"lossless": True} if name.endswith(".webp") else {}))
        tensor = decode_image(tmp_path / name)
        assert tensor.shape == (3, img.height, img.width) and tensor.dtype == torch.uint8, name
        assert tensor[:, 1, 1].tolist() == pytest.approx(list(expected), abs=2), name
        from_bytes = decode_image((tmp_path / name).read_bytes())  # an upload decodes the same
        assert torch.equal(from_bytes, tensor), name
    cmyk_jpeg = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(cmyk_jpeg)
    assert decode_image(cmyk_jpeg)[0, 2, 2] > 230


def test_decompression_bombs_are_refused(tmp_path):
    Image.new("RGB", (400, 300)).save(tmp_path / "big.png")
    with pytest.raises(BadImageError, match="400x300 = 120,000 pixels is over the limit of 100,000"):
        decode_image(tmp_path / "big.png", max_pixels=100_000)
    Image.new("RGB", (400, 300)).save(tmp_path / "big.jpg")
    with pytest.raises(BadImageError, match="over the limit"):
        decode_image(tmp_path / "big.jpg", max_pixels=100_000)
    assert decode_image(tmp_path / "big.png", max_pixels=120_000).shape == (3, 300, 400)


def test_missing_and_empty_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"dataset path {tmp_path / 'nope'} does not exist"):
        build_dataset(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="did you mean 'cifar10'"):
        build_dataset("cifar01")
    (tmp_path / "data" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "train" / "dog").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "train" / "cat" / "0.png")
    with pytest.raises(ValueError, match=f"class folder {tmp_path / 'data' / 'train' / 'dog'} has no images"):
        build_dataset(tmp_path / "data", "train")
    with pytest.raises(FileNotFoundError, match="has no val/ or test/ folder"):
        build_dataset(tmp_path / "data", "val")
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        build_dataset("shapes", "valid")


def _fake_cub(root, missing: bool = False):
    (root / "images" / "001.Bird").mkdir(parents=True)
    for i in (1, 2):
        if not (missing and i == 2):
            Image.new("RGB", (40, 30), (i, 0, 0)).save(root / "images" / "001.Bird" / f"b{i}.jpg")
    (root / "images.txt").write_text("1 001.Bird/b1.jpg\n2 001.Bird/b2.jpg\n")
    (root / "image_class_labels.txt").write_text("1 1\n2 1\n")
    (root / "train_test_split.txt").write_text("1 1\n2 1\n")
    (root / "classes.txt").write_text("1 001.Bird\n")
    (root / "bounding_boxes.txt").write_text("1 5.0 4.0 20.0 10.0\n2 0.0 0.0 40.0 30.0\n")


def test_cub_missing_image_and_metadata_are_named(tmp_path):
    _fake_cub(tmp_path / "ok")
    ds = CUB200(tmp_path / "ok", "train", crop_to_box=True)
    assert ds.classes == ["Bird"] and ds.boxes.tolist() == [[5, 4, 20, 10], [0, 0, 40, 30]]
    assert ds[0][0].shape == (3, 10, 20) and ds.load(0).shape == (3, 10, 20)
    _fake_cub(tmp_path / "missing", missing=True)
    with pytest.raises(FileNotFoundError) as e:
        build_dataset(tmp_path / "missing", "train")
    assert str(tmp_path / "missing" / "images" / "001.Bird" / "b2.jpg") in str(e.value) and "row 2" in str(e.value)
    _fake_cub(tmp_path / "nobox")
    (tmp_path / "nobox" / "bounding_boxes.txt").unlink()
    with pytest.raises(FileNotFoundError, match="bounding_boxes.txt"):
        CUB200(tmp_path / "nobox")


def test_cli_stats_and_one_line_errors(tmp_path, capsys):
    (tmp_path / "imgs" / "x").mkdir(parents=True)
    Image.new("RGB", (4, 4), (255, 0, 51)).save(tmp_path / "imgs" / "x" / "a.png")
    Image.new("RGB", (4, 4), (0, 0, 51)).save(tmp_path / "imgs" / "b.png")
    assert main(["data", "stats", str(tmp_path / "imgs")]) == 0
    out = capsys.readouterr().out
    assert "mean 0.5000 0.0000 0.2000" in out and "std  0.5000 0.0000 0.0000" in out
    assert main(["data", "info", "shapes:100"]) == 0
    out = capsys.readouterr().out
    assert "crescent" in out and "total" in out and "100" in out
    assert main(["data", "stats", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "nothing") in err
