"""Input-pipeline throughput, the seed-style pipeline and ours side by side, from one run.

    .venv/bin/python benchmarks/data_throughput.py            # prints a Markdown table for BENCHMARKS.md

Rows (images per second, training augmentation on, batches on the CPU):
- seed-style: torchvision.datasets.ImageFolder + per-sample transforms (pad-4 crop, flip, ToTensor, Normalize) +
  DataLoader with 2 workers, on ../shared/data/cifar10-jpg/train;
- ours, cached: build_loader(preset="cifar") on the same folder, steady state over one epoch; building the uint8
  cache (decoding the 50,000 JPEGs once) is timed separately;
- large photos, torchvision (the peer) against ours with the same worker count (`default_workers()`, one per core),
  each timed over three epochs after a first (which starts the workers and warms the page cache), run --repeats
  times alternating peer and ours (the table shows the median run and lists every run):
  - the 200 photos of ../shared/data/imagenet-sample (about 500 x 375) with the `imagenet` training preset
    (RandomResizedCrop 224 + flip) and its evaluation (resize 256, centre crop 224);
  - the CUB-200 subset's 300 training images (about 500 x 375) with `cub448` (resize 512, random crop 448, flip);
  - 48 of the ImageNet photos enlarged to 4000 x 3000 (a phone's 12 MP photo, written as JPEG quality 90 once into
    a temporary folder): the `imagenet` training and evaluation presets, where decoding at reduced scale applies.
  The peer is torchvision.datasets.ImageFolder + per-sample transforms (PIL decode, the same geometry, ToTensor,
  Normalize) + DataLoader; ours is build_loader (decode_image, uint8 batches stacked into reused shared-memory slots,
  normalised in the main process), and for the small photos also build_loader with data.pixel_cache (each JPEG
  decoded once into the pixel cache, resized there where the preset's first resize is the same for every image;
  its build is timed apart, and the passes timed read pixels). Each of these measurements runs in a fresh process of its
  own; ours' processes are set up as `resnetkit train` sets itself up (`train.keep_freed_memory`, its default).
The cache goes to a temporary folder (or --cache-dir), so the cache-build figure is a cold build.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from _isolated import isolated

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def images_per_second(batches, max_batches: int, warmup: int = 2) -> tuple[float, int]:
    """Images per second over up to max_batches batches after `warmup` batches (workers started, caches warm)."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    count, start = 0, time.perf_counter()
    for i, (images, _) in enumerate(it):
        count += images.shape[0]
        if i + 1 >= max_batches:
            break
    return count / (time.perf_counter() - start), count


def seed_style(root: Path, batch_size: int, max_batches: int) -> tuple[float, int]:
    import torchvision
    from torchvision import transforms as T

    transform = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        ]
    )
    dataset = torchvision.datasets.ImageFolder(str(root), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=2)
    return images_per_second(loader, max_batches)


def _epoch_rate(loader, timed: int = 3) -> tuple[float, int]:
    """Images per second over `timed` passes after a first one (which starts the workers and warms the page cache);
    the small sets take well under a second a pass, so one pass alone would be mostly noise."""
    count, start = 0, 0.0
    for epoch in range(1 + timed):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        if epoch == 1:
            count, start = 0, time.perf_counter()
        for images, _ in loader:
            count += images.shape[0]
    return count / (time.perf_counter() - start), count


def _folder_of(files: list[Path], root: Path) -> Path:
    """An ImageFolder view (one class folder of symlinks) of `files`: the same images for the peer and for us."""
    folder = root / "train" / "all"
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        (folder / f.name).symlink_to(f)
    return root


def peer_rate(root: str, case: str, workers: int) -> tuple[float, int]:
    """torchvision's ImageFolder + per-sample transforms + DataLoader on root/train (in a process of its own)."""
    import torchvision
    from torchvision import transforms as T

    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    transform = {
        "imagenet train": T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm]),
        "imagenet eval": T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm]),
        "cub448 train": T.Compose([T.Resize(512), T.RandomCrop(448), T.RandomHorizontalFlip(), T.ToTensor(), norm]),
    }[case]
    dataset = torchvision.datasets.ImageFolder(str(Path(root) / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=32, shuffle=case.endswith("train"), num_workers=workers, persistent_workers=True
    )
    return _epoch_rate(loader)


def ours_rate(root: str, case: str, workers: int, cache_dir: str | None) -> tuple[float, int, float]:
    """build_loader on root/train as `resnetkit train` runs it (train.keep_freed_memory, its default), with
    data.pixel_cache when cache_dir is given (in a process of its own): (images/s, images timed, seconds to build)."""
    from resnetkit.data import build_loader
    from resnetkit.train.loop import keep_freed_memory

    keep_freed_memory()
    preset, mode = case.split()
    start = time.perf_counter()
    loader = build_loader(
        root, "train", preset=preset, batch_size=32, train=mode == "train", workers=workers, fast=False,
        cache_dir=cache_dir, pixel_cache=cache_dir is not None,
    )  # fmt: skip
    build_s = time.perf_counter() - start
    rate, n = _epoch_rate(loader)
    loader.close()
    return rate, n, build_s


def large_photo_rows(data: Path, tmp: Path, large: int, repeats: int) -> list[tuple]:
    from PIL import Image

    from resnetkit.data.datasets import CUB200
    from resnetkit.data.loader import default_workers

    workers = default_workers()
    photos = sorted((data / "imagenet-sample").glob("*.JPEG"))
    cub_train = [Path(p) for p, _ in CUB200(data / "cub200-2011-subset", "train").samples]
    big = tmp / "big"
    big.mkdir()
    for f in photos[:large]:  # a phone-sized photo: enlarged 4000 x 3000, JPEG quality 90
        Image.open(f).convert("RGB").resize((4000, 3000), Image.BICUBIC).save(big / f"{f.stem}.jpg", quality=90)
    sets = [  # (title, folder, cases, also with data.pixel_cache)
        ("imagenet-sample (200)", _folder_of(photos, tmp / "inet"), ("imagenet train", "imagenet eval"), True),
        ("CUB subset train (300)", _folder_of(cub_train, tmp / "cub"), ("cub448 train",), True),
        (
            f"{large} photos at 4000x3000",
            _folder_of(sorted(big.glob("*.jpg")), tmp / "large"),
            ("imagenet train", "imagenet eval"),
            False,  # 36 MB a photo decoded: reduced-scale decoding is the path for these
        ),
    ]
    rows = []
    for title, root, cases, pixel_cache in sets:
        for case in cases:
            cache_dir = tmp / f"pixels-{root.name}"
            reused = cache_dir.exists()  # the training row's cache, read again by the evaluation row
            peer, ours, cached, build = [], [], [], []
            for _ in range(repeats):  # alternating, each in a fresh process; the medians go in the table
                peer.append(isolated(peer_rate, str(root), case, workers))
                ours.append(isolated(ours_rate, str(root), case, workers, None))
                if pixel_cache:
                    cached.append(isolated(ours_rate, str(root), case, workers, str(cache_dir)))
                    build.append(cached[-1][2])
            peer_rate_, n = _median(peer)
            rows.append((f"torchvision ImageFolder, {case}, {workers} workers", title, peer_rate_, n, _spread(peer)))
            rate, n = _median(ours)
            note = f"{rate / peer_rate_:.2f}x torchvision; {_spread(ours)}"
            rows.append((f"ours: build_loader, {case}, {workers} workers", title, rate, n, note))
            print(f"{rows[-1][0]}: {rows[-1][4]}", file=sys.stderr, flush=True)  # progress
            if pixel_cache:
                rate, n = _median(cached)
                built = "the cache of the row above" if reused else f"cache built once in {build[0]:.1f} s"
                note = f"{rate / peer_rate_:.2f}x torchvision; {_spread(cached)}; {built}"
                rows.append((f"ours: build_loader + data.pixel_cache, {case}, {workers} workers", title, rate, n, note))
                print(f"{rows[-1][0]}: {rows[-1][4]}", file=sys.stderr, flush=True)
    return rows


def _median(results: list[tuple]) -> tuple[float, int]:
    """The median run's (images/s, images timed)."""
    ordered = sorted(results)
    return ordered[len(ordered) // 2][:2]


def _spread(results: list[tuple]) -> str:
    return "runs " + " / ".join(f"{r[0]:,.0f}" for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed-batches", type=int, default=60, help="batches timed for the seed-style pipeline")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: a fresh temporary folder")
    parser.add_argument("--large", type=int, default=48, help="ImageNet photos enlarged to 4000x3000")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each photo row (the median is shown)")
    args = parser.parse_args()

    from resnetkit.data import build_loader

    cifar = args.data / "cifar10-jpg"
    rows = []
    seed_rate, seed_n = seed_style(cifar / "train", args.batch_size, args.seed_batches)
    gc.collect()  # shut its workers down now, not inside a later DataLoader's forked workers
    rows.append(("seed-style ImageFolder + DataLoader(2 workers)", "cifar10-jpg train", seed_rate, seed_n, ""))

    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache_dir or Path(tmp)
        start = time.perf_counter()
        loader = build_loader(
            cifar, "train", preset="cifar", batch_size=args.batch_size, train=True, device="cpu", cache_dir=cache_dir
        )
        build_s = time.perf_counter() - start
        rows.append(
            (
                "ours: cache build (decode once)",
                "cifar10-jpg train",
                loader.num_samples / build_s,
                loader.num_samples,
                f"{build_s:.1f} s, once per source content",
            )
        )
        loader.set_epoch(1)
        rate, n = images_per_second(loader, len(loader))
        rows.append(
            (
                "ours: cached uint8 pipeline, steady state",
                "cifar10-jpg train",
                rate,
                n,
                f"{rate / seed_rate:.1f}x seed-style",
            )
        )

    with tempfile.TemporaryDirectory() as tmp:
        rows += large_photo_rows(args.data, Path(tmp), args.large, args.repeats)

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(
        f"batch size {args.batch_size}; {torch.get_num_threads()} torch threads; {cpu}; {os.cpu_count()} CPUs; "
        f"load average after the run: {' '.join(load)}\n"
    )
    print("| pipeline | data | images/s | images timed | note |")
    print("|---|---|---:|---:|---|")
    for name, data, rate, n, note in rows:
        print(f"| {name} | {data} | {rate:,.0f} | {n:,} | {note} |")


if __name__ == "__main__":
    main()
