"""Object detection: Faster R-CNN with a feature pyramid over any zoo ResNet/ResNeXt, as a task of the one engine.

    resnetkit train --config configs/detect_cub.yaml
    resnetkit eval --checkpoint runs/detect-cub/best.pt --split test
    resnetkit predict --checkpoint runs/detect-cub/best.pt photo.jpg --out predictions/

The detection machinery is torchvision's (FasterRCNN, its RPN and RoI heads, FeaturePyramidNetwork, box ops,
AnchorGenerator); only the backbone is ours: a zoo model's `forward_stages` feeds the pyramid.
Labels follow torchvision: 0 is the background, object classes are 1..num_classes; boxes are x1, y1, x2, y2 pixels.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d, MultiScaleRoIAlign, box_convert
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.poolers import initLevelMapper
from torchvision.transforms import v2

from resnetkit.config import Config, DetectionConfig, dataclass_from_dict
from resnetkit.data.datasets import SkippedSample, stratified_indices
from resnetkit.data.image import BadImageError, decode_image
from resnetkit.tasks import Task

__all__ = [
    "DetectionDataset",
    "DetectionTask",
    "DetectorConfig",
    "ResNetFPNBackbone",
    "ShapesMultiDetection",
    "coco_map",
    "create_detector",
    "detection_transform",
    "draw_detections",
    "freeze_batchnorm",
    "load_detection_data",
    "predict_batch",
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
        # A parameter belongs to the last stage whose first parameter comes at or before it in registration order,
        # or to the stem before the first stage (the rule of `model.freeze: stages:N`): stage names differ between
        # layouts (`layer3`, `stages.2`), and a pre-activation ResNet's closing `norm` goes with its last stage.
        first_of = {id(next(body.get_submodule(block).parameters())): block for block in blocks[:-1]}
        block = "stem"
        for param in body.parameters():
            block = first_of.get(id(param), block)
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
class DetectorConfig(DetectionConfig):
    """What `create_detector` builds: the config's detection section plus the backbone and the sizes; saved in
    checkpoints as `model_kwargs` to rebuild the model."""

    backbone: str = "resnet50"
    """A zoo model name (`resnetkit models`): resnet18..152, resnext*, wide_resnet*, or a CIFAR ResNet."""
    backbone_options: dict[str, Any] = field(default_factory=dict)
    """Further create_model options of the backbone (model.options in a recipe)."""
    num_classes: int = 1
    """Object classes, background excluded (targets use labels 1..num_classes)."""
    weights: str | None = None
    """Backbone weights: None, "imagenet", "imagenet-v2", or a file (state dict / resnetkit checkpoint)."""
    min_size: int = 800
    """Images are resized so their shorter side is this many pixels..."""
    max_size: int = 1333
    """...unless that makes the longer side exceed this."""

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
    body = create_model(config.backbone, weights=config.weights, **config.backbone_options)
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
    # RoIs pool from the stage levels, not the extra max-pooled one (as in torchvision's FPN models).
    roi_pool = MultiScaleRoIAlign([str(k) for k in range(levels - 1)], resolution, sampling_ratio=2)
    # The levels' scales are the backbone's strides. torchvision would infer them from the first batch it sees and
    # keep them (a state outside the state dict): a resumed run, whose first batch is another one, could then pool
    # from other levels. Setting them here makes the detector a function of its weights alone.
    strides = backbone.reductions[: levels - 1]
    roi_pool.scales = [1.0 / r for r in strides]
    roi_pool.map_levels = initLevelMapper(
        int(math.log2(strides[0])), int(math.log2(strides[-1])), roi_pool.canonical_scale, roi_pool.canonical_level
    )
    model = FasterRCNN(
        backbone,
        min_size=config.min_size,
        max_size=config.max_size,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        rpn_anchor_generator=anchors,
        box_roi_pool=roi_pool,
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
    "labels": (K,) int64 in 1..len(classes), "image_id": int}. A missing or unreadable image gives a SkippedSample
    (the loaders drop and report it) unless `strict`.
    """

    def __init__(
        self,
        paths: list[Path],
        boxes: list[torch.Tensor],
        labels: list[torch.Tensor],
        classes: list[str],
        transform: v2.Transform | None = None,
        source: str = "",
        strict: bool = False,
    ) -> None:
        if not (len(paths) == len(boxes) == len(labels)):
            raise ValueError("paths, boxes and labels must have the same length")
        self.paths = [Path(p) for p in paths]
        self.boxes = boxes
        self.labels = labels
        self.classes = list(classes)
        self.transform = transform
        self.source = source
        self.strict = strict

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def targets(self) -> list[int]:
        """Each image's first label (0 for an image without boxes): what a stratified subset keeps in proportion."""
        return [int(lab[0]) if len(lab) else 0 for lab in self.labels]

    def select(self, indices) -> None:
        """Keep only these images, in this order (a subset)."""
        self.paths = [self.paths[i] for i in indices]
        self.boxes = [self.boxes[i] for i in indices]
        self.labels = [self.labels[i] for i in indices]

    def read_image(self, i: int) -> torch.Tensor:
        """The i-th image as uint8 (3, H, W), RGB; raises BadImageError (a missing file included)."""
        path = self.paths[i]
        if not path.is_file():
            raise BadImageError(path, f"missing (listed in {self.source})")
        return decode_image(path)

    def target(self, i: int) -> dict[str, torch.Tensor]:
        """The i-th annotation, untransformed."""
        return {"boxes": self.boxes[i].clone(), "labels": self.labels[i].clone(), "image_id": i}

    def __getitem__(self, i: int):
        try:
            image = tv_tensors.Image(self.read_image(i))
        except BadImageError as e:
            if self.strict:
                raise
            return SkippedSample(str(self.paths[i]), e.reason)
        target = self.target(i)
        target["boxes"] = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=image.shape[-2:])
        if self.transform is not None:
            image, target = self.transform(image, target)
        else:
            image = image.float() / 255
        return image.as_subclass(torch.Tensor), {
            k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in target.items()
        }


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


def read_cub(root: str | Path, split: str, class_agnostic: bool = False) -> DetectionDataset:
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


class ShapesMultiDetection(DetectionDataset):
    """The built-in `shapes-multi` (`resnetkit.data.ShapesMulti`) as detection data: every shape of an image a box
    labelled with its class (1..10), or with one class "shape" when class_agnostic. Images are rendered, not read:
    `paths` are names ("shapes-multi/train/17") for reports."""

    def __init__(self, shapes, class_agnostic: bool = False) -> None:
        n = len(shapes)
        boxes = [shapes.boxes(i) for i in range(n)]
        if class_agnostic:
            classes, labels = ["shape"], [torch.ones(len(b), dtype=torch.int64) for b in boxes]
        else:
            classes, labels = list(shapes.classes), [shapes.box_labels(i) + 1 for i in range(n)]
        names = [Path(f"shapes-multi/{shapes.split}/{i}") for i in shapes.indices]
        super().__init__(names, boxes, labels, classes, source=f"shapes-multi ({shapes.split})")
        self.shapes = shapes

    def select(self, indices) -> None:
        indices = list(indices)
        super().select(indices)
        self.shapes.select(indices)

    def read_image(self, i: int) -> torch.Tensor:
        return self.shapes.load(i)


def is_shapes_multi(name: str | Path) -> bool:
    return str(name) == "shapes-multi" or str(name).startswith("shapes-multi:")


def load_detection_data(
    source: str | Path,
    split: str = "train",
    *,
    class_agnostic: bool = False,
    transform: v2.Transform | None = None,
    image_size: int | None = None,
) -> DetectionDataset:
    """Open a detection dataset by what `source` is.

    - a COCO JSON file: the file is the split (images relative to its folder);
    - a folder holding `<split>.json` (COCO format; `val` and `test` stand in for each other), images relative to it;
    - a CUB-200-2011 root (`bounding_boxes.txt`, `images.txt`, ...): split `train` or `test` (`val` means `test`);
    - `shapes-multi` or `shapes-multi:N`: the built-in multi-shape images (train, val, test), every shape a box of
      its class, rendered at `image_size` pixels (the task passes the detector's data.image_size; None: 64).
    class_agnostic applies to CUB and shapes-multi (COCO files keep their categories).
    """
    if is_shapes_multi(source):
        from resnetkit.data import build_dataset

        ds = ShapesMultiDetection(build_dataset(str(source), split, image_size=image_size), class_agnostic)
        ds.transform = transform
        return ds
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


# ----------------------------------------------------------------------------------------------------- evaluation


def coco_map(
    targets: list[dict[str, torch.Tensor]], predictions: list[dict[str, torch.Tensor]], classes: list[str] | None = None
) -> dict[str, Any]:
    """COCO box AP with pycocotools: {"map": AP@[.5:.95], "map50": AP@.5, "map75": AP@.75, "map_small", ...,
    "per_class_ap": {class name: AP@[.5:.95]}}.

    targets[i]: "boxes" (K, 4) x1 y1 x2 y2 and "labels"; predictions[i]: "boxes", "scores", "labels" for the same
    image. Areas (for small/medium/large) are the boxes' areas. `per_class_ap` names every label 1..len(classes)
    (or every label seen, without `classes`); a class with no ground-truth box has None (COCO leaves it out of the
    mean), and mAP is the mean of the others.
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
    named = sorted(set(names) | set(labels))
    with_boxes = {int(v) for t in targets for v in t["labels"]}
    if not dets:
        return {
            **dict.fromkeys(keys, 0.0),
            "per_class_ap": {names.get(c, str(c)): 0.0 if c in with_boxes else None for c in named},
        }
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
    result: dict[str, Any] = {k: max(float(v), 0.0) for k, v in zip(keys, ev.stats[:6])}
    # precision: (IoU thresholds, recall thresholds, categories, area ranges, max dets); area "all", 100 detections,
    # averaged over the IoU and recall thresholds as COCOeval.summarize does for one category (-1: no ground truth).
    precision = ev.eval["precision"][:, :, :, 0, -1]
    per_class: dict[str, float | None] = {}
    for c in named:
        k = ev.params.catIds.index(c) if c in ev.params.catIds else None
        values = precision[:, :, k] if k is not None else np.full(1, -1.0)
        values = values[values > -1]
        per_class[names.get(c, str(c))] = float(values.mean()) if values.size else None
    result["per_class_ap"] = per_class
    return result


@torch.no_grad()
def predict_batch(model: FasterRCNN, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Detections for float images in [0, 1], in each image's own pixel coordinates."""
    model.eval()
    return [{k: v.cpu() for k, v in out.items()} for out in model(images)]


def _gathered(items: list) -> list:
    """Every rank's list, concatenated in rank order (each rank evaluated a contiguous shard)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return items
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


# ------------------------------------------------------------------------------------------------------- the task


class DetectionTask(Task):
    """Detection for the engine: `load_detection_data` sets, box-moving augmentation, the detector's summed losses,
    COCO mAP of the validation split (pycocotools), exact under DDP (the predictions are gathered)."""

    name = "detection"
    metric = "val_map"

    def build_loaders(self, cfg: Config, info):
        from resnetkit.data import preprocess_info

        self.cfg = cfg
        d = cfg.data
        train_set = load_detection_data(
            d.name, d.train_split, class_agnostic=d.class_agnostic, image_size=d.image_size or 512
        )
        if d.subset is not None and d.subset < len(train_set):
            train_set.select(stratified_indices(train_set.targets, d.subset, cfg.seed))
        self.classes = list(train_set.classes)
        self.preprocess = preprocess_info("detection", input_size=d.image_size or 512)
        train_loader = self._loader(train_set, cfg, info, d.batch_size // info.world_size, train=True)
        train_loader.set_augmentation(d.train_augment)
        return train_loader, self.eval_loader(cfg, d.val_split, info) if d.val_split else None

    def eval_loader(self, cfg: Config, split: str, info):
        """The loader of `split` that `evaluate` reads (the classes must be the training split's)."""
        d = cfg.data
        dataset = load_detection_data(d.name, split, class_agnostic=d.class_agnostic, image_size=d.image_size or 512)
        if dataset.classes != self.classes:
            raise ValueError(
                f"{d.name} [{split}] has classes {dataset.classes[:5]}, the model {self.classes[:5]} "
                "(class_agnostic differs?)"
            )
        eval_batch = d.eval_batch_size or d.batch_size
        return self._loader(dataset, cfg, info, max(eval_batch // info.world_size, 1), train=False)

    def _loader(self, dataset, cfg: Config, info, batch_size: int, train: bool):
        from resnetkit.data import FileLoader
        from resnetkit.data.loader import collate_lists

        return FileLoader(
            dataset,
            batch_size=batch_size,
            train=train,
            device=info.device,
            preprocess=self.preprocess,
            seed=cfg.seed,
            rank=info.rank,
            world_size=info.world_size,
            workers=cfg.data.workers,
            transform_for=functools.partial(_transform_for, image_size=self.preprocess["input_size"]),
            collate=collate_lists,
        )

    def build_model(self, cfg: Config, load_weights: bool):
        size = cfg.data.image_size or 512
        config = DetectorConfig(
            **asdict(cfg.detection),
            backbone=cfg.model.name,
            backbone_options=dict(cfg.model.options),
            num_classes=cfg.model.num_classes or len(self.classes),
            weights=cfg.model.weights if load_weights else None,
            min_size=size,
            max_size=size,
        )
        model = create_detector(config)
        kwargs = {**asdict(config), "weights": None}  # the checkpoint holds every weight
        return model, f"fasterrcnn_{cfg.model.name}_fpn", kwargs

    @staticmethod
    def rebuild(model_name: str, model_kwargs: dict[str, Any]) -> nn.Module:
        return create_detector(dataclass_from_dict(DetectorConfig, model_kwargs, "model_kwargs"))

    def head_parameters(self, model: nn.Module) -> set[int]:
        body = {id(p) for p in model.backbone.body.parameters()}
        return {id(p) for p in model.parameters() if id(p) not in body}

    def freeze(self, model: nn.Module, mode: str) -> list[nn.Module]:
        return []  # the config refuses model.freeze for detectors: detection.trainable_layers and frozen_bn do it

    def training_step(self, model: nn.Module, batch):
        images, targets = batch
        losses = model(images, targets)
        loss = sum(losses.values())
        n = torch.tensor(float(len(images)), device=loss.device)
        sums = {"loss": loss.detach() * n, **{k: v.detach() * n for k, v in losses.items()}, "count": n}
        return loss, sums

    def train_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        count = max(totals["count"], 1)
        return {f"train_{k}": v / count for k, v in totals.items() if k != "count"}

    def evaluate(self, model: nn.Module, loader, cfg: Config, device: torch.device) -> dict[str, float]:
        metrics = evaluate_detections(model, loader)
        return {k: metrics[k] for k in ("map", "map50", "map75")}


def _transform_for(augmenting: bool, image_size: int) -> v2.Transform:
    return detection_transform(augmenting, image_size)


@torch.no_grad()
def evaluate_detections(model: nn.Module, loader, progress=None) -> dict[str, Any]:
    """COCO AP of `model` over a loader of (images, targets) (every rank its shard; gathered before scoring), via
    pycocotools: map, map50, map75, map_small/medium/large, per_class_ap (AP@[.5:.95] by class name), and the
    number of images."""
    was_training = model.training
    model.eval()
    targets, predictions = [], []
    for images, batch_targets in loader:
        predictions += [{k: v.cpu() for k, v in out.items()} for out in model(images)]
        targets += [{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in batch_targets]
        if progress is not None:
            progress(len(images))
    model.train(was_training)
    targets, predictions = _gathered(targets), _gathered(predictions)
    metrics = coco_map(targets, predictions, loader.classes)
    metrics["num_images"] = len(targets)
    return metrics


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


def predict_files(
    bundle, files, out_dir: str | Path, *, score_thresh: float = 0.5, batch_size: int = 4, progress=None
) -> list[dict[str, Any]]:
    """Detect objects in image files with a detection bundle (`resnetkit.bundle.load_bundle`): writes each image with
    its labelled boxes ("bird 0.93") as <stem>.png and predictions.json into `out_dir`; returns the records (one per
    file: its boxes above `score_thresh`, or the error that kept it from being read)."""
    from resnetkit.data.image import save_image
    from resnetkit.deploy.predict import read_batches

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, classes = bundle.module, bundle.classes
    device = next(model.parameters()).device
    records, done = [], 0
    for paths, images, errors in read_batches([Path(f) for f in files], batch_size):
        records += [{"image": str(p), "error": message} for p, message in errors]
        detections = predict_batch(model, [im.float().div(255).to(device) for im in images])
        for path, image, det in zip(paths, images, detections):
            target = out / f"{path.stem}.png"
            save_image(draw_detections(image, det, classes, score_thresh), target)
            keep = det["scores"] >= score_thresh
            boxes = [
                {"label": classes[int(c) - 1], "score": round(float(s), 4), "box": [round(v, 1) for v in b]}
                for b, s, c in zip(
                    det["boxes"][keep].tolist(), det["scores"][keep].tolist(), det["labels"][keep].tolist()
                )
            ]
            records.append({"image": str(path), "output": str(target), "detections": boxes})
        done += len(paths) + len(errors)
        if progress is not None:
            progress("detecting", done, len(files))
    order = {str(f): i for i, f in enumerate(files)}
    records.sort(key=lambda r: order[r["image"]])
    (out / "predictions.json").write_text(json.dumps(records, indent=2) + "\n")
    return records


TASK = DetectionTask
