"""CIFAR-10 in a fixed time budget: the source article's plain recipe against configs/cifar10_fast.yaml, one run.

    python benchmarks/cifar10_cpu_budget.py [--minutes 10] [--data ../shared/data/cifar10-jpg]

(a) plain: the article's way: torchvision ResNet-18 (num_classes=10), torchvision ImageFolder with per-sample
    transforms (pad-4 random crop, flip, ToTensor, Normalize), DataLoader(batch 128, shuffle, 2 workers), SGD lr 0.1
    momentum 0.9 weight decay 5e-4, StepLR; trains until the budget is spent, then evaluates the test set.
(b) resnetkit train with configs/cifar10_fast.yaml; the epochs (and if under one epoch, max_steps) are set from a
    short timing of the training step so that the one-cycle schedule ends inside the budget.
Budgets count training only; decoding the JPEG cache and the final evaluations are reported apart.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms as T

ROOT = Path(__file__).resolve().parents[1]


def plain(data: Path, budget_s: float, workers: int) -> dict:
    norm = T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    train_set = torchvision.datasets.ImageFolder(
        data / "train", T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    )
    test_set = torchvision.datasets.ImageFolder(data / "test", T.Compose([T.ToTensor(), norm]))
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=128, shuffle=True, num_workers=workers)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=500, num_workers=workers)
    model = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.1)
    seen, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < budget_s:
        model.train()
        for x, y in train_loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            seen += len(y)
            if time.perf_counter() - t0 >= budget_s:
                break
        sched.step()
    train_s = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in test_loader:
            correct += (model(x).argmax(1) == y).sum().item()
    return {
        "acc": correct / len(test_set),
        "img_s": seen / train_s,
        "epochs": seen / len(train_set),
        "train_s": train_s,
    }


def fast(data: Path, budget_s: float, out: Path) -> dict:
    from resnetkit.config import load_config
    from resnetkit.data import build_loader
    from resnetkit.models import create_model
    from resnetkit.train.fit import train
    from resnetkit.train.loop import Parts, train_step
    from resnetkit.train.optim import LRSchedule, build_optimizer

    cfg = load_config(ROOT / "configs/cifar10_fast.yaml", [f"data.name={data}", f"output_dir={out}"])
    t0 = time.perf_counter()
    loader = build_loader(
        cfg.data.name, "train", preset="cifar", batch_size=cfg.data.batch_size, train=True, device="cpu", fast=True
    )  # builds (or reads) the uint8 cache
    cache_s = time.perf_counter() - t0
    # Calibrate: a few steps of the real step on real batches.
    model = create_model(cfg.model.name, num_classes=10).to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg.optim, cfg.model)
    parts = Parts(
        model,
        opt,
        torch.amp.GradScaler(enabled=False),
        LRSchedule(opt, cfg.schedule, 0.1, 10),
        None,
        cfg,
        10,
        torch.device("cpu"),
    )
    it = iter(loader)
    train_step(parts, *next(it), sync=True)
    t1, n = time.perf_counter(), 0
    for _ in range(5):
        x, y = next(it)
        train_step(parts, x, y, sync=True)
        n += len(y)
    rate = n / (time.perf_counter() - t1) * 0.93  # keep ~7% for per-epoch evaluation and logging
    images = rate * budget_s
    epochs = max(math.floor(images / loader.num_samples), 1)
    overrides = [f"train.epochs={epochs}"]
    if images < loader.num_samples:
        overrides.append(f"train.max_steps={max(int(images // cfg.data.batch_size), 1)}")
    cfg = load_config(
        ROOT / "configs/cifar10_fast.yaml",
        [f"data.name={data}", f"output_dir={out}", "train.eval_every=1000", *overrides],
    )
    t2 = time.perf_counter()
    result = train(cfg)
    total_s = time.perf_counter() - t2
    m = result.metrics
    return {
        "acc": m["val_acc"],
        "img_s": m["images_per_s"],
        "epochs": min(epochs, (cfg.train.max_steps or math.inf) * cfg.data.batch_size / loader.num_samples),
        "train_s": total_s,
        "cache_s": cache_s,
        "overrides": overrides,
        "run_dir": result.run_dir,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget for each recipe")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/cifar10-jpg")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the plain recipe")
    ap.add_argument("--out", type=Path, default=None, help="run folder parent for (b) (default: a temporary folder)")
    ap.add_argument("--only", choices=["plain", "fast"], default=None)
    args = ap.parse_args()
    budget = args.minutes * 60
    out = args.out or Path(tempfile.mkdtemp(prefix="cifar10_budget_"))
    rows = []
    if args.only != "fast":
        r = plain(args.data, budget, args.workers)
        rows.append(("(a) plain: torchvision ResNet-18, per-sample DataLoader", r, "-"))
        print(f"plain done: {r}", flush=True)
    if args.only != "plain":
        r = fast(args.data, budget, out)
        rows.append(("(b) resnetkit configs/cifar10_fast.yaml", r, " ".join(r["overrides"])))
        print(f"fast done: {r}", flush=True)
    print(f"\nbudget {args.minutes:g} min of training per recipe, {torch.get_num_threads()} torch threads")
    print("| recipe | test accuracy | train images/s | epochs | training s | set by the script |")
    print("|---|---|---|---|---|---|")
    for title, r, note in rows:
        print(
            f"| {title} | {100 * r['acc']:.2f}% | {r['img_s']:.0f} | {r['epochs']:.2f} | {r['train_s']:.0f} | {note} |"
        )


if __name__ == "__main__":
    main()
