"""Object detection: Faster R-CNN with a feature pyramid over any zoo ResNet/ResNeXt, trained with resnetkit's tools.

    resnetkit detect train --data ../shared/data/cub200-2011-subset/CUB_200_2011 --backbone resnet18 \\
        --image-size 320 --epochs 12 --out runs/detect-cub

The detection machinery is torchvision's (FasterRCNN, its RPN and RoI heads, FeaturePyramidNetwork, box ops,
AnchorGenerator); only the backbone is ours: a zoo model's `forward_stages` feeds the pyramid.
Labels follow torchvision: 0 is the background, object classes are 1..num_classes; boxes are x1, y1, x2, y2 pixels.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d, MultiScaleRoIAlign, box_convert
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.transforms import v2

from resnetkit.config import dataclass_from_dict

__all__ = [
    "DetectorConfig",
    "DetectionConfig",
    "DetectionDataset",
    "ResNetFPNBackbone",
    "coco_map",
    "create_detector",
    "detection_transform",
    "detector_from_checkpoint",
    "draw_detections",
    "evaluate_detector",
    "freeze_batchnorm",
    "load_detection_config",
    "load_detection_data",
    "predict_images",
    "read_rgb",
    "save_rgb",
    "train_detector",
]

# ImageNet statistics: the zoo's pretrained weights expect them, and a model trained from scratch does not mind.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


# ---------------------------------------------------------------------------------------------------------- model


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in `module` by a FrozenBatchNorm2d holding the same statistics and affine terms.

    Detection batches are a few large images, too few for batch statistics: detectors fine-tuned from ImageNet keep
    the pretrained statistics fixed (Ren et al. 2015; torchvision's detection references do the same).
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            if child.affine:
                frozen.weight.copy_(child.weight.detach())
                frozen.bias.copy_(child.bias.detach())
            if child.track_running_stats:
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


class ResNetFPNBackbone(nn.Module):
    """A zoo model's stages (`forward_stages`) under a FeaturePyramidNetwork: what FasterRCNN calls a backbone.

    trainable_layers: how many blocks, counted from the top (last stage first, the stem last), keep learning;
        0 freezes the whole body, len(stages) + 1 trains everything.
    stages: which entries of `body.feature_info` feed the pyramid (default: every stage, not the stem).
    """

    def __init__(
        self, body: nn.Module, trainable_layers: int, out_channels: int = 256, stages: list[int] | None = None
    ) -> None:
        super().__init__()
        if not hasattr(body, "forward_stages") or not hasattr(body, "feature_info"):
            raise ValueError(
                f"{type(body).__name__} has no forward_stages/feature_info: it cannot be a detection "
                "backbone (use a ResNet/ResNeXt from `resnetkit models`)"
            )
        info = body.feature_info
        self.stages = list(range(1, len(info))) if stages is None else list(stages)
        blocks = [info[i]["name"] for i in range(1, len(info))][::-1] + ["stem"]
        if not 0 <= trainable_layers <= len(blocks):
            raise ValueError(
                f"trainable_layers must be in 0..{len(blocks)} ({', '.join(blocks)}), got {trainable_layers}"
            )
        trainable = set(blocks[:trainable_layers])
        if hasattr(body, "reset_classifier"):
            body.reset_classifier(0)  # the classification head takes no part in detection
        for name, param in body.named_parameters():
            top = name.split(".")[0]
            block = top if top.startswith("layer") else "stem"
            param.requires_grad_(block in trainable)
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            [info[i]["channels"] for i in self.stages], out_channels, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = out_channels
        self.reductions = [info[i]["reduction"] for i in self.stages] + [info[self.stages[-1]]["reduction"] * 2]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body.forward_stages(x)
        return self.fpn(OrderedDict((str(k), feats[i]) for k, i in enumerate(self.stages)))


@dataclass
class DetectorConfig:
    """What `create_detector` builds; saved in checkpoints as `model_kwargs` to rebuild the model."""

    backbone: str = "resnet50"
    """A zoo model name (`resnetkit models`): resnet18..152, resnext*, wide_resnet*, or a CIFAR ResNet."""
    num_classes: int = 1
    """Object classes, background excluded (targets use labels 1..num_classes)."""
    weights: str | None = None
    """Backbone weights: None, "imagenet", "imagenet-v2", or a file (state dict / resnetkit checkpoint)."""
    trainable_layers: int | None = None
    """Blocks that learn, from the top (stage 4 first, then 3, 2, 1, stem); None: 3 with weights, all without."""
    frozen_bn: bool | None = None
    """Replace BatchNorm by FrozenBatchNorm2d; None: frozen with pretrained weights, learning without."""
    min_size: int = 800
    """Images are resized so their shorter side is this many pixels..."""
    max_size: int = 1333
    """...unless that makes the longer side exceed this."""
    first_stage: int = 1
    """The first stage feeding the pyramid: 1 includes the stride-4 level (small objects); 2 starts at stride 8,
    about a third cheaper, enough for large objects."""
    fpn_channels: int = 256
    """Channels of every pyramid level."""
    representation_size: int = 1024
    """Width of the box head's two fully connected layers."""
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    """Anchor side in pixels, one per pyramid level (stages from `first_stage`, then the extra max-pooled level)."""
    rpn_batch_size: int = 256
    """Anchors sampled per image for the RPN loss."""
    roi_batch_size: int = 512
    """Proposals sampled per image for the box head's loss."""
    proposals_train: int = 2000
    """Proposals kept after NMS per image while training."""
    proposals_test: int = 1000
    """Proposals kept after NMS per image at inference."""
    score_thresh: float = 0.05
    """Detections below this score are dropped."""
    detections_per_img: int = 100

    def __post_init__(self) -> None:
        from resnetkit.models import list_models

        if self.backbone not in list_models():
            from difflib import get_close_matches

            close = get_close_matches(self.backbone, list_models(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown backbone {self.backbone!r}{hint}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (background excluded), got {self.num_classes}")
        if self.min_size < 32 or self.max_size < self.min_size:
            raise ValueError(f"need 32 <= min_size <= max_size, got min_size={self.min_size} max_size={self.max_size}")


def create_detector(config: DetectorConfig | None = None, **options: Any) -> FasterRCNN:
    """Faster R-CNN + FPN on a zoo backbone, e.g. `create_detector(backbone="resnet18", num_classes=1)`."""
    from resnetkit.models import create_model

    config = config or dataclass_from_dict(DetectorConfig, options, "model")
    pretrained = config.weights is not None
    trainable = config.trainable_layers
    body = create_model(config.backbone, weights=config.weights)
    if config.frozen_bn if config.frozen_bn is not None else pretrained:
        freeze_batchnorm(body)
    n_blocks = len(body.feature_info)  # stages + stem
    if not 1 <= config.first_stage < n_blocks:
        raise ValueError(f"first_stage must be in 1..{n_blocks - 1} for {config.backbone}, got {config.first_stage}")
    if trainable is None:
        trainable = min(3, n_blocks) if pretrained else n_blocks
    backbone = ResNetFPNBackbone(body, trainable, config.fpn_channels, stages=list(range(config.first_stage, n_blocks)))
    levels = len(backbone.stages) + 1
    if len(config.anchor_sizes) != levels:
        raise ValueError(
            f"anchor_sizes needs {levels} entries (one per pyramid level of {config.backbone}), "
            f"got {config.anchor_sizes}"
        )
    anchors = AnchorGenerator(tuple((s,) for s in config.anchor_sizes), ((0.5, 1.0, 2.0),) * levels)
    resolution = 7
    box_head = TwoMLPHead(config.fpn_channels * resolution**2, config.representation_size)
    model = FasterRCNN(
        backbone,
        min_size=config.min_size,
        max_size=config.max_size,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        rpn_anchor_generator=anchors,
        # RoIs pool from the stage levels, not the extra max-pooled one (as in torchvision's FPN models).
        box_roi_pool=MultiScaleRoIAlign([str(k) for k in range(levels - 1)], resolution, sampling_ratio=2),
        box_head=box_head,
        box_predictor=FastRCNNPredictor(config.representation_size, config.num_classes + 1),
        rpn_batch_size_per_image=config.rpn_batch_size,
        box_batch_size_per_image=config.roi_batch_size,
        rpn_pre_nms_top_n_train=config.proposals_train,
        rpn_post_nms_top_n_train=config.proposals_train,
        rpn_pre_nms_top_n_test=config.proposals_test,
        rpn_post_nms_top_n_test=config.proposals_test,
        box_score_thresh=config.score_thresh,
        box_detections_per_img=config.detections_per_img,
        # Training images arrive already resized (and scale-jittered) by `detection_transform`; the model resizes
        # only at inference, and maps its boxes back to the input image's pixels.
        _skip_resize=True,
    )
    model.config = config
    return model


# ----------------------------------------------------------------------------------------------------------- data


def detection_transform(train: bool, image_size: int, scale_range: tuple[float, float] = (0.6, 1.0)) -> v2.Transform:
    """Transforms of (image, target) pairs that move the boxes with the pixels.

    train: random horizontal flip and a random resize whose longer side lands in about
        [scale_range[0], scale_range[1]] * image_size; evaluation leaves the image as it is (the model resizes it
        and maps its boxes back to the original pixels, so metrics are in the annotation's coordinates).
    """
    ops: list[v2.Transform] = [v2.ToImage()]
    if train:
        lo, hi = scale_range
        shorter = sorted({max(16, round(image_size * s)) for s in torch.linspace(lo * 0.75, hi * 0.75, 6).tolist()})
        ops += [v2.RandomHorizontalFlip(0.5), v2.RandomShortestSize(shorter, max_size=image_size)]
    ops += [v2.ToDtype(torch.float32, scale=True)]
    if train:
        ops += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=2)]
    return v2.Compose(ops)


class DetectionDataset(Dataset):
    """Images with their boxes: `__getitem__(i) -> (image, target)`.

    image: float tensor (3, H, W) in [0, 1] (after `transform`); target: {"boxes": (K, 4) x1 y1 x2 y2 pixels,
    "labels": (K,) int64 in 1..len(classes), "image_id": int}.
    """

    def __init__(
        self,
        paths: list[Path],
        boxes: list[torch.Tensor],
        labels: list[torch.Tensor],
        classes: list[str],
        transform: v2.Transform | None = None,
        source: str = "",
    ) -> None:
        if not (len(paths) == len(boxes) == len(labels)):
            raise ValueError("paths, boxes and labels must have the same length")
        self.paths = [Path(p) for p in paths]
        self.boxes = boxes
        self.labels = labels
        self.classes = list(classes)
        self.transform = transform
        self.source = source

    def __len__(self) -> int:
        return len(self.paths)

    def read_image(self, i: int) -> torch.Tensor:
        """The i-th image as uint8 (3, H, W), RGB."""
        path = self.paths[i]
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path} (listed in {self.source})")
        return read_rgb(path)

    def target(self, i: int) -> dict[str, torch.Tensor]:
        """The i-th annotation, untransformed."""
        return {"boxes": self.boxes[i].clone(), "labels": self.labels[i].clone(), "image_id": i}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image = tv_tensors.Image(self.read_image(i))
        target = self.target(i)
        target["boxes"] = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=image.shape[-2:])
        if self.transform is not None:
            image, target = self.transform(image, target)
        else:
            image = image.float() / 255
        return image.as_subclass(torch.Tensor), {
            k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in target.items()
        }


def read_rgb(path: str | Path) -> torch.Tensor:
    """An image file as a uint8 RGB tensor (3, H, W); the message names the file when it is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return v2.functional.pil_to_tensor(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def save_rgb(image: torch.Tensor, path: str | Path) -> Path:
    """Write a uint8 (3, H, W) tensor as an image file (format from the suffix)."""
    from PIL import Image

    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(path)
    return Path(path)


def _xywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1)


def read_coco(json_path: str | Path, image_root: str | Path | None = None) -> DetectionDataset:
    """A COCO-format detection file: `images` (id, file_name), `annotations` (image_id, bbox x y w h, category_id,
    optional iscrowd), `categories` (id, name). Category ids map to labels 1..K in id order; crowd boxes and empty
    boxes are left out; images without boxes stay (they teach the background)."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {json_path}")
    try:
        data = json.loads(json_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path} is not valid JSON: {e}") from e
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key) if isinstance(data, dict) else None, list):
            raise ValueError(
                f"{json_path}: missing list {key!r} (a COCO detection file has images, annotations, categories)"
            )
    root = Path(image_root) if image_root is not None else json_path.parent

    def need(item: dict, key: str, where: str):
        if key not in item:
            raise ValueError(f"{json_path}: an entry of {where!r} lacks {key!r}: {json.dumps(item)[:120]}")
        return item[key]

    categories = sorted(data["categories"], key=lambda c: need(c, "id", "categories"))
    label_of = {c["id"]: i + 1 for i, c in enumerate(categories)}
    classes = [str(need(c, "name", "categories")) for c in categories]
    index_of: dict[Any, int] = {}
    paths = []
    for img in data["images"]:
        index_of[need(img, "id", "images")] = len(paths)
        paths.append(root / need(img, "file_name", "images"))
    per_image: list[list[tuple[list[float], int]]] = [[] for _ in paths]
    for ann in data["annotations"]:
        image_id = need(ann, "image_id", "annotations")
        if image_id not in index_of:
            raise ValueError(f"{json_path}: annotation {ann.get('id')} refers to unknown image_id {image_id}")
        cat = need(ann, "category_id", "annotations")
        if cat not in label_of:
            raise ValueError(f"{json_path}: annotation {ann.get('id')} has unknown category_id {cat}")
        bbox = need(ann, "bbox", "annotations")
        if not (isinstance(bbox, list) and len(bbox) == 4):
            raise ValueError(f"{json_path}: annotation {ann.get('id')} bbox must be [x, y, width, height], got {bbox}")
        if ann.get("iscrowd", 0) or bbox[2] <= 0 or bbox[3] <= 0:
            continue
        per_image[index_of[image_id]].append(([float(v) for v in bbox], label_of[cat]))
    boxes = [
        _xywh_to_xyxy(torch.tensor([b for b, _ in anns], dtype=torch.float32).reshape(-1, 4)) for anns in per_image
    ]
    labels = [torch.tensor([c for _, c in anns], dtype=torch.int64) for anns in per_image]
    return DetectionDataset(paths, boxes, labels, classes, source=str(json_path))


def read_cub(root: str | Path, split: str, class_agnostic: bool = True) -> DetectionDataset:
    """CUB-200-2011's one box per image (`bounding_boxes.txt`), through `resnetkit.data.CUB200`.

    class_agnostic: one class "bird"; otherwise the 200 (here: the subset's) species.
    """
    from resnetkit.data import CUB200

    cub = CUB200(root, split)
    boxes = _xywh_to_xyxy(torch.as_tensor(cub.boxes, dtype=torch.float32).reshape(-1, 4))
    paths = [Path(p) for p, _ in cub.samples]
    if class_agnostic:
        classes, labels = ["bird"], [torch.ones(1, dtype=torch.int64) for _ in paths]
    else:
        classes = list(cub.classes)
        labels = [torch.tensor([label + 1], dtype=torch.int64) for _, label in cub.samples]
    return DetectionDataset(paths, [b[None] for b in boxes], labels, classes, source=f"{root} ({split})")


def load_detection_data(
    source: str | Path, split: str = "train", *, class_agnostic: bool = True, transform: v2.Transform | None = None
) -> DetectionDataset:
    """Open a detection dataset by what `source` is.

    - a COCO JSON file: the file is the split (images relative to its folder);
    - a folder holding `<split>.json` (COCO format; `val` and `test` stand in for each other), images relative to it;
    - a CUB-200-2011 root (`bounding_boxes.txt`, `images.txt`, ...): split `train` or `test` (`val` means `test`).
    class_agnostic applies to CUB (COCO files keep their categories).
    """
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() != ".json":
            raise ValueError(f"{source}: expected a COCO .json file, a folder of <split>.json files, or a CUB root")
        ds = read_coco(source)
    elif source.is_dir():
        if (source / "bounding_boxes.txt").is_file() or (source / "CUB_200_2011" / "bounding_boxes.txt").is_file():
            ds = read_cub(source, "test" if split == "val" else split, class_agnostic=class_agnostic)
        else:
            names = [split] + {"val": ["test"], "test": ["val"]}.get(split, [])
            found = [source / f"{n}.json" for n in names if (source / f"{n}.json").is_file()]
            if not found:
                raise FileNotFoundError(f"{source}: no {names[0]}.json (COCO format) and no bounding_boxes.txt (CUB)")
            ds = read_coco(found[0])
    else:
        raise FileNotFoundError(f"detection data not found: {source}")
    ds.transform = transform
    return ds


def collate(batch: list) -> tuple[list, list]:
    """Detection batches are lists: images differ in size, targets in box count."""
    images, targets = zip(*batch)
    return list(images), list(targets)


# ----------------------------------------------------------------------------------------------------- evaluation


def coco_map(
    targets: list[dict[str, torch.Tensor]], predictions: list[dict[str, torch.Tensor]], classes: list[str] | None = None
) -> dict[str, float]:
    """COCO box AP with pycocotools: {"map": AP@[.5:.95], "map50": AP@.5, "map75": AP@.75, "map_small", ...}.

    targets[i]: "boxes" (K, 4) x1 y1 x2 y2 and "labels"; predictions[i]: "boxes", "scores", "labels" for the same
    image. Areas (for small/medium/large) are the boxes' areas.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
    labels = sorted({int(v) for t in targets for v in t["labels"]} | {int(v) for p in predictions for v in p["labels"]})
    names = {i + 1: n for i, n in enumerate(classes or [])}
    gt: dict[str, list] = {
        "images": [],
        "annotations": [],
        "categories": [{"id": c, "name": names.get(c, str(c))} for c in labels],
    }
    dets = []
    for i, (t, p) in enumerate(zip(targets, predictions)):
        gt["images"].append({"id": i})
        for box, label in zip(box_convert(t["boxes"], "xyxy", "xywh").tolist(), t["labels"].tolist()):
            w, h = box[2], box[3]
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": i,
                    "category_id": int(label),
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        for box, score, label in zip(
            box_convert(p["boxes"], "xyxy", "xywh").tolist(), p["scores"].tolist(), p["labels"].tolist()
        ):
            dets.append(
                {
                    "image_id": i,
                    "category_id": int(label),
                    "score": float(score),
                    "bbox": box,
                }
            )
    keys = ["map", "map50", "map75", "map_small", "map_medium", "map_large"]
    if not gt["annotations"]:
        raise ValueError("no ground-truth boxes to evaluate against")
    if not dets:
        return dict.fromkeys(keys, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # -1 marks "no ground truth in this area range": report 0 there rather than a negative AP.
    return {k: max(float(v), 0.0) for k, v in zip(keys, ev.stats[:6])}


@torch.no_grad()
def predict_batch(model: FasterRCNN, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Detections for float images in [0, 1], in each image's own pixel coordinates."""
    model.eval()
    return [{k: v.cpu() for k, v in out.items()} for out in model(images)]


def evaluate_detector(
    model: FasterRCNN, dataset: DetectionDataset, batch_size: int = 4, workers: int = 0, progress: bool = False
) -> dict[str, float]:
    """COCO AP of `model` over `dataset` (read without augmentation), via pycocotools."""
    from resnetkit.train.monitor import Progress

    saved, dataset.transform = dataset.transform, detection_transform(False, 0)
    try:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate)
        device = next(model.parameters()).device
        targets, predictions = [], []
        with Progress(len(loader), desc="eval", enabled=progress) as bar:
            for images, batch_targets in loader:
                predictions += predict_batch(model, [im.to(device) for im in images])
                targets += batch_targets
                bar.update(images=len(images))
    finally:
        dataset.transform = saved
    metrics = coco_map(targets, predictions, dataset.classes)
    metrics["images"] = len(dataset)
    return metrics


# ------------------------------------------------------------------------------------------------------- training


@dataclass
class DetectionConfig:
    """A detection training run: the model, the data, the optimisation. YAML recipes in configs/detect_*.yaml."""

    model: DetectorConfig = field(default_factory=DetectorConfig)
    data: str = ""
    """A COCO JSON file, a folder of <split>.json files, or a CUB-200-2011 root."""
    train_split: str = "train"
    val_split: str = "test"
    """Evaluated after every `eval_every` epochs and at the end ("" for none)."""
    class_agnostic: bool = True
    """CUB: one class "bird" (False: one class per species)."""
    image_size: int = 512
    """Longer image side in pixels for training (scale-jittered down to ~0.6x) and inference."""
    epochs: int = 12
    batch_size: int = 4
    optimizer: str = "sgd"
    """"sgd" (momentum 0.9) or "adamw"."""
    lr: float = 0.02
    """Peak learning rate, reached after `warmup_steps` and then decayed by a cosine to 0."""
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    max_train_images: int = 0
    """Use only the first N training images (0: all): tiny runs and overfitting checks."""
    eval_every: int = 1
    workers: int = 2
    seed: int = 0
    out: str = "runs/detect"
    """The run folder: config.yaml, last.pt, best.pt, metrics.jsonl, curves.png, tb/, eval.json."""
    device: str = "cpu"
    threads: int = 0
    """CPU threads for torch (0: torch's default, one per core). On a CPU shared with other jobs use 1: with 2
    threads on 2 busy cores a step took 30 s wall and 4 s CPU, with 1 thread 5.6 s wall and 0.5 s CPU (OpenMP
    threads spin waiting for each other)."""

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        for name in ("epochs", "batch_size", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> DetectionConfig:
        return dataclass_from_dict(cls, data, where)


def load_detection_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> DetectionConfig:
    """A YAML recipe (or the defaults) with `overrides` applied; "model.x" keys reach the model section."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings at the top level")
    data = {**data, "model": dict(data.get("model") or {})}
    for key, value in (overrides or {}).items():
        if key.startswith("model."):
            data["model"][key[len("model.") :]] = value
        else:
            data[key] = value
    return DetectionConfig.from_dict(data, where=str(path or "config"))


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return 0.001 + (1 - 0.001) * step / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


def train_one_epoch(
    model: FasterRCNN,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    device: torch.device,
    desc: str,
    on_step=None,
) -> dict[str, float]:
    """One pass over `loader`; returns the mean of each loss (and their sum as "loss")."""
    model.train()
    totals: dict[str, float] = {}
    from resnetkit.train.monitor import Progress

    with Progress(len(loader), desc=desc) as bar:
        for images, targets in loader:
            images = [im.to(device) for im in images]
            targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
            losses = model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite detection loss {loss.item()} ({losses}): lower the lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            values = {"loss": loss.item(), **{k: v.item() for k, v in losses.items()}}
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v
            bar.update(images=len(images), loss=values["loss"], lr=optimizer.param_groups[0]["lr"])
            if on_step is not None:
                on_step(values)
    return {k: v / max(1, len(loader)) for k, v in totals.items()}


def train_detector(config: DetectionConfig, resume: bool = False) -> dict[str, Any]:
    """Train, evaluate after epochs, and keep `last.pt` / `best.pt` (by val mAP) in `config.out`.

    resume: continue from `out/last.pt` (model, optimizer, schedule, rng, epoch). Returns the final metrics.
    """
    import yaml

    from resnetkit import __version__
    from resnetkit.checkpoint import load_checkpoint, save_checkpoint
    from resnetkit.train.fit import rng_state, set_rng_state
    from resnetkit.train.monitor import RunLogger

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    device = torch.device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)

    train_set = load_detection_data(
        config.data,
        config.train_split,
        class_agnostic=config.class_agnostic,
        transform=detection_transform(True, config.image_size),
    )
    if config.max_train_images:
        keep = range(min(config.max_train_images, len(train_set)))
        train_set = DetectionDataset(
            [train_set.paths[i] for i in keep],
            [train_set.boxes[i] for i in keep],
            [train_set.labels[i] for i in keep],
            train_set.classes,
            train_set.transform,
            train_set.source,
        )
    val_set = (
        load_detection_data(config.data, config.val_split, class_agnostic=config.class_agnostic)
        if config.val_split
        else None
    )
    config.model.num_classes = len(train_set.classes)
    config.model.min_size = config.model.max_size = config.image_size
    model = create_detector(config.model).to(device)

    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        num_workers=config.workers,
        collate_fn=collate,
        drop_last=len(train_set) > config.batch_size,
        generator=generator,
        persistent_workers=config.workers > 0,
    )
    total_steps = config.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(min(config.warmup_steps, total_steps // 4), total_steps)
    )
    config_dict = asdict(config)
    start_epoch, best = 0, -math.inf
    if resume and (out / "last.pt").is_file():
        ckpt = load_checkpoint(out / "last.pt")
        if ckpt.get("task") != "detection":
            raise ValueError(f"{out / 'last.pt'} is not a detection checkpoint")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        generator.set_state(ckpt["rng"]["loader"])
        start_epoch, best = ckpt["epoch"], ckpt.get("best_score", -math.inf)
        print(f"resumed from {out / 'last.pt'} at epoch {start_epoch}")
    (out / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))

    logger = RunLogger(out, title=f"{out.name}: Faster R-CNN {config.model.backbone}-FPN")
    step = start_epoch * len(loader)
    metrics: dict[str, Any] = {}

    def on_step(values: dict[str, float]) -> None:
        nonlocal step
        step += 1
        logger.log_scalars(step, {f"train/{k}": v for k, v in values.items()})

    started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        train_metrics = train_one_epoch(
            model, loader, optimizer, scheduler, device, f"epoch {epoch + 1}/{config.epochs}", on_step
        )
        metrics = {"train_loss": train_metrics["loss"], "lr": optimizer.param_groups[0]["lr"]}
        last_epoch = epoch + 1 == config.epochs
        if val_set is not None and ((epoch + 1) % config.eval_every == 0 or last_epoch):
            val = evaluate_detector(model, val_set, batch_size=config.batch_size, workers=config.workers)
            metrics.update({f"val_{k}": v for k, v in val.items() if k.startswith("map")})
            print(
                f"epoch {epoch + 1}: val mAP {val['map']:.4f}  mAP@.5 {val['map50']:.4f}  mAP@.75 {val['map75']:.4f}",
                flush=True,
            )
        logger.log_epoch(epoch + 1, metrics)
        # best.pt: the highest val mAP so far (the lowest training loss when there is no validation split)
        score = metrics["val_map"] if "val_map" in metrics else None if val_set is not None else -metrics["train_loss"]
        is_best = score is not None and score > best
        best = max(best, score) if score is not None else best
        state = {
            "task": "detection",
            "model": model.state_dict(),
            "model_name": f"fasterrcnn_{config.model.backbone}_fpn",
            "model_kwargs": asdict(config.model),
            "classes": train_set.classes,
            "config": config_dict,
            "epoch": epoch + 1,
            "step": 0,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {**rng_state(), "loader": generator.get_state()},
            "metrics": metrics,
            "best_score": best,
            "version": __version__,
        }
        save_checkpoint(out / "last.pt", state)
        if is_best:
            save_checkpoint(out / "best.pt", state)
    metrics["train_seconds"] = time.perf_counter() - started
    logger.close()
    return metrics


def detector_from_checkpoint(path: str | Path, device: str = "cpu") -> tuple[FasterRCNN, dict[str, Any]]:
    """The detector a `detect train` checkpoint holds, in eval mode, and the checkpoint dict."""
    from resnetkit.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    if ckpt.get("task") != "detection":
        raise ValueError(f"{path} is not a detection checkpoint (written by `resnetkit detect train`)")
    kwargs = dict(ckpt["model_kwargs"], weights=None)  # the checkpoint holds every weight
    model = create_detector(dataclass_from_dict(DetectorConfig, kwargs, f"{path}: model_kwargs"))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


# ---------------------------------------------------------------------------------------------------- predictions


def predict_images(model: FasterRCNN, paths: list[str | Path], batch_size: int = 4) -> list[dict[str, torch.Tensor]]:
    """Detections for image files, in each image's pixels."""
    results = []
    device = next(model.parameters()).device
    for start in range(0, len(paths), batch_size):
        images = []
        for p in paths[start : start + batch_size]:
            images.append(read_rgb(p).float().div(255).to(device))
        results += predict_batch(model, images)
    return results


def _font() -> str | None:
    for path in (
        "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    ):
        if Path(path).is_file():
            return path
    return None


def draw_detections(
    image: torch.Tensor,
    detections: dict[str, torch.Tensor],
    classes: list[str],
    score_thresh: float = 0.5,
    targets: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`image` (uint8 3,H,W) with its detections above `score_thresh` drawn as labelled boxes ("bird 0.93");
    ground-truth boxes, when given, in thin green."""
    from torchvision.utils import draw_bounding_boxes

    keep = detections["scores"] >= score_thresh
    boxes, scores, labels = detections["boxes"][keep], detections["scores"][keep], detections["labels"][keep]
    side = max(image.shape[-2:])
    width = max(2, side // 150)
    font, font_size = _font(), max(12, side // 25)
    out = image
    if targets is not None and len(targets["boxes"]):
        out = draw_bounding_boxes(out, targets["boxes"], colors="lime", width=max(1, width // 2))
    names = [
        f"{classes[int(c) - 1] if 0 < int(c) <= len(classes) else int(c)} {s:.2f}"
        for c, s in zip(labels.tolist(), scores.tolist())
    ]
    if len(boxes):
        out = draw_bounding_boxes(
            out,
            boxes,
            labels=names,
            colors="red",
            width=width,
            font=font,
            font_size=font_size if font else None,
            label_colors="white",
            label_background_colors="red",
            fill_labels=True,
        )
    return out
