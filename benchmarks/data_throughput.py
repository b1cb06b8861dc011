"""Input-pipeline throughput, the seed-style pipeline and ours side by side, from one run.

    .venv/bin/python benchmarks/data_throughput.py            # prints a Markdown table for BENCHMARKS.md

Rows (images per second, training augmentation on, batches on the CPU):
- seed-style: torchvision.datasets.ImageFolder + per-sample transforms (pad-4 crop, flip, ToTensor, Normalize) +
  DataLoader with 2 workers, on ../shared/data/cifar10-jpg/train;
- ours, cached: build_loader(preset="cifar") on the same folder, steady state over one epoch; building the uint8
  cache (decoding the 50,000 JPEGs once) is timed separately;
- ours, cub448: build_loader(preset="cub448") with 2 workers on the CUB-200 subset, decoding JPEGs with torchvision's
  libjpeg-turbo decoder and, for comparison, with Pillow.
The cache goes to a temporary folder (or --cache-dir), so the cache-build figure is a cold build.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

import torch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed-batches", type=int, default=60, help="batches timed for the seed-style pipeline")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: a fresh temporary folder")
    args = parser.parse_args()

    from resnetkit.data import build_loader

    cifar, cub = args.data / "cifar10-jpg", args.data / "cub200-2011-subset"
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

    for decoder in ("torchvision", "pillow"):
        loader = build_loader(cub, "train", preset="cub448", batch_size=32, train=True, device="cpu", workers=2)
        loader.dataset.decode_to_tensor = decoder == "torchvision"
        for _ in loader:  # first epoch: workers start and the page cache warms
            pass
        loader.set_epoch(1)
        rate, n = images_per_second(loader, len(loader), warmup=1)
        rows.append((f"ours: cub448 DataLoader(2 workers), {decoder} decode", "CUB subset train (300)", rate, n, ""))

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
