"""Segmentation: heads on zoo encoders, losses, metrics against torchmetrics, mask folders, training, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnetkit.bundle import load_bundle
from resnetkit.cli import main
from resnetkit.config import ConfigError, config_from_dict, load_config
from resnetkit.data.image import read_mask, save_mask
from resnetkit.tasks.segmentation import (
    SegmentationLoss,
    SegmentationMetrics,
    create_segmentation_model,
    dice_loss,
    mask_transform,
    overlay,
    palette,
    segmentation_data,
)
from resnetkit.train.fit import train


@pytest.fixture(autouse=True)
def one_thread():
    # Two threads on two cores shared with other jobs spin-wait at every barrier: one thread is several times faster.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("encoder", ["resnet18", "resnet50", "resnext50_32x4d"])
@pytest.mark.parametrize("head", ["unet", "fcn"])
def test_head_gives_logits_at_input_resolution(encoder, head):
    model = create_segmentation_model(head, encoder, num_classes=5).eval()
    with torch.no_grad():
        for h, w in [(72, 72), (40, 56)]:  # 72 and 40x56 are not multiples of the encoder's stride 32
            out = model(torch.randn(1, 3, h, w))
            assert out.shape == (1, 5, h, w)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("head", ["unet", "fcn"])
def test_unet_uses_every_stage_and_fcn_only_the_last(head):
    model = create_segmentation_model(head, "resnet18", num_classes=3).train()
    stages = model.encoder.forward_stages
    leaves = []

    def detached_stages(x):
        # Cut each stage output off from the encoder: a gradient on it can only come from the decoder reading it.
        leaves.extend(f.detach().requires_grad_() for f in stages(x))
        return list(leaves)

    model.encoder.forward_stages = detached_stages
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    assert len(leaves) == len(model.encoder.feature_info) == 5
    used = [f.grad is not None and bool(f.grad.abs().sum() > 0) for f in leaves]
    assert used == ([True] * 5 if head == "unet" else [False] * 4 + [True])


def test_encoder_loads_weights_from_a_file(tmp_path):
    # The path `weights="imagenet"` takes once downloaded: a classifier's state dict becomes the encoder's weights.
    from resnetkit import create_model

    classifier = create_model("resnet18", num_classes=10)
    torch.save(classifier.state_dict(), tmp_path / "resnet18.pth")
    model = create_segmentation_model("fcn", "resnet18", num_classes=3, weights=str(tmp_path / "resnet18.pth"))
    encoder = model.encoder.state_dict()
    assert torch.equal(encoder["layer4.1.conv2.weight"], classifier.state_dict()["layer4.1.conv2.weight"])
    assert not any(k.startswith("fc.") for k in encoder)  # the classifier head is dropped


def test_encoder_options_and_bad_names():
    model = create_segmentation_model("unet", "resnet20", num_classes=4, decoder_channels=32)
    assert model(torch.randn(2, 3, 33, 31)).shape == (2, 4, 33, 31)
    small = create_segmentation_model("unet", "resnet18", 2, encoder_options={"stem": "cifar"}, decoder_channels=32)
    assert small.encoder.feature_info[1]["reduction"] == 1
    with pytest.raises(ValueError, match="unknown segmentation head 'segnet'"):
        create_segmentation_model("segnet", "resnet18", 3)
    with pytest.raises(ValueError, match="unknown model 'resnet19'"):
        create_segmentation_model("unet", "resnet19", 3)
    with pytest.raises(ValueError, match="num_classes"):
        create_segmentation_model("unet", "resnet18", 1)


# ------------------------------------------------------------------------------------------------ losses


def test_losses_respect_ignore_index():
    target = torch.randint(0, 3, (2, 8, 8))
    perfect = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 20
    assert dice_loss(perfect, target) < 1e-3
    wrong = perfect.roll(1, dims=1)
    assert dice_loss(wrong, target) > 0.9
    # Pixels marked 255 do not count: a perfect prediction elsewhere gives the same (near-zero) loss.
    ignored = target.clone()
    ignored[:, :4] = 255
    mixed = torch.where((ignored == 255).unsqueeze(1), wrong, perfect)
    for kind in ("ce", "dice", "ce+dice"):
        assert SegmentationLoss(kind)(mixed, ignored) < 1e-3
        assert SegmentationLoss(kind)(mixed, target) > 0.1
    total = SegmentationLoss("ce+dice")(wrong, target)
    assert torch.isclose(total, SegmentationLoss("ce")(wrong, target) + SegmentationLoss("dice")(wrong, target))


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_known_answer():
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, 0, 255]]])
    preds = torch.tensor([[[0, 1, 1, 1], [2, 0, 0, 1]]])
    m = SegmentationMetrics(num_classes=4)
    m.update(preds, target)
    r = m.compute()
    # class 0: tp 2 (positions 0, 6), fp 1 (5), fn 1 (1) -> IoU 2/4; class 1: tp 2, fp 1 (pos 1), fn 0 -> 2/3;
    # class 2: tp 1, fn 1 -> 1/2; class 3 never appears -> no IoU; the ignored pixel counts for nothing.
    assert r["per_class_iou"][:3] == pytest.approx([0.5, 2 / 3, 0.5])
    assert np.isnan(r["per_class_iou"][3])
    assert r["miou"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert r["pixel_acc"] == pytest.approx(5 / 7)
    assert r["per_class_dice"][:3] == pytest.approx([2 / 3, 0.8, 2 / 3])


def test_metrics_agree_with_torchmetrics():
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassJaccardIndex

    g = torch.Generator().manual_seed(0)
    num_classes = 5
    target = torch.randint(0, num_classes - 1, (6, 16, 16), generator=g)  # class 4 never in the targets
    preds = torch.where(
        torch.rand(target.shape, generator=g) < 0.7, target, torch.randint(0, num_classes, target.shape, generator=g)
    )
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    ours = SegmentationMetrics(num_classes)
    for i in range(0, 6, 2):  # in batches: the confusion matrix accumulates
        ours.update(
            torch.nn.functional.one_hot(preds[i : i + 2], num_classes).permute(0, 3, 1, 2).float(), target[i : i + 2]
        )
    r = ours.compute()
    kw = dict(num_classes=num_classes, ignore_index=255)
    tm_iou = MulticlassJaccardIndex(average=None, **kw)(preds, target)
    assert r["per_class_iou"] == pytest.approx(tm_iou.tolist())
    assert r["miou"] == pytest.approx(MulticlassJaccardIndex(average="macro", **kw)(preds, target).item())
    assert r["pixel_acc"] == pytest.approx(MulticlassAccuracy(average="micro", **kw)(preds, target).item())
    tm_dice = MulticlassF1Score(average=None, multidim_average="global", **kw)(preds, target)
    assert r["per_class_dice"] == pytest.approx(tm_dice.tolist())


def test_metrics_refuse_out_of_range_classes():
    m = SegmentationMetrics(num_classes=3)
    with pytest.raises(ValueError, match="mask holds class 7"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 7))


# ------------------------------------------------------------------------------------------------ data


def _write_folder(root, split, n, size=24, seed=0, mode="P"):
    rng = np.random.default_rng(seed)
    (root / split / "images").mkdir(parents=True)
    (root / split / "masks").mkdir(parents=True)
    masks = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            root / split / "images" / f"{i}.jpg"
        )
        mask = np.zeros((size, size), np.uint8)
        mask[2:10, 3:12] = 1 + i % 2
        mask[0, :] = 255  # a VOC-style "ignore" border
        if mode == "P":
            save_mask(mask, root / split / "masks" / f"{i}.png", palette())
        else:
            Image.fromarray(mask, mode=mode).save(root / split / "masks" / f"{i}.png")
        masks.append(mask)
    return masks


def test_mask_folder_with_palette_pngs(tmp_path):
    masks = _write_folder(tmp_path, "train", 3)
    assert Image.open(tmp_path / "train" / "masks" / "0.png").mode == "P"
    ds = segmentation_data(str(tmp_path), "train", image_size=24)
    assert len(ds) == 3 and ds.classes == ["class_0", "class_1", "class_2"]
    image, mask = ds[1]
    assert image.shape == (3, 24, 24) and image.dtype == torch.uint8
    assert torch.equal(mask, torch.from_numpy(masks[1]).long())
    # Resizing keeps class indices (nearest neighbour): no blended values such as 128 appear.
    preprocess = {"preset": "square", "input_size": 16, "resize": 16, "mean": [0.5] * 3, "std": [0.25] * 3}
    x, small = mask_transform(False, preprocess)(*ds[0])
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and small.shape == (16, 16)
    assert set(small.unique().tolist()) <= {0, 1, 255}
    (tmp_path / "classes.txt").write_text("background\ncat\ndog\n")
    assert segmentation_data(str(tmp_path), "train", image_size=24).classes == ["background", "cat", "dog"]


def test_voc_layout_and_bad_masks(tmp_path):
    voc = tmp_path / "VOC"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "SegmentationClass").mkdir()
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    for name in ("a", "b"):
        Image.new("RGB", (20, 30), "red").save(voc / "JPEGImages" / f"{name}.jpg")
        save_mask(np.full((30, 20), 15, np.uint8), voc / "SegmentationClass" / f"{name}.png", palette())
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("b\n")
    ds = segmentation_data(str(voc), "val", image_size=32)
    assert len(ds) == 1 and ds.classes[15] == "person" and int(ds[0][1][5, 5]) == 15
    with pytest.raises(FileNotFoundError, match="train.txt"):
        segmentation_data(str(voc), "train", image_size=32)

    Image.new("RGB", (20, 30), "blue").save(voc / "SegmentationClass" / "b.png")
    with pytest.raises(ValueError, match=r"b\.png is a RGB-mode image"):
        ds[0]
    with pytest.raises(ValueError, match=r"RGB-mode"):
        read_mask(voc / "SegmentationClass" / "b.png")
    (voc / "SegmentationClass" / "b.png").unlink()
    with pytest.raises(ValueError, match="without a matching image/mask pair"):
        segmentation_data(str(voc), "val", image_size=32)
    with pytest.raises(FileNotFoundError, match="expected .*/test/images"):
        segmentation_data(str(tmp_path), "test", image_size=32)


def test_shapes_set_has_background_and_ten_shapes():
    data = segmentation_data("shapes:10", "train", image_size=32)
    assert data.images.shape == (10, 3, 32, 32) and data.classes[0] == "background" and len(data.classes) == 11
    labels = {int(m.max()) for m in data.labels}
    assert labels == set(range(1, 11))  # one image of each class, each mask holding its class+1


def test_config_validation(tmp_path):
    recipe = Path(__file__).resolve().parents[1] / "configs" / "segment_shapes.yaml"
    cfg = load_config(recipe)
    assert cfg.task == "segmentation" and cfg.model.name == "resnet20" and cfg.segmentation.head == "unet"
    with pytest.raises(ConfigError, match="unknown key 'segmentation.haed' \\(did you mean 'segmentation.head'"):
        config_from_dict({"task": "segmentation", "segmentation": {"haed": "fcn"}})
    with pytest.raises(ConfigError, match="train.epochs: expected int, got str 'ten'"):
        load_config(recipe, ["train.epochs=ten"])
    with pytest.raises(ConfigError, match="segmentation.loss: unknown value 'focal'"):
        config_from_dict({"segmentation": {"loss": "focal"}})
    with pytest.raises(ConfigError, match="task: unknown value 'segmentaton' \\(did you mean 'segmentation'"):
        config_from_dict({"task": "segmentaton"})


# ------------------------------------------------------------------------------------------------ overlays


def test_overlay_blends_palette_colours_and_keeps_background():
    image = Image.new("RGB", (6, 4), (100, 100, 100))
    mask = np.zeros((4, 6), np.uint8)
    mask[1:3, 2:5] = 2
    out = np.asarray(overlay(image, mask, alpha=0.5))
    assert out.shape == (4, 6, 3)
    assert (out[0, 0] == 100).all()  # background untouched
    expected = np.round(0.5 * 100 + 0.5 * palette()[2].astype(float))
    assert (out[1, 2] == expected).all() and not (out[1, 2] == 100).all()
    with_legend = overlay(image, mask, classes=["background", "a", "b"])
    assert with_legend.size[0] == 6 and with_legend.size[1] > 4
    assert palette()[:3].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]  # the VOC colour map


# ------------------------------------------------------------------------------------------------ training


def test_short_training_overfits_shapes(tmp_path):
    # A handful (4) of shapes images, 80 AdamW steps of a CIFAR ResNet-20 U-Net: each shape's outline and class learnt
    # pixel by pixel, measured on those 4 images.
    cfg = {
        "task": "segmentation",
        "name": "shapes",
        "output_dir": str(tmp_path),
        "model": {"name": "resnet20"},
        "data": {"name": "shapes:10", "subset": 4, "image_size": 32, "batch_size": 4},
        "optim": {"name": "adamw", "lr": 1e-2, "weight_decay": 1e-4},
        "schedule": {"name": "cosine", "per": "step", "warmup": 20, "warmup_start_factor": 0.05},
        "train": {"epochs": 80, "eval_every": 20, "log_every_s": 30, "log_images": False},
        "segmentation": {"decoder_channels": 64},
    }
    result = train(config_from_dict(cfg), quiet=True)
    run = result.run_dir
    for name in ("config.yaml", "last.pt", "best.pt", "metrics.jsonl", "curves.png"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 81))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    bundle = load_bundle(result.last_checkpoint)
    assert bundle.task == "segmentation" and bundle.classes[0] == "background" and not bundle.model.training
    from resnetkit.data.datasets import stratified_indices
    from resnetkit.data.transforms import normalize as normalize_batch
    from resnetkit.tasks.segmentation import evaluate_segmentation

    shapes = segmentation_data("shapes:10", "train", image_size=32)
    keep = torch.tensor(stratified_indices([0] * 10, 4, seed=0))  # the training subset
    x = normalize_batch(shapes.images[keep], bundle.preprocess["mean"], bundle.preprocess["std"])
    seen = evaluate_segmentation(bundle.model, [(x, shapes.labels[keep])], num_classes=11)
    assert seen["num_images"] == 4 and seen["miou"] > 0.8, seen


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_train_eval_predict(tmp_path, capsys):
    data = tmp_path / "data"
    _write_folder(data, "train", 4, size=32)
    _write_folder(data, "val", 2, size=32, seed=1)
    recipe = tmp_path / "seg.yaml"
    recipe.write_text(
        f"task: segmentation\noutput_dir: {tmp_path / 'runs'}\nmodel: {{name: resnet20}}\n"
        f"data: {{name: {data}, image_size: 32, batch_size: 2, workers: 0}}\n"
        "optim: {name: adamw, lr: 0.002}\ntrain: {epochs: 2, threads: 1}\nsegmentation: {decoder_channels: 16}\n"
    )
    assert main(["train", "--config", str(recipe)]) == 0
    run = tmp_path / "runs" / "seg"
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and {"train_loss", "val_miou", "val_pixel_acc"} <= set(rows[0])

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "best.pt"), "--split", "val"]) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "class_2" in printed
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert report["num_images"] == 2 and set(report["per_class_iou"]) == {"class_0", "class_1", "class_2"}
    # The same numbers as the validation of the run's last epoch (best.pt is the best epoch's weights).
    best = max(rows, key=lambda r: r["val_miou"])
    assert report["miou"] == pytest.approx(best["val_miou"], abs=1e-9)

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (45, 30), (30, 160, 200)).save(photos / "wide.jpg")
    argv = ["predict", "--checkpoint", str(run / "best.pt"), str(photos), "--out", str(tmp_path / "pred")]
    assert main([*argv, "--save-masks"]) == 0
    out = Image.open(tmp_path / "pred" / "wide_overlay.png")
    assert out.width == 45 and out.height > 30  # the image at its own size, with the legend below
    mask = read_mask(tmp_path / "pred" / "wide_mask.png")
    assert mask.shape == (30, 45) and mask.max() <= 2


def test_cli_bad_input_gives_one_line(tmp_path, capsys):
    cfg = tmp_path / "seg.yaml"
    cfg.write_text(f"task: segmentation\ndata: {{name: {tmp_path / 'missing'}}}\noutput_dir: {tmp_path}\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "segmentation data not found" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    cfg.write_text("task: segmentation\ntrain: {epochz: 3}\n")
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and "unknown key 'train.epochz' (did you mean 'train.epochs'" in err
