"""Multi-label classification on CIFAR-10 mosaics (2 x 2 tiles of the real JPEGs, labelled with the set of their
classes), a zoo ResNet trained on the CPU by the engine: mAP, per-class AP, F1 at the F1-optimal thresholds, exact
match, Hamming loss and wall time, against the label-frequency baseline (a constant predictor: its AP is each
class's frequency, its mAP the mean label frequency).

    python benchmarks/multilabel_mosaic.py [--mosaics 5000] [--epochs 10] [--model resnet9 --width 0.25]
    python benchmarks/multilabel_mosaic.py --quick          # a smoke run: 200 mosaics, one epoch

Training mosaics come from the train/ split, validation and test mosaics from test/ (`cifar10-mosaic`): the
thresholds are chosen on the validation mosaics, which are the test mosaics here, so the thresholded numbers (F1,
exact match, Hamming loss) are optimistic; mAP does not depend on thresholds.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def recipe(args: argparse.Namespace, out: Path) -> dict:
    options = {"width": args.width, "scale": 1.0} if args.model == "resnet9" else {}
    return {
        "task": "multilabel",
        "name": "mosaic",
        "output_dir": str(out),
        "seed": args.seed,
        "model": {"name": args.model, "options": options},
        "data": {
            "name": f"cifar10-mosaic:{args.data}:{args.mosaics}",
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "workers": 0,
            "fast": True,
        },
        "optim": {"name": "adamw", "lr": args.lr, "weight_decay": 5e-4},
        "schedule": {"name": "onecycle", "per": "step", "pct_start": 0.25},
        "train": {"epochs": args.epochs, "channels_last": True, "threads": args.threads, "log_every_s": 30},
        "loss": {"name": args.loss},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpg"))
    parser.add_argument("--mosaics", type=int, default=5000, help="training mosaics (val/test: a fifth as many)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--model", default="resnet9")
    parser.add_argument("--width", type=float, default=0.25, help="resnet9 channel multiplier")
    parser.add_argument("--image-size", type=int, default=64, help="mosaic side in pixels (64: 32 px tiles)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.004)
    parser.add_argument("--loss", default="bce", choices=["bce", "focal", "asymmetric"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="run folder parent (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 200 mosaics at 32 px, one epoch")
    args = parser.parse_args()
    if args.quick:
        args.mosaics, args.epochs, args.image_size, args.batch_size = 200, 1, 32, 32

    from resnetkit.data import build_dataset
    from resnetkit.evaluation.evaluate import evaluate
    from resnetkit.train.fit import train

    with tempfile.TemporaryDirectory(prefix="mosaic-bench-") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        cfg = recipe(args, out)
        started = time.perf_counter()
        result = train(cfg, quiet=True)
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        ev = evaluate(result.best_checkpoint, split="test", out_dir=result.run_dir / "eval", workers=0)
        eval_s = time.perf_counter() - started
        test = build_dataset(cfg["data"]["name"], "test")
        positives = torch.zeros(len(test.classes))
        for labels in test.label_sets:
            positives[labels] += 1
        frequency = positives / len(test)  # a constant predictor's AP per class
        baseline = float(frequency.mean())

        width = f" width {args.width}" if args.model == "resnet9" else ""
        print(
            f"\n{args.model}{width}, {args.mosaics} training mosaics ({args.image_size} px), {args.epochs} epochs, "
            f"loss {args.loss}, {torch.get_num_threads()} threads; test: {ev['num_samples']} mosaics, "
            f"{ev['label_cardinality']:.2f} labels per image"
        )
        print(f"{'class':<12} {'AP':>7} {'baseline':>9} {'F1':>7} {'threshold':>10}")
        for row, base in zip(ev["per_class"], frequency.tolist()):
            ap = "-" if row["ap"] is None else f"{row['ap']:.4f}"
            print(f"{row['class']:<12} {ap:>7} {base:>9.4f} {row['f1']:>7.4f} {row['threshold']:>10.3f}")
        print(f"{'mAP':<12} {ev['map']:>7.4f} {baseline:>9.4f}")
        print(
            f"F1 macro {ev['f1_macro']:.4f}, exact match {ev['exact_match']:.4f}, Hamming loss "
            f"{ev['hamming_loss']:.4f} (at the validation thresholds)"
        )
        print(f"training {train_s:.1f} s (data preparation included), evaluation {eval_s:.1f} s")
        print(f"run folder: {result.run_dir}" if args.out else "")


if __name__ == "__main__":
    main()
