"""Species-level detection on the CUB-200-2011 subset: train `configs/detect_cub_species.yaml` (ten species, ten
classes, one box per image) with the engine, evaluate best.pt on the test split, and print mAP and AP per species
beside a no-model baseline: the training set's mean relative box, once per species at the same score (it finds the
bird about as well as a fixed box can, and tells the species apart by chance).

    python benchmarks/detect_cub_species.py                       # the full run of BENCHMARKS.md (~30 min, 2 cores)
    python benchmarks/detect_cub_species.py --per-class 2 --set train.max_steps=3 --set data.image_size=128
                                                                  # a smoke run: 2 train + 2 test images per species

--per-class N links the first N training and N test images of each species into a smaller CUB tree (symlinks in
--out) and trains and evaluates on that.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

import resnetkit
from resnetkit.config import load_config
from resnetkit.data.image import image_size
from resnetkit.evaluation.evaluate import evaluate_task
from resnetkit.tasks.detection import coco_map, load_detection_data

ROOT = Path(__file__).resolve().parents[1]


def cub_subset(root: Path, out: Path, per_class: int) -> Path:
    """A CUB-200-2011 tree of the first `per_class` train and test images of each species: the official text files
    cut down to those rows, images/ a symlink to the real one."""
    tables = {
        name: [line.split(maxsplit=1) for line in (root / name).read_text().splitlines() if line.strip()]
        for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt")
    }
    label = dict(tables["image_class_labels.txt"])
    is_train = dict(tables["train_test_split.txt"])
    kept, count = set(), {}
    for image_id, _ in sorted(tables["images.txt"], key=lambda row: int(row[0])):
        key = (label[image_id].strip(), is_train[image_id].strip())
        if count.get(key, 0) < per_class:
            count[key] = count.get(key, 0) + 1
            kept.add(image_id)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in tables.items():
        (out / name).write_text("".join(f"{i} {rest}\n" for i, rest in rows if i in kept))
    (out / "classes.txt").write_text((root / "classes.txt").read_text())
    if not (out / "images").exists():
        os.symlink((root / "images").resolve(), out / "images")
    return out


def mean_box_baseline(train, test, num_classes: int) -> dict:
    """COCO AP of the training set's mean relative box, put on every test image once per species (score 0.5)."""
    relative = []
    for i in range(len(train)):
        w, h = image_size(train.paths[i])
        relative.append(train.boxes[i][0] / torch.tensor([w, h, w, h]))
    mean = torch.stack(relative).mean(0)
    targets, predictions = [], []
    for i in range(len(test)):
        w, h = image_size(test.paths[i])
        box = mean * torch.tensor([w, h, w, h], dtype=torch.float32)
        targets.append(test.target(i))
        predictions.append(
            {
                "boxes": box.repeat(num_classes, 1),
                "scores": torch.full((num_classes,), 0.5),
                "labels": torch.arange(1, num_classes + 1),
            }
        )
    return coco_map(targets, predictions, test.classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "detect_cub_species.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cub200-2011-subset" / "CUB_200_2011"))
    parser.add_argument("--per-class", type=int, default=None, help="train and test images per species (default all)")
    parser.add_argument("--out", default="runs", help="output_dir of the run (default runs)")
    args = parser.parse_args()

    data = Path(args.data)
    if args.per_class is not None:
        data = cub_subset(data, Path(args.out) / f"cub-{args.per_class}-per-species", args.per_class)
    cfg = load_config(args.config, [f"data.name={data}", f"output_dir={args.out}", *args.overrides])
    started = time.time()
    result = resnetkit.train(cfg)
    train_s = time.time() - started
    started = time.time()
    metrics = evaluate_task(result.best_checkpoint, split="test", out_dir=result.run_dir / "eval")
    eval_s = time.time() - started
    train_set = load_detection_data(data, "train")
    test_set = load_detection_data(data, "test")
    baseline = mean_box_baseline(train_set, test_set, len(test_set.classes))

    print(f"\n{len(train_set)} training and {len(test_set)} test images, {len(test_set.classes)} species")
    print(f"training {train_s / 60:.1f} min (with its validations), evaluation of best.pt {eval_s:.0f} s")
    print("\n| | mAP@[.5:.95] | mAP@.5 | mAP@.75 |\n|---|---:|---:|---:|")
    for name, m in (("baseline: the mean box, every species at one score", baseline), ("best.pt", metrics)):
        print(f"| {name} | {m['map']:.3f} | {m['map50']:.3f} | {m['map75']:.3f} |")
    print("\n| species | AP@[.5:.95] baseline | AP@[.5:.95] best.pt |\n|---|---:|---:|")
    for species, ap in metrics["per_class_ap"].items():
        base = baseline["per_class_ap"].get(species)
        print(f"| {species} | {_ap(base)} | {_ap(ap)} |")


def _ap(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
