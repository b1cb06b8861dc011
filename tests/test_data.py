"""Datasets: shapes, CIFAR (official python layout, built here), ImageFolder, CUB-200-2011 and the real data."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnetkit.data import CIFAR, CUB200, ImageFolder, build_dataset, render_shapes
from resnetkit.data.synthetic import SHAPE_CLASSES


def test_render_shapes_is_deterministic_with_consistent_masks():
    images, labels, masks = render_shapes(40, 32, seed=3, split="train")
    assert images.shape == (40, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (40,) and labels.dtype == torch.int64
    assert masks.shape == (40, 32, 32) and masks.dtype == torch.uint8
    assert Counter(labels.tolist()) == {c: 4 for c in range(10)}
    again = render_shapes(40, 32, seed=3, split="train")
    assert all(torch.equal(a, b) for a, b in zip((images, labels, masks), again))
    assert not torch.equal(images, render_shapes(40, 32, seed=3, split="test")[0])
    assert not torch.equal(images, render_shapes(40, 32, seed=4, split="train")[0])
    for label, mask in zip(labels, masks):
        values = set(mask.unique().tolist())
        assert values == {0, int(label) + 1}  # the shape's pixels carry its class + 1, the rest 0
        assert 15 < (mask > 0).sum() < 0.6 * 32 * 32
    # Any resolution: the 64 px render has the same labels, and the shape covers about the same fraction.
    images64, labels64, masks64 = render_shapes(40, 64, seed=3, split="train")
    assert images64.shape == (40, 3, 64, 64) and masks64.shape == (40, 64, 64)


def test_shapes_are_not_solvable_from_mean_colour():
    def features(images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)  # per-channel mean and std

    train_x, train_y, _ = render_shapes(400, 32, seed=0, split="train")
    test_x, test_y, _ = render_shapes(200, 32, seed=0, split="test")
    f_train, f_test = features(train_x), features(test_x)
    mu, sigma = f_train.mean(0), f_train.std(0)
    f_train, f_test = (f_train - mu) / sigma, (f_test - mu) / sigma
    # Multinomial logistic regression, fitted to convergence with L-BFGS (what sklearn's LogisticRegression does).
    clf = torch.nn.Linear(6, 10)
    opt = torch.optim.LBFGS(clf.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(clf(f_train), train_y) + 1e-3 * clf.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        train_acc = (clf(f_train).argmax(1) == train_y).float().mean().item()
        accuracy = (clf(f_test).argmax(1) == test_y).float().mean().item()
    assert train_acc > 0.1  # the classifier did fit something
    # Chance is 10%; a small ResNet reaches over 90% (docs/data.md). Colour statistics alone must stay far below.
    assert accuracy < 0.3, accuracy


def test_build_dataset_shapes():
    ds = build_dataset("shapes", "test", image_size=24)
    assert len(ds) == 2000 and ds.classes == SHAPE_CLASSES
    image, label = ds[5]
    assert image.dtype == torch.uint8 and image.shape == (3, 24, 24) and label == ds.targets[5]
    # Single samples render on demand and match the whole-split render.
    images, labels, _ = render_shapes(3, 24, seed=0, split="test")
    assert torch.equal(ds[2][0], images[2]) and labels[2] == ds[2][1]
    small = build_dataset("shapes:500", "train"), build_dataset("shapes:500", "val")
    assert (len(small[0]), len(small[1])) == (500, 100) and Counter(small[0].targets) == {c: 50 for c in range(10)}
    with pytest.raises(ValueError, match="shapes:N"):
        build_dataset("shapes:many")
    hwc = build_dataset("shapes", "train", transform=lambda im: im.permute(1, 2, 0))
    assert hwc[0][0].shape == (32, 32, 3)


def _write_cifar(root: Path, name: str = "cifar10", per_batch: int = 4) -> np.ndarray:
    """Tiny files in the exact official format; returns all train images (N, 32, 32, 3)."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, train_files, test_files = (
            root / "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            ["test_batch"],
        )
        meta_name, meta = "batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)]}
        label_key, num_classes = b"labels", 10
    else:
        folder, train_files, test_files = root / "cifar-100-python", ["train"], ["test"]
        meta_name, meta = "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)]}
        label_key, num_classes = b"fine_labels", 100
    folder.mkdir(parents=True)
    train_images = []
    for i, fname in enumerate(train_files + test_files):
        data = rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = [(i + k) % num_classes for k in range(per_batch)]
        with open(folder / fname, "wb") as f:
            pickle.dump({b"data": data, label_key: labels, b"batch_label": fname.encode()}, f)
        if fname in train_files:
            train_images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    with open(folder / meta_name, "wb") as f:
        pickle.dump(meta, f)
    return np.concatenate(train_images)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_official_layout(tmp_path, name):
    expected = _write_cifar(tmp_path, name)
    train = build_dataset(name, "train", root=tmp_path)
    test = build_dataset(tmp_path, "test")  # by path: the layout is recognised
    assert isinstance(test, CIFAR) and test.name == name
    per_batch_files = 5 if name == "cifar10" else 1
    assert len(train) == 4 * per_batch_files and len(test) == 4
    assert len(train.classes) == (10 if name == "cifar10" else 100)
    # The row layout is R plane, G plane, B plane of 1024 bytes each: the pixel must come out as (R, G, B).
    i = len(train) - 2  # row 2 of the last training batch
    image, label = train[i]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert image[:, 2, 5].tolist() == [int(v) for v in expected[i, 2, 5]]
    assert label == train.targets[i] == (per_batch_files - 1 + 2) % len(train.classes)
    images, labels = train.uint8_tensors()
    assert images.shape == (len(train), 3, 32, 32) and labels.tolist() == train.targets
    assert torch.equal(images[i].permute(1, 2, 0), torch.from_numpy(expected[i]))


def test_cifar_missing_says_where_to_put_the_files(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        build_dataset("cifar10", root=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in msg and "cifar-10-python.tar.gz" in msg


def test_cifar_download_checks_the_published_md5_and_explains_failure(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    calls = []

    def offline(url, root, md5=None, **kw):  # what cannot exist here: the network
        calls.append((url, md5))
        raise OSError("network is unreachable")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(FileNotFoundError) as e:
        build_dataset("cifar100", root=tmp_path, download=True)
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85")]
    assert "network is unreachable" in str(e.value) and str(tmp_path) in str(e.value)


def test_cifar_corrupt_pickle_names_the_file(tmp_path):
    _write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3"):
        build_dataset("cifar10", root=tmp_path)


def _write_folder(root: Path, classes: dict[str, int], size: int = 20, fmt: str = "png") -> None:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (size, size + 2, 3), dtype=np.uint8)).save(root / name / f"{i}.{fmt}")


def test_image_folder_splits_and_labels(tmp_path):
    _write_folder(tmp_path / "train", {"cat": 3, "ant": 2, "bee": 1})
    _write_folder(tmp_path / "val", {"bee": 2, "cat": 1})  # an evaluation split may lack a class
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image extension: ignored")
    train = build_dataset(tmp_path, "train")
    val = build_dataset(tmp_path, "val")
    test = build_dataset(tmp_path, "test")  # test falls back to val/
    assert isinstance(train, ImageFolder) and train.classes == ["ant", "bee", "cat"] == val.classes
    assert train.targets == [0, 0, 1, 2, 2, 2] and val.targets == [1, 1, 2] and len(test) == 3
    image, label = train[3]
    assert image.dtype == torch.uint8 and image.shape == (3, 20, 22) and label == 2
    resized = build_dataset(tmp_path, "train", image_size=10)
    assert min(resized[0][0].shape[-2:]) == 10


def test_cub_subset_counts_boxes_and_crop(cub_root):
    train, test = CUB200(cub_root, "train"), build_dataset(cub_root.parent, "test")
    assert isinstance(test, CUB200)
    assert len(train) == 300 and len(test) == 243
    assert len(train.classes) == 10 and train.classes[0] == "Black_footed_Albatross"
    assert set(train.targets) == set(test.targets) == set(range(10))
    assert train.boxes.shape == (300, 4) and train.boxes.dtype == torch.float32
    for ds in (train, test):
        for (path, _), (x, y, w, h) in zip(ds.samples, ds.boxes.tolist()):
            with Image.open(path) as img:  # header only
                width, height = img.size
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= width + 1 and y + h <= height + 1, path
    # The official split: image id 1 is a test image, 2 a training one (train_test_split.txt).
    assert 1 in test.image_ids and 2 in train.image_ids
    cropped = CUB200(cub_root, "train", crop_to_box=True)
    image, label = cropped[0]
    x, y, w, h = cropped.boxes[0].tolist()
    assert label == train.targets[0] and abs(image.shape[-1] - w) <= 1 and abs(image.shape[-2] - h) <= 1


def test_cifar10_jpg_counts(cifar10_jpg):
    train, test = build_dataset(cifar10_jpg, "train"), build_dataset(cifar10_jpg, "test")
    assert len(train) == 50_000 and len(test) == 10_000
    assert train.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert Counter(train.targets) == {c: 5000 for c in range(10)}
    assert Counter(test.targets) == {c: 1000 for c in range(10)}
    image, label = test[9_999]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and test.classes[label] == "truck"


def test_cifar_goes_through_the_fast_pipeline_with_its_own_statistics(tmp_path):
    from resnetkit.data import build_loader
    from resnetkit.data.loader import TensorLoader
    from resnetkit.data.transforms import CIFAR100_MEAN

    _write_cifar(tmp_path, "cifar100", per_batch=12)
    loader = build_loader("cifar100", "train", root=tmp_path, preset="cifar", batch_size=4, train=True, device="cpu")
    assert isinstance(loader, TensorLoader) and loader.preprocess["mean"] == list(CIFAR100_MEAN)
    assert len(loader) == 3 and len(loader.classes) == 100
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64


def test_cub448_loader_on_the_real_subset(cub_root):
    from resnetkit.data import build_loader, preprocess_info
    from resnetkit.data.loader import FileLoader

    loader = build_loader(cub_root, "test", preset="cub448", batch_size=4, train=False, device="cpu", workers=0)
    assert isinstance(loader, FileLoader) and loader.preprocess == preprocess_info("cub448")
    assert loader.num_samples == 243 and len(loader) == 61
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 448, 448) and labels.tolist() == loader.dataset.targets[:4]
