"""Class imbalance on real CIFAR-10: one class cut to 2% of its training images, trained three ways by the engine:
plainly, with the class-balanced sampler (`data.sampler: balanced`) and with inverse-frequency class weights
(`loss.class_weights: auto`). Prints, side by side, the rare class's test recall, the balanced accuracy (mean
per-class recall) and the overall test accuracy, evaluated on the full, balanced test split.

    python benchmarks/imbalance.py [--rare cat] [--fraction 0.02] [--per-class 5000] [--epochs 10]
    python benchmarks/imbalance.py --quick        # a smoke run: 60 images per class, one epoch

The imbalanced training tree is built of symbolic links to ../shared/data/cifar10-jpg in a temporary folder (the
test split is linked whole); every run uses configs/cifar10_fast.yaml (ResNet-20, one-cycle SGD, label
smoothing), the same seed and the same number of epochs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "plain": [],
    "balanced sampler": ["data.sampler=balanced"],
    "class weights auto": ["loss.class_weights=auto"],
}


def imbalanced_tree(source: Path, out: Path, rare: str, fraction: float, per_class: int, test_per_class: int) -> dict:
    """out/train/<class>/ links to the first `per_class` images of each class (the rare one: `fraction` of them),
    out/test/<class>/ to the first `test_per_class` test images (all of them when 0). Returns the counts."""
    classes = sorted(e.name for e in os.scandir(source / "train") if e.is_dir())
    if rare not in classes:
        raise SystemExit(f"--rare {rare!r} is not a CIFAR-10 class: {', '.join(classes)}")
    counts = {}
    for split, n in (("train", per_class), ("test", test_per_class)):
        for name in classes:
            files = sorted((source / split / name).iterdir())
            keep = len(files) if n == 0 else min(n, len(files))
            if split == "train" and name == rare:
                keep = max(1, round(keep * fraction))
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for f in files[:keep]:
                (folder / f.name).symlink_to(f.resolve())
            counts[(split, name)] = keep
    return counts


def run(tree: Path, out: Path, name: str, overrides: list[str], args: argparse.Namespace) -> dict:
    from resnetkit.config import load_config
    from resnetkit.evaluation.evaluate import evaluate
    from resnetkit.train.fit import train

    cfg = load_config(
        ROOT / "configs" / "cifar10_fast.yaml",
        [
            f"data.name={tree}",
            f"output_dir={out}",
            f"name={name.replace(' ', '-')}",
            f"seed={args.seed}",
            f"train.epochs={args.epochs}",
            f"data.batch_size={args.batch_size}",
            f"model.name={args.model}",
            "data.eval_batch_size=500",
            *([f"train.threads={args.threads}"] if args.threads else []),
            *overrides,
        ],
    )
    started = time.perf_counter()
    result = train(cfg, quiet=True)
    seconds = time.perf_counter() - started
    checkpoint = result.last_checkpoint  # the end of the schedule, as every variant: no choice on the test split
    ev = evaluate(checkpoint, split="test", tta="flip", workers=0)
    recall = {r["class"]: r["recall"] for r in ev["per_class"]}
    return {
        "rare_recall": recall[args.rare],
        "balanced_accuracy": ev["balanced_accuracy"],
        "accuracy": ev["top1"],
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpg"))
    parser.add_argument("--rare", default="cat", help="the class cut down (default cat)")
    parser.add_argument("--fraction", type=float, default=0.02, help="share of the rare class's images kept")
    parser.add_argument("--per-class", type=int, default=5000, help="training images of each other class")
    parser.add_argument("--test-per-class", type=int, default=0, help="test images per class (0: all 1,000)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", help="comma-separated variants to run (default: all three)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 60 training, 20 test images per class")
    args = parser.parse_args()
    if args.quick:
        args.per_class, args.test_per_class, args.epochs, args.batch_size = 60, 20, 1, 32
        args.fraction = max(args.fraction, 0.05)  # at least 3 rare images
    variants = VARIANTS if not args.only else {k: VARIANTS[k] for k in args.only.split(",")}

    with tempfile.TemporaryDirectory(prefix="imbalance-bench-") as tmp:
        tree = Path(tmp) / "cifar10-imbalanced"
        counts = imbalanced_tree(Path(args.data), tree, args.rare, args.fraction, args.per_class, args.test_per_class)
        n_rare, n_other = counts[("train", args.rare)], args.per_class
        print(
            f"CIFAR-10 with {args.rare} cut to {n_rare} training images ({n_rare / max(n_other, 1):.1%} of "
            f"{n_other} per other class); {args.model}, {args.epochs} epochs, seed {args.seed}; test: "
            f"{sum(v for (s, _), v in counts.items() if s == 'test')} images, balanced"
        )
        rows = {name: run(tree, Path(tmp) / "runs", name, overrides, args) for name, overrides in variants.items()}
    print(f"\n{'variant':<20} {args.rare + ' recall':>12} {'balanced acc':>13} {'accuracy':>9} {'train s':>8}")
    for name, r in rows.items():
        print(
            f"{name:<20} {r['rare_recall']:>12.4f} {r['balanced_accuracy']:>13.4f} {r['accuracy']:>9.4f} "
            f"{r['seconds']:>8.1f}"
        )


if __name__ == "__main__":
    main()
