"""Multi-class detection: COCO mAP and per-class AP of `evaluate_detections` on a hand-made case against values
computed by hand (and pycocotools' COCOeval run directly), species-level detection on the real CUB subset, and
detection and segmentation on the built-in `shapes-multi`."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from resnetkit.tasks.detection import evaluate_detections

# ---------------------------------------------------------------------------------------- a known multi-class case

CLASSES = ["cat", "dog", "fox"]  # labels 1, 2, 3
GROUND_TRUTH = [  # per image: (box x1 y1 x2 y2, label)
    [([0, 0, 10, 10], 1), ([20, 20, 40, 40], 2)],
    [([0, 0, 20, 20], 1), ([50, 50, 70, 70], 3), ([60, 0, 80, 20], 2)],
]
DETECTIONS = [  # per image: (box, score, label)
    [
        ([0, 0, 10, 10], 0.9, 1),  # cat found exactly
        ([20, 20, 36, 36], 0.7, 2),  # dog at IoU 256/400 = 0.64: a hit at IoU thresholds .50, .55, .60 only
    ],
    [
        ([30, 30, 45, 45], 0.8, 1),  # a false positive cat, ranked between the two true ones
        ([0, 0, 20, 20], 0.6, 1),  # the second cat
        # the fox (50, 50, 70, 70) and the second dog (60, 0, 80, 20) are missed
    ],
]


def _coco_101(recall: list[float], precision: list[float]) -> float:
    """COCO's AP of one ranked list by hand: precision made monotone from the right, read at the 101 recall
    thresholds 0, .01, ..., 1 (the first rank reaching each threshold; 0 beyond the last recall)."""
    envelope = np.maximum.accumulate(np.asarray(precision, dtype=np.float64)[::-1])[::-1]
    total = 0.0
    for r in np.linspace(0, 1, 101):
        reached = [i for i, rc in enumerate(recall) if rc >= r - 1e-12]
        total += envelope[reached[0]] if reached else 0.0
    return total / 101


def _expected() -> dict[str, float]:
    # cat: ranked 0.9 hit, 0.8 miss, 0.6 hit of 2 boxes -> recall .5 .5 1, precision 1 .5 2/3, at every IoU threshold.
    cat = _coco_101([0.5, 0.5, 1.0], [1.0, 0.5, 2 / 3])
    assert cat == pytest.approx((51 + 50 * 2 / 3) / 101)
    # dog: one hit of 2 boxes (recall .5 at precision 1) at the 3 IoU thresholds up to .60, nothing above.
    dog_hit = _coco_101([0.5], [1.0])
    dog = 3 / 10 * dog_hit
    fox = 0.0  # its only box is missed
    return {
        "map": (cat + dog + fox) / 3,
        "map50": (cat + dog_hit + fox) / 3,
        "map75": (cat + 0.0 + fox) / 3,
        "cat": cat,
        "dog": dog,
        "fox": fox,
    }


class _Scripted(nn.Module):
    """A "detector" that returns the scripted detections of each image (its index is written in its pixels)."""

    def __init__(self, detections=DETECTIONS) -> None:
        super().__init__()
        self.detections = detections

    def forward(self, images):
        out = []
        for image in images:
            dets = self.detections[int(image[0, 0, 0])]
            out.append(
                {
                    "boxes": torch.tensor([b for b, _, _ in dets], dtype=torch.float32).reshape(-1, 4),
                    "scores": torch.tensor([s for _, s, _ in dets], dtype=torch.float32),
                    "labels": torch.tensor([c for _, _, c in dets], dtype=torch.int64),
                }
            )
        return out


class _Batches(list):
    classes = CLASSES


def _loader():
    images = [torch.full((3, 90, 90), float(i)) for i in range(len(GROUND_TRUTH))]
    targets = [
        {
            "boxes": torch.tensor([b for b, _ in gt], dtype=torch.float32),
            "labels": torch.tensor([c for _, c in gt]),
            "image_id": i,
        }
        for i, gt in enumerate(GROUND_TRUTH)
    ]
    return _Batches([(images, targets)])


def _cocoeval_directly() -> tuple[np.ndarray, np.ndarray]:
    """COCOeval's stats and per-category AP@[.5:.95] on the same case, the COCO dicts written out here."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
    dets = []
    for i, (boxes, found) in enumerate(zip(GROUND_TRUTH, DETECTIONS)):
        gt["images"].append({"id": i})
        for (x1, y1, x2, y2), label in boxes:
            w, h = x2 - x1, y2 - y1
            gt["annotations"].append(
                {"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": label, "bbox": [x1, y1, w, h],
                 "area": w * h, "iscrowd": 0}
            )  # fmt: skip
        for (x1, y1, x2, y2), score, label in found:
            dets.append({"image_id": i, "category_id": label, "score": score, "bbox": [x1, y1, x2 - x1, y2 - y1]})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dets), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"][:, :, :, 0, -1]
    return ev.stats, np.array([precision[:, :, k].mean() for k in range(len(CLASSES))])


def test_multiclass_map_equals_hand_computed_and_cocoeval():
    result = evaluate_detections(_Scripted(), _loader())
    expected = _expected()
    assert result["num_images"] == 2
    for key in ("map", "map50", "map75"):
        assert result[key] == pytest.approx(expected[key], abs=1e-9), key
    assert result["per_class_ap"] == pytest.approx({c: expected[c] for c in CLASSES}, abs=1e-9)
    stats, per_category = _cocoeval_directly()
    assert [result["map"], result["map50"], result["map75"]] == pytest.approx(stats[:3].tolist(), abs=1e-12)
    assert list(result["per_class_ap"].values()) == pytest.approx(per_category.tolist(), abs=1e-12)
    # The false positive costs the cat a third of its precision above recall .5: without it the cat is perfect.
    without = [DETECTIONS[0], DETECTIONS[1][1:]]
    assert evaluate_detections(_Scripted(without), _loader())["per_class_ap"]["cat"] == pytest.approx(1.0)


def test_per_class_ap_of_a_class_without_boxes_is_none():
    from resnetkit.tasks.detection import coco_map

    targets = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1])}]
    predictions = [
        {"boxes": torch.tensor([[0.0, 0, 10, 10], [5, 5, 9, 9]]), "scores": torch.tensor([0.9, 0.5]),
         "labels": torch.tensor([1, 2])}
    ]  # fmt: skip
    result = coco_map(targets, predictions, ["a", "b", "c"])
    assert result["per_class_ap"] == {"a": pytest.approx(1.0), "b": None, "c": None}
    assert result["map"] == pytest.approx(1.0)  # COCO averages only the classes with ground truth
    none = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}]
    assert coco_map(targets, none, ["a", "b"])["per_class_ap"] == {"a": 0.0, "b": None}


# ------------------------------------------------------------------------------------- CUB: ten species, ten classes

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cub_tree(root: Path, out: Path, train: int, test: int) -> Path:
    """A CUB-200-2011 tree of the first `train` training and `test` test images of each species: the official text
    files cut to those rows, images/ a symlink to the real folder."""
    rows = {
        name: [line.split(maxsplit=1) for line in (root / name).read_text().splitlines() if line.strip()]
        for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt")
    }
    label, is_train = dict(rows["image_class_labels.txt"]), dict(rows["train_test_split.txt"])
    kept, count = set(), {}
    for image_id, _ in rows["images.txt"]:
        key = (label[image_id], is_train[image_id])
        if count.get(key, 0) < (train if is_train[image_id] == "1" else test):
            count[key] = count.get(key, 0) + 1
            kept.add(image_id)
    out.mkdir(parents=True)
    for name, table in rows.items():
        (out / name).write_text("".join(f"{i} {rest}\n" for i, rest in table if i in kept))
    (out / "classes.txt").write_text((root / "classes.txt").read_text())
    (out / "images").symlink_to(root / "images")
    return out


def test_cub_species_detection_trains_and_reports_ap_per_species(cub_root, tmp_path, capsys, one_thread):
    from resnetkit.cli import main
    from resnetkit.config import load_config
    from resnetkit.train import train

    data = cub_tree(cub_root, tmp_path / "cub", train=2, test=1)
    species = [line.split()[1].split(".", 1)[1] for line in (cub_root / "classes.txt").read_text().splitlines()]
    overrides = [
        f"data.name={data}",
        f"output_dir={tmp_path}",
        "data.image_size=128",
        "data.workers=0",
        "train.epochs=1",
        "train.max_steps=3",
        "train.log_every_s=60",
        "schedule.warmup=1",
        "detection.proposals_train=64",
        "detection.proposals_test=32",
    ]
    cfg = load_config(CONFIGS / "detect_cub_species.yaml", overrides)
    assert cfg.task == "detection" and not cfg.data.class_agnostic
    result = train(cfg, quiet=True)
    ckpt = torch.load(result.best_checkpoint, weights_only=True)
    assert ckpt["classes"] == species and ckpt["model_kwargs"]["num_classes"] == 10
    assert ckpt["model"]["roi_heads.box_predictor.cls_score.weight"].shape[0] == 11  # ten species + background

    assert main(["eval", "--checkpoint", str(result.best_checkpoint), "--split", "test", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    evaluated = json.loads((result.run_dir / "eval" / "eval.json").read_text())
    assert evaluated["num_images"] == 10 and list(evaluated["per_class_ap"]) == species
    # every species has its one test box, so each has an AP (a number in [0, 1], none left out)
    assert all(0.0 <= ap <= 1.0 for ap in evaluated["per_class_ap"].values())
    assert evaluated["map"] == pytest.approx(np.mean(list(evaluated["per_class_ap"].values())), abs=1e-9)
    assert all(name in printed for name in species) and "AP@[.5:.95]" in printed


# ----------------------------------------------------------------------------- shapes-multi: detection, segmentation

SMALL_DETECTION = {
    "first_stage": 2,
    "fpn_channels": 32,
    "representation_size": 64,
    "proposals_train": 50,
    "proposals_test": 20,
    "anchor_sizes": [16, 32, 64],
    "rpn_batch_size": 32,
    "roi_batch_size": 32,
}


def test_shapes_multi_detection_data_is_every_shape_with_its_class():
    from resnetkit.data import SHAPE_CLASSES, build_dataset
    from resnetkit.tasks.detection import load_detection_data

    shapes = build_dataset("shapes-multi:20", "val", image_size=96)
    data = load_detection_data("shapes-multi:20", "val", image_size=96)
    assert len(data) == len(shapes) == 10 and data.classes == SHAPE_CLASSES
    counts = []
    for i in range(len(data)):
        image, target = data[i]
        assert image.shape == (3, 96, 96) and image.dtype == torch.float32
        assert torch.equal(target["labels"], shapes.box_labels(i) + 1)  # 0 is the background
        assert torch.equal(target["boxes"], shapes.boxes(i))
        mask = shapes.mask(i)
        for (x1, y1, x2, y2), label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            ys, xs = torch.nonzero(mask == label).unbind(1)  # the shape's pixels lie inside its box
            assert len(xs) and x1 - 1 <= xs.min() and xs.max() <= x2 and y1 - 1 <= ys.min() and ys.max() <= y2
        counts.append(len(target["labels"]))
    assert max(counts) > 1  # several objects per image
    agnostic = load_detection_data("shapes-multi:20", "val", image_size=96, class_agnostic=True)
    assert agnostic.classes == ["shape"] and all(set(lab.tolist()) == {1} for lab in agnostic.labels)


def test_shapes_multi_trains_a_detector_and_evaluates_it(tmp_path, capsys, one_thread):
    from resnetkit.cli import main
    from resnetkit.config import config_from_dict
    from resnetkit.data import SHAPE_CLASSES
    from resnetkit.train import train

    cfg = {
        "task": "detection",
        "name": "det-shapes",
        "output_dir": str(tmp_path),
        "model": {"name": "resnet20"},
        "data": {"name": "shapes-multi:20", "val_split": "val", "image_size": 96, "batch_size": 2, "workers": 0},
        "optim": {"name": "adamw", "lr": 0.005},
        "schedule": {"name": "cosine", "per": "step", "warmup": 1},
        "train": {"epochs": 1, "max_steps": 3, "log_every_s": 60},
        "detection": SMALL_DETECTION,
    }
    result = train(config_from_dict(cfg), quiet=True)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"train_loss", "train_loss_classifier", "val_map", "val_map50"} <= set(rows[-1])
    assert main(["eval", "--checkpoint", str(result.last_checkpoint), "--workers", "0"]) == 0
    evaluated = json.loads((result.run_dir / "eval" / "eval.json").read_text())
    assert evaluated["split"] == "val" and evaluated["num_images"] == 10 and evaluated["classes"] == SHAPE_CLASSES
    assert evaluated["map"] == pytest.approx(rows[-1]["val_map"])  # the same evaluation as training's validation
    assert set(evaluated["per_class_ap"]) == set(SHAPE_CLASSES)
    assert "circle" in capsys.readouterr().out


def test_shapes_multi_trains_a_unet_and_evaluates_it(tmp_path, one_thread):
    from resnetkit.config import config_from_dict
    from resnetkit.data import SHAPE_CLASSES, build_dataset
    from resnetkit.evaluation.evaluate import evaluate_task
    from resnetkit.tasks.segmentation import segmentation_data
    from resnetkit.train import train

    data = segmentation_data("shapes-multi:20", "val", image_size=32)
    shapes = build_dataset("shapes-multi:20", "val", image_size=32)
    assert data.classes == ["background", *SHAPE_CLASSES]  # 11 classes: the shapes' and the background
    assert torch.equal(data.labels[3], shapes.mask(3)) and torch.equal(data.images[3], shapes[3][0])
    assert len({int(c) for c in data.labels.unique()}) > 3  # several classes' masks, not one per image
    cfg = {
        "task": "segmentation",
        "name": "seg-shapes",
        "output_dir": str(tmp_path),
        "model": {"name": "resnet20"},
        "data": {"name": "shapes-multi:20", "val_split": "val", "image_size": 32, "batch_size": 4},
        "optim": {"name": "adamw", "lr": 1e-2},
        "train": {"epochs": 1, "max_steps": 3, "log_every_s": 60, "log_images": False},
        "segmentation": {"decoder_channels": 32},
    }
    result = train(config_from_dict(cfg), quiet=True)
    ckpt = torch.load(result.last_checkpoint, weights_only=True)
    assert ckpt["classes"] == ["background", *SHAPE_CLASSES] and ckpt["model_kwargs"]["num_classes"] == 11
    evaluated = evaluate_task(result.last_checkpoint, split="val", out_dir=tmp_path / "eval")
    assert evaluated["num_images"] == 10 and 0.0 <= evaluated["miou"] <= 1.0
    assert list(evaluated["per_class_iou"]) == ["background", *SHAPE_CLASSES]
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert evaluated["miou"] == pytest.approx(rows[-1]["val_miou"])
