"""CIFAR-10 in a fixed time budget: the source article's plain recipe against resnetkit's budgeted recipe, one run.

    python benchmarks/cifar10_cpu_budget.py [--minutes 10] [--seeds 0,1,2] [--data ../shared/data/cifar10-jpg]

(a) plain: the article's way: torchvision ResNet-18 (num_classes=10), torchvision ImageFolder with per-sample
    transforms (pad-4 random crop, flip, ToTensor, Normalize), DataLoader(batch 128, shuffle, 2 workers), SGD lr 0.1
    momentum 0.9 weight decay 5e-4, StepLR; trains until the budget is spent, then evaluates the test set (the
    evaluation is outside its budget: in its favour).
(b) `resnetkit train --config configs/cifar10_cpu10m.yaml --budget <minutes>m`, once per seed: the engine plans the
    steps that fit, training and the final evaluation inside the budget, from the first instruction of `train()`
    (the JPEGs' uint8 cache is built before the first seed, once, and timed apart).
For (b) the table gives the test accuracy (with the recipe's TTA; of the weights `train.metric` names: the model's
by default, the EMA's with `val_ema_acc`), the training images/s, the epochs done, and the seconds of the budget
left unused; then the mean and spread over the seeds.
"""

from __future__ import annotations

import argparse
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


def budgeted(data: Path, budget_s: float, out: Path, seed: int, recipe: Path) -> dict:
    import json

    from resnetkit.config import load_config
    from resnetkit.train.fit import train

    cfg = load_config(
        recipe,
        [f"data.name={data}", f"output_dir={out}", f"name=seed{seed}", f"seed={seed}", f"train.budget={budget_s}"],
    )
    started = time.perf_counter()
    result = train(cfg, quiet=True)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    metric = cfg.train.metric or "val_acc"
    last = rows[-1]
    images = sum(r["images_per_s"] * r["epoch_time_s"] for r in rows)
    return {
        "acc": last.get(metric, last["val_acc"]),
        "img_s": images / sum(r["epoch_time_s"] for r in rows),
        "epochs": last["step"] * cfg.data.batch_size / 50_000,
        "wall_s": wall,
        "unused_s": budget_s - wall,
        "run_dir": result.run_dir,
    }


def warm_cache(data: Path, recipe: Path) -> float:
    """Build (or read) the uint8 cache of the training JPEGs, timed apart from the budgets."""
    from resnetkit.config import load_config
    from resnetkit.data import build_loader

    cfg = load_config(recipe, [f"data.name={data}"])
    started = time.perf_counter()
    for split in ("train", cfg.data.val_split):
        build_loader(cfg.data.name, split, preset="cifar", batch_size=256, train=split == "train", fast=True)
    return time.perf_counter() - started


def main() -> None:
    import statistics

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="budget of each run")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of recipe (b)")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/cifar10-jpg")
    ap.add_argument("--recipe", type=Path, default=ROOT / "configs/cifar10_cpu10m.yaml")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the plain recipe")
    ap.add_argument("--out", type=Path, default=None, help="run folder parent for (b) (default: a temporary folder)")
    ap.add_argument("--only", choices=["plain", "budget"], default=None)
    args = ap.parse_args()
    budget = args.minutes * 60
    out = args.out or Path(tempfile.mkdtemp(prefix="cifar10_budget_"))
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {torch.get_num_threads()} torch threads, load {load}")
    rows = []
    if args.only != "budget":
        r = plain(args.data, budget, args.workers)
        rows.append(("(a) plain: torchvision ResNet-18, per-sample DataLoader", r))
        print(f"plain done: {r}", flush=True)
    if args.only != "plain":
        print(f"uint8 cache of the JPEGs: {warm_cache(args.data, args.recipe):.1f} s (once, outside the budgets)")
        ours = []
        for seed in (int(s) for s in args.seeds.split(",")):
            r = budgeted(args.data, budget, out, seed, args.recipe)
            ours.append(r)
            rows.append((f"(b) resnetkit {args.recipe.name} --budget {args.minutes:g}m, seed {seed}", r))
            print(f"seed {seed} done: {r}", flush=True)
    print(f"\nbudget {args.minutes:g} min per run; load average after: {Path('/proc/loadavg').read_text().split()[:3]}")
    print("| recipe | test accuracy | train images/s | epochs | wall s | unused s |")
    print("|---|---:|---:|---:|---:|---:|")
    for title, r in rows:
        wall = r.get("wall_s", r.get("train_s"))
        unused = f"{r['unused_s']:.1f}" if "unused_s" in r else "-"
        print(f"| {title} | {100 * r['acc']:.2f}% | {r['img_s']:.0f} | {r['epochs']:.2f} | {wall:.0f} | {unused} |")
    if args.only != "plain" and len(ours) > 1:
        accs = [100 * r["acc"] for r in ours]
        print(
            f"\n(b) over {len(ours)} seeds: mean {statistics.mean(accs):.2f}%, sd {statistics.stdev(accs):.2f}, "
            f"min {min(accs):.2f}%, max {max(accs):.2f}%; run folders (curves.png) in {out}"
        )


if __name__ == "__main__":
    main()
