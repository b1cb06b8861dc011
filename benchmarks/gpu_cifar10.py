"""On a GPU: the time `configs/cifar10_gpu94.yaml` takes to reach 94% CIFAR-10 test accuracy, and ResNet-50 training
images/s against a plain torchvision loop, in one run.

    python benchmarks/gpu_cifar10.py [--target 0.94] [--data ../shared/data/cifar10-jpg]

The recipe trains with the engine (`resnetkit.train`), evaluating the test split after every epoch (flip TTA); the
wall time to the first epoch at or above the target is read from its metrics.jsonl (training and evaluations up to
then; building the uint8 cache of the JPEGs is timed apart, before). The throughput rows are
benchmarks/train_throughput.py's cases on the GPU (bf16 autocast and channels_last for ours).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.94)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/cifar10-jpg")
    ap.add_argument("--recipe", type=Path, default=ROOT / "configs/cifar10_gpu94.yaml")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for a GPU machine")
    from resnetkit.config import load_config
    from resnetkit.data import build_loader
    from resnetkit.train.fit import train

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, {when}")
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu94_"))
    cfg = load_config(args.recipe, [f"data.name={args.data}", f"output_dir={out}", "name=gpu94", "train.eval_every=1"])
    started = time.perf_counter()
    for split in ("train", "test"):
        build_loader(cfg.data.name, split, preset="cifar", batch_size=512, train=split == "train", fast=True)
    print(f"uint8 cache: {time.perf_counter() - started:.1f} s (apart)")
    started = time.perf_counter()
    result = train(cfg, quiet=True)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    reached = next((r for r in rows if r.get("val_acc", 0) >= args.target), None)
    elapsed = 0.0
    for r in rows:  # training time per epoch, plus the evaluation each epoch took (the rest of the wall time)
        elapsed += r["epoch_time_s"]
        if r is reached:
            break
    evals = (wall - sum(r["epoch_time_s"] for r in rows)) * (rows.index(reached) + 1) / len(rows) if reached else 0
    print("| recipe | epochs | best test acc | first epoch >= target | time to target s | whole run s |")
    print("|---|---:|---:|---:|---:|---:|")
    first = f"{reached['epoch']}" if reached else "not reached"
    to_target = f"{elapsed + evals:.1f}" if reached else "-"
    best = max(r["val_acc"] for r in rows)
    print(f"| {args.recipe.name} | {len(rows)} | {best:.4f} | {first} | {to_target} | {wall:.1f} |")
    print("(compilation of the model is inside the first epoch's time)")
    print()
    subprocess.run([sys.executable, str(ROOT / "benchmarks/train_throughput.py"), "--steps", "50"], check=True)


if __name__ == "__main__":
    main()
