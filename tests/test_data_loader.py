"""Loaders: the cached tensor pipeline's augmentations, exact resume, sharding, caching, presets and mixup/cutmix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from resnetkit.data import build_loader, build_transform, eval_transform_from, mixup_cutmix, preprocess_info
from resnetkit.data.datasets import SkippedSample
from resnetkit.data.fast import crop_flip_batch, erase_batch
from resnetkit.data.loader import BatchSlots, FileLoader, TensorLoader
from resnetkit.data.transforms import compute_mean_std
from resnetkit.data.transforms import normalize as normalize_batch


@pytest.fixture
def shapes_loader(tmp_path):
    def make(split="train", train=True, **kw):
        kw.setdefault("batch_size", 16)
        return build_loader("shapes:100", split, preset="cifar", train=train, device="cpu", cache_dir=tmp_path, **kw)

    return make


def test_crop_offsets_stay_within_padding_and_flips_mirror_exactly():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 8, 10), dtype=torch.uint8, generator=g)
    pad = 3
    padded = torch.nn.functional.pad(images, (pad,) * 4)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, 12), generator=g)
    flip = torch.arange(12) % 2 == 0
    out = crop_flip_batch(padded, dy, dx, flip, 8, 10)
    for i in range(12):
        crop = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 10]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop)
    # Zero offsets in the middle with flips: exactly the mirrored originals.
    centre = torch.full((12,), pad)
    assert torch.equal(
        crop_flip_batch(padded, centre, centre, torch.ones(12, dtype=torch.bool), 8, 10), images.flip(-1)
    )


def test_training_batches_are_padded_crops_of_the_source_images(shapes_loader):
    loader = shapes_loader()
    assert isinstance(loader, TensorLoader) and loader.preprocess["input_size"] == 32
    idx = loader.plan()[0]
    images, labels = next(iter(loader))
    assert images.dtype == torch.float32 and images.shape == (16, 3, 32, 32) and labels.dtype == torch.int64
    assert torch.equal(labels, loader.labels[idx])
    mean = torch.tensor(loader.preprocess["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(loader.preprocess["std"]).view(1, 3, 1, 1)
    pixels = (images * std + mean) * 255  # undo the normalisation
    assert (pixels - pixels.round()).abs().max() < 1e-3
    padded = torch.nn.functional.pad(loader.images[idx], (4,) * 4).float()
    # All 81 crops of each padded source, plain and mirrored: (16, 162, 3, 32, 32).
    windows = padded.unfold(2, 32, 1).unfold(3, 32, 1).permute(0, 2, 3, 1, 4, 5).reshape(16, 81, 3, 32, 32)
    candidates = torch.cat([windows, windows.flip(-1)], 1)
    offsets_seen = set()
    for i in range(16):
        match = (candidates[i] == pixels[i].round()).flatten(1).all(1).nonzero().flatten().tolist()
        assert match, f"batch image {i} is no padded crop of its source"
        offsets_seen.add(match[0] % 81)
    assert len(offsets_seen) > 1  # the offsets really vary


def test_normalisation_matches_torchvision():
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    mean, std = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
    expected = v2.Normalize(mean, std)(v2.ToDtype(torch.float32, scale=True)(x))
    torch.testing.assert_close(normalize_batch(x, mean, std), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 5, 7), (256, 3, 32, 32), (8, 3, 448, 448)])
def test_normalize_gives_the_bits_of_one_pass_over_the_whole_batch(shape):
    """On the CPU `normalize` goes a cache-sized group of images at a time (one image at a time at 448 px, many at
    32 px); each element goes through the same float operations as in one pass over the batch."""
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    m, s = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    one_pass = x.float().mul_(1.0 / (255.0 * s)).sub_(m / s)
    out = normalize_batch(x, mean, std)
    assert out.dtype == torch.float32 and torch.equal(out, one_pass)
    assert normalize_batch(x, mean, std).data_ptr() != out.data_ptr()  # a batch of its own each call


def test_worker_batches_equal_batches_made_here_and_stay_as_handed_over(imagenet_sample, tmp_path):
    """Workers stack preset batches into a few reused shared-memory slots (`BatchSlots`): a whole epoch held at once,
    more batches than slots, equals the epoch made in this process, batch for batch; images of a size other than
    the slots' (the cifar preset evaluates images as they are) are stacked the usual way."""
    folder = tmp_path / "data" / "train" / "all"
    folder.mkdir(parents=True)
    for photo in sorted(imagenet_sample.glob("*.JPEG"))[:48]:
        (folder / photo.name).symlink_to(photo)
    options = dict(preset="imagenet", batch_size=4, train=True, seed=1, device="cpu")
    here = list(build_loader(tmp_path / "data", "train", workers=0, **options))
    loader = build_loader(tmp_path / "data", "train", workers=2, **options)
    assert 1 < loader._slots.count < len(here) == 12
    there = list(loader)
    loader.close()
    assert len({images.data_ptr() for images, _ in there}) == len(there)
    for (a, labels_a), (b, labels_b) in zip(here, there, strict=True):
        assert torch.equal(a, b) and torch.equal(labels_a, labels_b)


def test_batch_slots_take_batches_of_their_shape_and_pass_others_on():
    slots = BatchSlots(3, 4, (3, 8, 8))
    images = [torch.full((3, 8, 8), i, dtype=torch.uint8) for i in range(3)]
    skipped = SkippedSample("/data/bad.jpg", "not an image")
    slot, labels, bad = slots.collate([(images[0], 5, 2), skipped, (images[1], 7, 2), (images[2], 1, 2)])
    assert slot == 2 and labels.tolist() == [5, 7, 1] and bad == [("/data/bad.jpg", "not an image")]
    assert torch.equal(slots.batch_of(slot, 3), torch.stack(images))
    other = torch.zeros(3, 9, 9, dtype=torch.uint8)  # not the slots' shape: stacked as collate_skipping does
    batch, labels, _ = slots.collate([(other, 0, 1), (other, 1, 1)])
    assert batch.shape == (2, 3, 9, 9) and torch.equal(slots.batch_of(batch, 2), batch) and labels.tolist() == [0, 1]
    empty, labels, bad = slots.collate([skipped])
    assert empty.numel() == 0 and labels.numel() == 0 and len(bad) == 1


def test_eval_batches_equal_the_eval_transform_of_the_checkpoint(shapes_loader):
    loader = shapes_loader("test", train=False, batch_size=7)
    transform = eval_transform_from(loader.preprocess)  # what predict/serve rebuild from a checkpoint
    images, labels = next(iter(loader))
    for i in range(3):
        torch.testing.assert_close(transform(loader.images[i]), images[i], rtol=0, atol=1e-5)
    again = next(iter(shapes_loader("test", train=False, batch_size=7)))
    assert torch.equal(images, again[0])  # evaluation is deterministic


def test_resume_is_exact(shapes_loader):
    reference = shapes_loader(seed=5)
    reference.set_epoch(1)
    expected = [(x.clone(), y.clone()) for x, y in reference]
    assert len(expected) == len(reference) == 100 // 16  # full batches only when training

    first = shapes_loader(seed=5)
    first.set_epoch(1)
    it = iter(first)
    for _ in range(2):
        next(it)
    state = first.state_dict()
    assert state["epoch"] == 1 and state["position"] == 2

    resumed = shapes_loader(seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # what a training loop does after resuming: keeps the position
    rest = list(resumed)
    assert len(rest) == len(expected) - 2
    for (x, y), (ex, ey) in zip(rest, expected[2:]):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    # A new epoch reshuffles.
    resumed.set_epoch(2)
    assert not torch.equal(next(iter(resumed))[1], expected[0][1])
    with pytest.raises(ValueError, match="batch_size"):
        shapes_loader(batch_size=8).load_state_dict(state)


def test_training_shards_are_disjoint_and_equal_and_eval_shards_cover_each_sample_once(shapes_loader):
    train = [shapes_loader(rank=r, world_size=3, batch_size=8) for r in range(3)]
    indices = [torch.cat(t.plan()).tolist() for t in train]
    assert len({len(t) for t in train}) == 1 and all(len(i) == 32 for i in indices)
    assert not set(indices[0]) & set(indices[1]) and not set(indices[1]) & set(indices[2])
    evals = [shapes_loader("test", train=False, rank=r, world_size=3, batch_size=8) for r in range(3)]
    # 20 test images over 3 ranks: 6 + 7 + 7, no padding duplicates.
    seen = [y for e in evals for _, y in e]
    assert sum(len(y) for y in seen) == 20
    all_idx = sorted(i for e in evals for i in torch.cat(e.plan()).tolist())
    assert all_idx == list(range(20))


def _png_folder(root, size=16, per_class=6):
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")


def test_image_folder_cache_is_keyed_by_content(tmp_path):
    _png_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    loader = build_loader(
        tmp_path / "data", "train", preset="cifar", batch_size=4, train=False, device="cpu", cache_dir=cache
    )
    assert isinstance(loader, TensorLoader) and loader.images.shape == (12, 3, 16, 16)
    assert loader.preprocess["input_size"] == 16
    # The folder's own statistics (the cifar preset normalises with the dataset's own).
    expected_mean, _ = compute_mean_std(tmp_path / "data" / "train")
    assert loader.preprocess["mean"] == pytest.approx(expected_mean, abs=1e-3)
    assert len(list((cache / "tensors").glob("*.pt"))) == 1
    first = Image.open(tmp_path / "data" / "train" / "a" / "0.png")
    assert torch.equal(loader.images[0], torch.from_numpy(np.array(first)).permute(2, 0, 1))
    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "data" / "train" / "a" / "0.png")  # the source changes
    changed = build_loader(
        tmp_path / "data", "train", preset="cifar", batch_size=4, train=False, device="cpu", cache_dir=cache
    )
    assert len(list((cache / "tensors").glob("*.pt"))) == 2
    assert changed.images[0, :, 0, 0].tolist() == [1, 2, 3]


def test_file_loader_path_for_large_presets(tmp_path):
    _png_folder(tmp_path / "data", size=40)
    loader = build_loader(
        tmp_path / "data", "val", preset="imagenet", batch_size=5, train=False, device="cpu", workers=0
    )
    assert isinstance(loader, FileLoader) and len(loader) == 3 and loader.classes == ["a", "b"]
    batches = list(loader)
    assert [len(y) for _, y in batches] == [5, 5, 2] and batches[0][0].shape == (5, 3, 224, 224)
    assert torch.cat([y for _, y in batches]).tolist() == [0] * 6 + [1] * 6
    train = build_loader(
        tmp_path / "data",
        "train",
        preset="imagenet",
        batch_size=4,
        train=True,
        device="cpu",
        workers=0,
        augment=("trivialaugment", "erasing"),
        seed=3,
    )
    it = iter(train)
    next(it)
    state = train.state_dict()
    rest = [y for _, y in it]
    resumed = build_loader(
        tmp_path / "data", "train", preset="imagenet", batch_size=4, train=True, device="cpu", workers=0, seed=3
    )
    resumed.load_state_dict(state)
    assert [y.tolist() for _, y in resumed] == [y.tolist() for y in rest]  # the same samples in the same order


def test_augmentation_can_be_switched_off(shapes_loader, tmp_path):
    loader = shapes_loader()
    loader.set_augmentation(False)
    idx = loader.plan()[0]
    images, _ = next(iter(loader))
    p = loader.preprocess
    torch.testing.assert_close(images, normalize_batch(loader.images[idx], p["mean"], p["std"]))
    _png_folder(tmp_path / "data", size=40, per_class=2)
    files = build_loader(
        tmp_path / "data", "train", preset="imagenet", batch_size=4, train=True, device="cpu", workers=0
    )
    files.set_augmentation(False)
    first = next(iter(files))[0]
    files.load_state_dict({"epoch": 0, "position": 0})
    assert torch.equal(first, next(iter(files))[0])  # the same batch again: no random crops


def test_fast_augment_extras_and_policy(shapes_loader):
    loader = shapes_loader(augment=("colorjitter", "erasing", "trivialaugment"))
    images, _ = next(iter(loader))
    assert images.shape == (16, 3, 32, 32) and torch.isfinite(images).all()
    again = shapes_loader(augment=("colorjitter", "erasing", "trivialaugment"))
    assert torch.equal(images, next(iter(again))[0])  # seeded per batch: reproducible
    with pytest.raises(ValueError, match="did you mean 'erasing'"):
        shapes_loader(augment=("erase",))


def test_erase_batch_sets_rectangles():
    x = torch.zeros(64, 3, 16, 16)
    out = erase_batch(x, 1.0, torch.Generator().manual_seed(0))
    changed = (out != 0).any(1)  # (N, H, W)
    for mask in changed:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert mask.sum() == len(rows) * len(cols)  # one filled rectangle
        assert 0.02 * 256 * 0.5 <= mask.sum() <= 0.33 * 256 * 1.1


def test_presets_and_preprocess_info():
    img = torch.full((3, 200, 300), 30, dtype=torch.uint8)  # decode_image's layout
    assert build_transform("imagenet", train=True)(img).shape == (3, 224, 224)
    assert build_transform("imagenet", train=False)(img).shape == (3, 224, 224)
    assert build_transform("cub448", train=True, extras=("randaugment", "colorjitter"))(img).shape == (3, 448, 448)
    assert build_transform("cifar", train=True)(torch.zeros(3, 32, 32, dtype=torch.uint8)).shape == (3, 32, 32)
    info = preprocess_info("imagenet")
    assert info == {
        "preset": "imagenet",
        "input_size": 224,
        "resize": 256,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    assert preprocess_info("imagenet", input_size=112)["resize"] == 128
    thin = torch.zeros(3, 40, 5000, dtype=torch.uint8)  # a 125:1 strip: cropped to 8:1 before the resize
    assert eval_transform_from(preprocess_info("cifar"))(thin).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="did you mean 'imagenet'"):
        build_transform("imagenett", train=True)
    with pytest.raises(ValueError, match="'mean'"):
        eval_transform_from({"preset": "cifar", "input_size": 32, "resize": 32, "std": [1, 1, 1]})


def test_mixup_cutmix_soft_labels():
    images, labels = torch.rand(8, 3, 16, 16), torch.arange(8) % 4
    x, y = mixup_cutmix(images, labels, 4, mixup_alpha=0.2, cutmix_alpha=1.0)
    assert x.shape == images.shape and y.shape == (8, 4)
    torch.testing.assert_close(y.sum(1), torch.ones(8))
    x, y = mixup_cutmix(images, labels, 4)
    assert torch.equal(x, images) and torch.equal(y.argmax(1), labels) and y.max() == 1


def test_the_consumer_keeps_its_threads(shapes_loader):
    """Batch transforms run on one intra-op thread, but the training step that consumes a batch gets the caller's
    threads back (a batch yielded inside the one-thread context once halved the demo's training speed)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in shapes_loader():
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


ABANDON = """
import multiprocessing, sys
from resnetkit.data import build_loader
root = sys.argv[1]
for _ in range(2):  # abandon a pass mid-epoch (a budget stop, max_steps, Ctrl-C), twice, then start another loader
    loader = build_loader(root, "train", preset="imagenet", batch_size=2, train=True, device="cpu", workers=2)
    next(iter(loader))
    loader.close()
    assert not multiprocessing.active_children(), multiprocessing.active_children()
print(sum(len(y) for _, y in build_loader(root, "val", preset="imagenet", batch_size=4, train=False, workers=2)))
"""


def test_an_abandoned_pass_shuts_its_workers_down_without_tracebacks(tmp_path):
    import subprocess
    import sys

    _png_folder(tmp_path / "data", size=40)
    done = subprocess.run(
        [sys.executable, "-c", ABANDON, str(tmp_path / "data")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["12"] and "Traceback" not in done.stderr and "Error" not in done.stderr
