"""Detection: the detector on zoo backbones, data (COCO JSON, CUB boxes, box-moving augmentation), COCO mAP against
pycocotools/torchmetrics on known answers, an overfitting run, drawing, and the `detect` command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torchvision.ops import FrozenBatchNorm2d, box_iou

from resnetkit.cli import main
from resnetkit.data.image import decode_image as read_rgb
from resnetkit.data.image import save_image as save_rgb
from resnetkit.tasks.detection import (
    coco_map,
    create_detector,
    detection_transform,
    draw_detections,
    freeze_batchnorm,
    load_detection_data,
    read_coco,
)

# Small and cheap: a detector for 64-128 px images with slim pyramid and heads.
SMALL = dict(
    min_size=96,
    max_size=96,
    fpn_channels=32,
    representation_size=64,
    rpn_batch_size=32,
    roi_batch_size=32,
    proposals_train=50,
    proposals_test=20,
)
RED = torch.tensor([230, 40, 30], dtype=torch.uint8)


def _scene(generator: torch.Generator, size: int = 96) -> tuple[torch.Tensor, list[float]]:
    """A dark noisy uint8 image holding one red rectangle; returns it and the rectangle as x, y, w, h."""
    image = (torch.rand(3, size, size, generator=generator) * 70).to(torch.uint8)
    w, h = (int(torch.randint(size // 3, size // 2, (1,), generator=generator)) for _ in range(2))
    x, y = (
        int(torch.randint(0, size - w, (1,), generator=generator)),
        int(torch.randint(0, size - h, (1,), generator=generator)),
    )
    image[:, y : y + h, x : x + w] = RED[:, None, None]
    return image, [x, y, w, h]


def make_coco(root: Path, splits=(("train", 4), ("val", 3)), size: int = 96) -> Path:
    """A COCO-format folder: <split>.json and PNG images, one red box (category id 7, "box") per image."""
    root.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for split, n in splits:
        images, annotations = [], []
        for i in range(n):
            image, bbox = _scene(generator, size)
            save_rgb(image, root / f"{split}{i}.png")
            images.append({"id": 100 + i, "file_name": f"{split}{i}.png", "width": size, "height": size})
            annotations.append({"id": i + 1, "image_id": 100 + i, "category_id": 7, "bbox": bbox, "iscrowd": 0})
        data = {"images": images, "annotations": annotations, "categories": [{"id": 7, "name": "box"}]}
        (root / f"{split}.json").write_text(json.dumps(data))
    return root


@pytest.fixture
def one_thread():
    """The training tests run on one thread: on 2 cores busy with other jobs, a detection step took 0.5 s of CPU with
    one thread and 4 s with two (OpenMP threads spin waiting), and one thread costs little on an idle machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_detector_output_structure(backbone):
    torch.manual_seed(0)
    model = create_detector(backbone=backbone, num_classes=3, **SMALL)
    images = [torch.rand(3, 80, 96), torch.rand(3, 96, 64)]
    targets = [
        {"boxes": torch.tensor([[10.0, 10, 50, 60]]), "labels": torch.tensor([2])},
        {"boxes": torch.tensor([[5.0, 20, 40, 90], [30, 5, 60, 40]]), "labels": torch.tensor([1, 3])},
    ]
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for o, image in zip(out, images):
        assert set(o) == {"boxes", "labels", "scores"}
        n = len(o["scores"])
        assert o["boxes"].shape == (n, 4) and o["labels"].shape == (n,) and o["labels"].dtype == torch.int64
        assert ((o["labels"] >= 1) & (o["labels"] <= 3)).all()  # 0 is the background, never reported
        assert (o["boxes"][:, 2] <= image.shape[2] + 1e-3).all() and (o["boxes"][:, 3] <= image.shape[1] + 1e-3).all()
    # The pyramid: one level per stage (strides 4..32 for resnet50) plus the max-pooled one.
    assert model.backbone.reductions == [4, 8, 16, 32, 64]


def test_frozen_stages_and_batchnorm():
    model = create_detector(backbone="resnet18", num_classes=1, trainable_layers=2, frozen_bn=True, **SMALL)
    body = model.backbone.body
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    learning = {name.split(".")[0] for name, p in body.named_parameters() if p.requires_grad}
    assert learning == {"layer3", "layer4"}
    assert all(p.requires_grad for p in model.rpn.parameters()) and all(
        p.requires_grad for p in model.roi_heads.parameters()
    )
    # From scratch (no weights) the defaults train everything with ordinary BatchNorm.
    scratch = create_detector(backbone="resnet18", num_classes=1, **SMALL)
    assert all(p.requires_grad for p in scratch.parameters())
    assert any(isinstance(m, nn.BatchNorm2d) for m in scratch.backbone.body.modules())
    with pytest.raises(ValueError, match="trainable_layers"):
        create_detector(backbone="resnet18", num_classes=1, trainable_layers=7, **SMALL)
    with pytest.raises(ValueError, match="did you mean 'resnet18'|resnet18"):
        create_detector(backbone="resnet19", num_classes=1)


def test_freeze_batchnorm_keeps_the_function():
    from resnetkit import create_model

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=5)
    model.train()
    model(torch.rand(8, 3, 64, 64))  # give the running statistics non-trivial values
    model.eval()
    x = torch.rand(2, 3, 64, 64)
    expected = model(x)
    freeze_batchnorm(model)
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_pretrained_backbone_file_is_loaded(tmp_path):
    from resnetkit import create_model

    torch.manual_seed(1)
    source = create_model("resnet18")
    torch.save(source.state_dict(), tmp_path / "r18.pt")
    model = create_detector(backbone="resnet18", num_classes=1, weights=str(tmp_path / "r18.pt"), **SMALL)
    assert torch.equal(model.backbone.body.layer2[0].conv1.weight, source.layer2[0].conv1.weight)
    # With weights, torchvision's fine-tuning defaults: frozen BN, the top three blocks learning.
    learning = {n.split(".")[0] for n, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert learning == {"layer2", "layer3", "layer4"}


def test_overfits_a_handful_of_images(one_thread):
    """Four 128 px images with one box each: a short CPU training finds every box (IoU > 0.5)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(3)
    images, targets = [], []
    for _ in range(4):
        image, (x, y, w, h) = _scene(generator, 128)
        images.append(image.float() / 255)
        targets.append(
            {"boxes": torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32), "labels": torch.tensor([1])}
        )
    model = create_detector(
        backbone="resnet18",
        num_classes=1,
        min_size=128,
        max_size=128,
        first_stage=2,
        fpn_channels=64,
        representation_size=128,
        anchor_sizes=[32, 64, 128, 256],
        rpn_batch_size=64,
        roi_batch_size=64,
        proposals_train=100,
        proposals_test=50,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ious = []
    for step in range(1, 41):
        model.train()
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 0:
            model.eval()
            with torch.no_grad():
                out = model(images)
            ious = [
                box_iou(o["boxes"][:1], t["boxes"]).max().item() if len(o["boxes"]) else 0.0
                for o, t in zip(out, targets)
            ]
            if min(ious) > 0.5:
                break
    assert min(ious) > 0.5, f"top-scoring boxes' IoU with the training boxes: {ious}"


# ----------------------------------------------------------------------------------------------------------- data


def test_read_coco_maps_categories_and_boxes(tmp_path):
    data = {
        "images": [{"id": 5, "file_name": "a.png"}, {"id": 9, "file_name": "sub/b.png"}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 30, "bbox": [10, 20, 30, 40]},
            {"id": 2, "image_id": 5, "category_id": 4, "bbox": [0, 0, 5, 5]},
            {"id": 3, "image_id": 9, "category_id": 4, "bbox": [1, 1, 50, 50], "iscrowd": 1},
            {"id": 4, "image_id": 9, "category_id": 30, "bbox": [1, 1, 0, 7]},
        ],
        "categories": [{"id": 30, "name": "cat"}, {"id": 4, "name": "dog"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    ds = read_coco(path)
    assert ds.classes == ["dog", "cat"]  # category ids in order (4, 30) become labels 1, 2
    assert ds.paths == [tmp_path / "a.png", tmp_path / "sub" / "b.png"]
    assert torch.equal(ds.boxes[0], torch.tensor([[10.0, 20, 40, 60], [0, 0, 5, 5]]))  # xywh -> xyxy
    assert ds.labels[0].tolist() == [2, 1]
    assert ds.boxes[1].shape == (0, 4)  # the crowd box and the empty box are left out; the image stays
    assert load_detection_data(path).classes == ["dog", "cat"]


@pytest.mark.parametrize(
    "broken, message",
    [
        ({"images": []}, "missing list 'annotations'"),
        ({"images": [{"file_name": "a.png"}], "annotations": [], "categories": []}, "lacks 'id'"),
        (
            {
                "images": [{"id": 1, "file_name": "a.png"}],
                "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1]}],
                "categories": [{"id": 1, "name": "x"}],
            },
            "unknown image_id 2",
        ),
        (
            {
                "images": [{"id": 1, "file_name": "a.png"}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1]}],
                "categories": [{"id": 1, "name": "x"}],
            },
            "bbox must be",
        ),
    ],
)
def test_read_coco_names_the_problem(tmp_path, broken, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=message) as info:
        read_coco(path)
    assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="no test.json"):
        load_detection_data(tmp_path, "test")


def test_cub_boxes(cub_root):
    train = load_detection_data(cub_root, "train", class_agnostic=True)
    test = load_detection_data(cub_root, "test", class_agnostic=True)
    assert (len(train), len(test)) == (300, 243) and train.classes == ["bird"]
    # The first training image's box, read straight from bounding_boxes.txt (x y w h -> x1 y1 x2 y2).
    ids = {line.split()[1]: line.split()[0] for line in (cub_root / "images.txt").read_text().splitlines()}
    image_id = ids[str(train.paths[0].relative_to(cub_root / "images"))]
    row = next(
        line.split()
        for line in (cub_root / "bounding_boxes.txt").read_text().splitlines()
        if line.split()[0] == image_id
    )
    x, y, w, h = map(float, row[1:])
    assert train.target(0)["boxes"].tolist() == [[x, y, x + w, y + h]]
    image, target = train[0]
    assert image.dtype == torch.float32 and target["labels"].tolist() == [1]
    assert (target["boxes"][:, 2] <= image.shape[2]).all() and (target["boxes"][:, 3] <= image.shape[1]).all()
    species = load_detection_data(cub_root, "test")  # one class per species unless class_agnostic
    assert len(species.classes) == 10 and {int(t) for t in species.labels[0]} <= set(range(1, 11))
    assert {int(lab) for labs in species.labels for lab in labs} == set(range(1, 11))


def test_augmentation_moves_boxes_with_pixels():
    from torchvision import tv_tensors

    # A 120 x 100 image with a red rectangle left of centre: x 10..40 of 100, y 30..90 of 120.
    image = torch.zeros(3, 120, 100, dtype=torch.uint8)
    image[:, 30:90, 10:40] = RED[:, None, None]
    box = tv_tensors.BoundingBoxes(torch.tensor([[10.0, 30, 40, 90]]), format="XYXY", canvas_size=(120, 100))
    transform = detection_transform(True, image_size=64)
    flips, sizes = 0, set()
    for seed in range(8):
        torch.manual_seed(seed)
        out, target = transform(tv_tensors.Image(image), {"boxes": box, "labels": torch.tensor([1])})
        assert max(out.shape[-2:]) <= 64 and out.dtype == torch.float32
        sizes.add(tuple(out.shape[-2:]))
        x1, y1, x2, y2 = target["boxes"][0].round().int().tolist()
        inside = out[:, y1 + 1 : y2 - 1, x1 + 1 : x2 - 1]
        assert inside[0].mean() > 0.8 and inside[1].mean() < 0.2  # the red rectangle is still under its box
        # ...and nothing red outside it (one pixel of margin for the resize's smoothing of the edges)
        around = out[0, max(0, y1 - 1) : y2 + 1, max(0, x1 - 1) : x2 + 1]
        assert out[0].sum().item() == pytest.approx(around.sum().item(), rel=0.02)
        flips += (x1 + x2) / 2 > out.shape[-1] / 2  # the rectangle moved right of centre: a flip
    assert 0 < flips < 8 and len(sizes) > 1  # both flipped and unflipped, at more than one scale


# ------------------------------------------------------------------------------------------------------- metrics


def _t(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels)}


def _p(boxes, scores, labels):
    return {**_t(boxes, labels), "scores": torch.tensor(scores, dtype=torch.float32)}


def test_map_known_answers():
    targets = [_t([[10, 10, 60, 60]], [1]), _t([[20, 30, 90, 80], [0, 0, 30, 30]], [1, 2])]
    perfect = [_p([[10, 10, 60, 60]], [0.9], [1]), _p([[20, 30, 90, 80], [0, 0, 30, 30]], [0.8, 0.7], [1, 2])]
    m = coco_map(targets, perfect)
    assert m["map"] == pytest.approx(1.0) and m["map50"] == pytest.approx(1.0) and m["map75"] == pytest.approx(1.0)
    # One of the two class-1 boxes found, class 2 perfect: class 1 reaches recall 0.5 at precision 1, which COCO's
    # 101-point interpolation scores 51/101; the mean over the two classes is (51/101 + 1) / 2.
    half = [_p([[10, 10, 60, 60]], [0.9], [1]), _p([[0, 0, 30, 30]], [0.7], [2])]
    assert coco_map(targets, half)["map50"] == pytest.approx((51 / 101 + 1) / 2, abs=1e-6)
    # A box shifted to IoU 0.6 counts at .5 but not at .75 (nor above .6).
    target = [_t([[0, 0, 100, 100]], [1])]
    shifted = [_p([[0, 0, 100, 60]], [0.9], [1])]  # IoU = 6000 / 10000
    m = coco_map(target, shifted)
    assert m["map50"] == pytest.approx(1.0) and m["map75"] == 0.0 and m["map"] == pytest.approx(0.3)  # 3 of 10 IoUs
    assert coco_map(target, [_p([], [], [])])["map"] == 0.0  # nothing predicted


def test_map_agrees_with_torchmetrics():
    torchmetrics_detection = pytest.importorskip("torchmetrics.detection")
    generator = torch.Generator().manual_seed(0)
    targets, predictions = [], []
    for _ in range(6):
        xy = torch.rand(3, 2, generator=generator) * 80
        boxes = torch.cat([xy, xy + 10 + torch.rand(3, 2, generator=generator) * 60], 1)
        labels = torch.randint(1, 3, (3,), generator=generator)
        noisy = boxes + torch.randn(3, 4, generator=generator) * 6
        extra = torch.tensor([[5.0, 5, 40, 40]])
        targets.append({"boxes": boxes, "labels": labels})
        predictions.append(
            {
                "boxes": torch.cat([noisy, extra]),
                "labels": torch.cat([labels, torch.tensor([1])]),
                "scores": torch.rand(4, generator=generator),
            }
        )
    ours = coco_map(targets, predictions)
    # pycocotools' thresholds exactly (torchmetrics' defaults come from a float32 linspace: 0.550000011920929...)
    iou_thresholds = np.linspace(0.5, 0.95, 10).tolist()
    rec_thresholds = np.linspace(0.0, 1.0, 101).tolist()
    metric = torchmetrics_detection.MeanAveragePrecision(
        box_format="xyxy",
        iou_type="bbox",
        backend="pycocotools",
        iou_thresholds=iou_thresholds,
        rec_thresholds=rec_thresholds,
    )
    metric.update(predictions, targets)
    theirs = metric.compute()
    assert 0.05 < ours["map"] < 0.95
    for key in ("map", "map_50", "map_75"):
        assert ours[key.replace("_", "")] == pytest.approx(float(theirs[key]), abs=1e-6), key


# ------------------------------------------------------------------------------------------------------ drawing


def test_draw_detections():
    image = torch.zeros(3, 80, 100, dtype=torch.uint8)
    det = _p([[10, 10, 60, 50], [70, 60, 90, 75]], [0.9, 0.2], [1, 1])
    drawn = draw_detections(image, det, ["bird"], score_thresh=0.5)
    assert drawn.shape == image.shape and drawn.dtype == torch.uint8
    assert drawn[0, 30, 10] > 200  # the red edge of the kept box
    assert drawn[:, 62:75, 72:88].sum() == 0  # the low-scoring box is not drawn
    assert drawn[:, 35:48, 20:50].sum() == 0  # the box's inside stays untouched


# ------------------------------------------------------------------------------------------------- the command


def detection_recipe(data: Path, out: Path, /, **sections) -> dict:
    """A tiny detection run: resnet20 (a CIFAR ResNet: three stages at strides 1, 2, 4) keeps the checkpoints small
    and the steps quick."""
    cfg = {
        "task": "detection",
        "name": "det",
        "output_dir": str(out),
        "model": {"name": "resnet20"},
        "data": {"name": str(data), "val_split": "val", "image_size": 96, "batch_size": 2, "workers": 0},
        "optim": {"name": "adamw", "lr": 0.005},
        "schedule": {"name": "cosine", "per": "step", "warmup": 1},
        "train": {"epochs": 1, "log_every_s": 30},
        "detection": {
            "first_stage": 2,
            "fpn_channels": 32,
            "representation_size": 64,
            "proposals_train": 50,
            "proposals_test": 20,
            "anchor_sizes": [16, 32, 64],
            "rpn_batch_size": 32,
            "roi_batch_size": 32,
        },
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def test_detect_command_end_to_end(tmp_path, capsys, one_thread):
    import yaml

    data = make_coco(tmp_path / "data")
    run = tmp_path / "det"
    recipe = tmp_path / "det.yaml"
    recipe.write_text(yaml.safe_dump(detection_recipe(data, tmp_path)))
    assert main(["train", "--config", str(recipe)]) == 0
    for name in ("last.pt", "best.pt", "config.yaml", "metrics.jsonl", "curves.png", "train.log"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1] and {"train_loss", "val_map", "val_map50", "val_map75"} <= set(rows[0])

    assert main(["train", "--config", str(recipe), "--set", "train.epochs=2", "--resume"]) == 0
    assert "resumed" in capsys.readouterr().out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["classes"] == ["box"] and ckpt["task"] == "detection"

    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--split", "val"]) == 0
    result = json.loads((run / "eval" / "eval.json").read_text())
    assert result["num_images"] == 3 and all(0.0 <= result[k] <= 1.0 for k in ("map", "map50", "map75"))
    assert result["map"] == pytest.approx(rows[-1]["val_map"])  # the same evaluation as the run's validation
    assert "mAP@.5" in capsys.readouterr().out

    out = tmp_path / "pred"
    argv = ["predict", "--checkpoint", str(run / "last.pt"), str(data / "val0.png"), "--out", str(out)]
    assert main([*argv, "--score-thresh", "0.0"]) == 0
    drawn = read_rgb(out / "val0.png")
    assert drawn.shape == read_rgb(data / "val0.png").shape
    records = json.loads((out / "predictions.json").read_text())
    assert records[0]["image"].endswith("val0.png") and all(d["label"] == "box" for d in records[0]["detections"])


def test_detect_command_bad_input(tmp_path, capsys):
    import yaml

    recipe = tmp_path / "det.yaml"
    recipe.write_text(yaml.safe_dump(detection_recipe(tmp_path / "nowhere", tmp_path)))
    assert main(["train", "--config", str(recipe)]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["train", "--config", str(recipe), "--set", "detection.fpn_chanels=8"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'detection.fpn_chanels' (did you mean 'detection.fpn_channels'" in err
    assert main(["train", "--config", str(recipe), "--set", "train.epochs=ten"]) == 2
    assert "train.epochs: expected int, got str 'ten'" in capsys.readouterr().err
    assert main(["train", "--config", str(recipe), "--set", "model.freeze=head"]) == 2
    assert "detection.trainable_layers" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(tmp_path / "missing.pt"), "x.png"]) == 2
    assert "missing.pt" in capsys.readouterr().err
