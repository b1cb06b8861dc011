"""Typed training configs: dataclasses with a docstring per field, validated once, loaded from YAML.

    cfg = load_config("configs/demo.yaml", ["optim.lr=0.05", "train.epochs=3"])

Unknown keys and values of the wrong type raise ConfigError naming the file and the dotted key, with the closest
valid keys; `--set a.b=v` overrides are parsed as YAML scalars and checked the same way. `Config.to_dict()` is the
resolved config written to the run folder and into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

TTA_CHOICES = ("none", "flip", "flip-translate")
"""Test-time augmentations (resnetkit.evaluation.tta): training's train.eval_tta and eval's --tta."""

T = TypeVar("T")

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "adadelta")
SCHEDULES = ("constant", "step", "multistep", "exponential", "cosine", "linear", "onecycle", "plateau")
TASKS = ("classification", "multilabel", "detection", "segmentation")
LOSSES = ("ce", "bce", "focal", "asymmetric")
SINGLE_LABEL_LOSSES = ("ce", "focal")
MULTILABEL_LOSSES = ("bce", "focal", "asymmetric")
SEGMENTATION_HEADS = ("unet", "fcn")
SEGMENTATION_LOSSES = ("ce", "dice", "ce+dice")


class ConfigError(ValueError):
    """A config that does not validate; the message names the file and the key."""


@dataclass
class ModelConfig:
    name: str = "resnet18"
    """A registered model name (see `resnetkit models`): the classifier, or the backbone of a detector or the
    encoder of a segmentation model."""
    num_classes: int | None = None
    """Classifier size; None takes the dataset's number of classes."""
    weights: str | None = None
    """None (random init), "imagenet", "imagenet-v2", or a weights/checkpoint file; a head of another size is new."""
    options: dict[str, Any] = field(default_factory=dict)
    """Further create_model options, e.g. {stem: cifar, zero_init_residual: true, drop_rate: 0.2}."""
    freeze: str = "none"
    """What does not train: "none" (full fine-tuning), "head" (only the classifier trains, BN statistics frozen),
    or "stages:N" (the stem and stages 1..N frozen, their BN statistics too)."""
    backbone_lr_scale: float = 1.0
    """The backbone's learning rate is the head's times this (e.g. 0.1 when fine-tuning)."""

    def __post_init__(self) -> None:
        if self.freeze not in ("none", "head") and not _is_stages(self.freeze):
            raise ConfigError(f"model.freeze: expected 'none', 'head' or 'stages:N', got {self.freeze!r}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"model.num_classes: must be >= 1, got {self.num_classes}")
        if self.backbone_lr_scale < 0:
            raise ConfigError(f"model.backbone_lr_scale: must be >= 0, got {self.backbone_lr_scale}")


def _is_stages(value: str) -> bool:
    kind, _, n = value.partition(":")
    return kind == "stages" and n.isdigit()


@dataclass
class DataConfig:
    name: str = "shapes"
    """A dataset name (shapes, shapes:N, cifar10, cifar100, cub200, shapes-multi[:N], cifar10-mosaic:<cifar10-jpg
    folder>[:N]) or a path: an ImageFolder root (train/ and val/ or test/, or class folders only, with val_fraction),
    a CSV/TSV listing (.csv, .tsv), a CUB root, a CIFAR folder; for detection also a COCO .json file or a folder
    of <split>.json files; for segmentation a folder of <split>/images + <split>/masks or a VOC layout."""
    root: str | None = None
    """Where a named dataset lives (e.g. ../shared/data/cifar10-jpg)."""
    preset: str = "cifar"
    """Transform preset of resnetkit.data (e.g. cifar, imagenet, cub448)."""
    train_split: str = "train"
    val_split: str = "val"
    """The split evaluated after each epoch (CIFAR folders call it "test"); "" trains without validation."""
    batch_size: int = 128
    """Global batch: divided between DDP processes."""
    eval_batch_size: int | None = None
    """Global evaluation batch; None means 2 x batch_size."""
    image_size: int | None = None
    """Classification: resize the shorter side of every image to this before the preset (shapes: the render size).
    Segmentation: the square side images and masks are resized to (default 64). Detection: the longer image side
    for training (scale-jittered down to ~0.6x) and inference (default 512)."""
    subset: int | None = None
    """Train on a stratified, seeded subset of this many training images (None: all of them)."""
    class_agnostic: bool = False
    """Detection on CUB-200: one class "bird" instead of one class per species."""
    workers: int | None = None
    """Loader worker processes for image files; None: one per core, at most 8."""
    fast: bool | None = None
    """True: the cached uint8 tensor pipeline; False: a DataLoader; None: picked by image size."""
    cache_dir: str | None = None
    pixel_cache: bool = False
    """Image files: decode every image once, at full size, into an uncompressed cache under cache_dir (3 bytes a
    pixel: the log gives its size), and read pixels instead of decoding JPEGs from then on; the same augmentation.
    For photos of a few hundred pixels (CUB, ImageNet-style folders), where decoding is most of a loader's work."""
    augment: list[str] = field(default_factory=list)
    """Extra training augmentations of resnetkit.data, by name."""
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    train_augment: bool = True
    """False: shuffled training batches without random augmentation (reproducible comparisons, e.g. DDP runs)."""
    val_fraction: float | None = None
    """Cut a validation split of this share (e.g. 0.2) from the training images, stratified by class (multi-label:
    iterative stratification) and seeded by `seed`: for a folder of class folders without train/, a CSV without a
    split column, or any dataset's training split. The lists go to <run>/splits/ and `data.splits` names them."""
    test_fraction: float | None = None
    """With val_fraction: also cut a test split of this share (what `resnetkit eval --split test` reads)."""
    splits: str | None = None
    """A folder of split lists (train.txt, val.txt, test.txt: image paths relative to the dataset, one a line) that
    choose each split's images; set by the engine for val_fraction and by `train --folds`, or given by hand."""
    sampler: str = "none"
    """Training order: "none" (each image once per epoch) or "balanced" (each class drawn equally often per epoch;
    multi-label: each image counted under its rarest label), deterministic from (seed, epoch), resumable."""
    path_column: str | None = None
    """CSV/TSV listings: the column of image paths (relative to the file); None: path, image, file, filename..."""
    label_column: str | None = None
    """CSV/TSV listings: the column of labels; None: label or labels."""
    split_column: str | None = None
    """CSV/TSV listings: the column of splits (train, val, test); None: split, if there is one."""
    label_separator: str | None = None
    """CSV/TSV multi-label listings: what separates the labels of one cell; None: ; or | or , where used, else
    whitespace."""
    class_columns: list[str] | None = None
    """CSV/TSV listings: one 0/1 column per class (multi-label); [] takes every column but the path and split."""
    multilabel: bool = False
    """Several labels per image (the same as `task: multilabel`)."""

    def __post_init__(self) -> None:
        _check_choice("data.sampler", self.sampler, ("none", "balanced"))
        for key in ("val_fraction", "test_fraction"):
            value = getattr(self, key)
            if value is not None and not 0 < value < 1:
                raise ConfigError(f"data.{key}: must be in (0, 1), got {value}")
        if self.test_fraction is not None and self.val_fraction is None:
            raise ConfigError("data.test_fraction needs data.val_fraction (the validation share of the same images)")
        if (self.val_fraction or 0) + (self.test_fraction or 0) >= 1:
            raise ConfigError(
                f"data.val_fraction + data.test_fraction must leave training images, got "
                f"{self.val_fraction} + {self.test_fraction}"
            )
        if self.batch_size < 1 or (self.workers is not None and self.workers < 0):
            raise ConfigError(
                f"data.batch_size must be >= 1 and data.workers >= 0, got {self.batch_size}, {self.workers}"
            )
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ConfigError("data.mixup_alpha and data.cutmix_alpha must be >= 0")
        for key in ("image_size", "subset"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"data.{key}: must be >= 1, got {getattr(self, key)}")


@dataclass
class MomentumWarmup:
    """Momentum (SGD's and RMSprop's momentum, Adam's beta1) rising linearly from `start` to the optimiser's own over
    the first `steps` optimizer steps: a small momentum first, then raised (the CUB-200 reproduction's advice)."""

    start: float = 0.5
    steps: int = 500

    def __post_init__(self) -> None:
        if not 0 <= self.start < 1 or self.steps < 1:
            raise ConfigError(f"optim.momentum_warmup: need 0 <= start < 1 and steps >= 1, got {self}")


@dataclass
class OptimSwitch:
    """A second optimiser from epoch `epoch` on (after `epoch` completed epochs): e.g. start fast with Adam, switch
    to SGD for the final tuning. Unset fields keep the first optimiser's settings; the schedule keeps its shape, scaled
    to the new `lr`."""

    epoch: int = 1
    name: str | None = None
    lr: float | None = None
    momentum: float | None = None
    nesterov: bool | None = None
    weight_decay: float | None = None
    betas: list[float] | None = None
    eps: float | None = None

    def __post_init__(self) -> None:
        if self.epoch < 1:
            raise ConfigError(f"optim.switch.epoch: must be >= 1, got {self.epoch}")
        if self.name is not None:
            _check_choice("optim.switch.name", self.name, OPTIMIZERS)


@dataclass
class OptimConfig:
    name: str = "sgd"
    """sgd, adam, adamw, rmsprop, adagrad or adadelta."""
    lr: float = 0.1
    """Peak learning rate of the head (and of the backbone times model.backbone_lr_scale)."""
    momentum: float = 0.9
    """SGD and RMSprop momentum."""
    nesterov: bool = False
    weight_decay: float = 0.0
    decay_bn_and_bias: bool = False
    """Apply weight decay to BN weights and biases too (off by default: decaying them only hurts)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum_warmup: MomentumWarmup | None = None
    """e.g. {start: 0.5, steps: 500}: momentum (or Adam's beta1) rises linearly to its value over those steps."""
    switch: OptimSwitch | None = None
    """e.g. {epoch: 10, name: sgd, lr: 0.01}: another optimiser from that epoch on."""

    def __post_init__(self) -> None:
        _check_choice("optim.name", self.name, OPTIMIZERS)
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: must be > 0, got {self.lr}")
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas: expected two numbers, got {self.betas}")


@dataclass
class ScheduleConfig:
    name: str = "constant"
    """constant, step, multistep, exponential, cosine, linear (to min_lr), onecycle or plateau."""
    per: str = "epoch"
    """Unit of every length below and of the scheduler's ticks: "epoch" or "step" (one optimizer step)."""
    step_size: float = 30
    """step: multiply by gamma every step_size units."""
    milestones: list[float] = field(default_factory=list)
    """multistep: multiply by gamma at each of these (in units of `per`)."""
    gamma: float = 0.1
    """Factor for step, multistep, exponential (per unit) and plateau."""
    min_lr: float = 0.0
    """cosine, linear: the final learning rate."""
    warmup: float = 0
    """Linear warmup length in units of `per`, from lr x warmup_start_factor to lr."""
    warmup_start_factor: float = 0.1
    pct_start: float = 0.25
    """onecycle: share of the run spent rising to the peak."""
    div_factor: float = 25.0
    """onecycle: starting lr = lr / div_factor."""
    final_div_factor: float = 1e4
    """onecycle: final lr = starting lr / final_div_factor."""
    patience: int = 10
    """plateau: epochs without improvement of train.metric before multiplying by gamma."""

    def __post_init__(self) -> None:
        _check_choice("schedule.name", self.name, SCHEDULES)
        _check_choice("schedule.per", self.per, ("epoch", "step"))
        if self.warmup < 0:
            raise ConfigError(f"schedule.warmup: must be >= 0, got {self.warmup}")
        if not 0 < self.pct_start < 1:
            raise ConfigError(f"schedule.pct_start: must be in (0, 1), got {self.pct_start}")


@dataclass
class TrainConfig:
    epochs: int = 10
    budget: float | str | None = None
    """A wall-time budget for the whole run, training and final evaluation: seconds, or "30s", "10m", "2h". After a
    short measured warm-up the engine plans the number of steps to fit, lays the schedule over exactly those steps,
    re-plans as it measures, and stops, evaluates and saves at the edge; `epochs` then only caps the run."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (He et al. count iterations); None runs all epochs."""
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    """Clip the gradients' global L2 norm to this."""
    accum_steps: int = 1
    """Gradient accumulation: batches per optimizer step."""
    ema: bool = False
    """Keep an exponential moving average of the weights, evaluated and checkpointed alongside."""
    ema_decay: float = 0.999
    amp: str = "none"
    """Mixed precision: none, bf16, fp16 (with a GradScaler) or auto (bf16 where this machine runs it fast: a CUDA GPU
    with bf16, else fp16; a CPU with AMX tiles or AVX512-BF16; else none)."""
    channels_last: bool = False
    compile: bool = False
    """torch.compile the model."""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda, or cuda:N."""
    threads: int | None = None
    """torch CPU threads (None: torch's default, one per core). On a CPU shared with other jobs 1 is often fastest:
    two threads on two busy cores spin at every synchronisation (a detection step measured 30 s wall instead of
    5.6 s)."""
    keep_freed_memory: bool = True
    """Reuse the memory the process frees rather than returning it to the OS at once (glibc's malloc thresholds
    raised: `resnetkit.train.loop.keep_freed_memory`): CPU steps stop page-faulting fresh memory for every large
    tensor (ResNet-50 trained about 25% faster here). The process's memory stays near its peak. Linux only."""
    deterministic: bool = False
    """Deterministic algorithms (exact resume on the CPU), slower on GPUs."""
    sync_bn: bool = False
    """SyncBatchNorm under DDP."""
    metric: str | None = None
    """Validation metric that chooses best.pt (loss metrics are minimised, others maximised); None: the task's
    (val_acc, val_map, val_miou)."""
    eval_every: int = 1
    """Evaluate every N epochs (and after the last)."""
    eval_tta: str = "none"
    """Test-time augmentation of the validation passes: none, flip (the image and its mirror) or flip-translate
    (also shifted a pixel each way: 6 passes); see resnetkit.evaluation.tta. (Older recipes' `eval_flip: true` reads
    as `eval_tta: flip`.)"""
    checkpoint_every: int = 0
    """Also save last.pt every N optimizer steps within an epoch (0: at epoch ends only)."""
    log_every_s: float = 10.0
    """Plain progress lines (off a terminal) every this many seconds."""
    log_images: bool = True
    """Write a grid of augmented training images to TensorBoard."""

    def __post_init__(self) -> None:
        _check_choice("train.amp", self.amp, ("none", "bf16", "fp16", "auto"))
        _check_choice("train.eval_tta", self.eval_tta, TTA_CHOICES)
        for key in ("epochs", "accum_steps", "eval_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"train.label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay: must be in (0, 1), got {self.ema_decay}")
        if self.metric is not None and not (self.metric.startswith("val_") or self.metric.startswith("train_")):
            raise ConfigError(f"train.metric: expected a val_... or train_... metric name, got {self.metric!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"train.threads: must be >= 1, got {self.threads}")
        if self.budget is not None:
            self.budget = parse_duration(self.budget, "train.budget")


def parse_duration(value: float | int | str, key: str = "duration") -> float:
    """Seconds from a number of seconds or a string such as "90", "30s", "10m", "1.5h"."""
    units = {"s": 1, "m": 60, "h": 3600}
    text = str(value).strip().lower()
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise ConfigError(f"{key}: expected seconds or a duration like 30s, 10m, 2h; got {value!r}") from None
    if not seconds > 0:
        raise ConfigError(f"{key}: must be > 0, got {value!r}")
    return seconds


@dataclass
class DetectionConfig:
    """Faster R-CNN + FPN over the zoo backbone `model.name` (task: detection)."""

    trainable_layers: int | None = None
    """Blocks that learn, from the top (stage 4 first, then 3, 2, 1, stem); None: 3 with weights, all without."""
    frozen_bn: bool | None = None
    """Replace BatchNorm by FrozenBatchNorm2d; None: frozen with pretrained weights, learning without."""
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


@dataclass
class SegmentationConfig:
    """A decoder head over the zoo encoder `model.name` (task: segmentation)."""

    head: str = "unet"
    """"unet" (skip connections from every stage) or "fcn" (last stage only: the baseline)."""
    decoder_channels: int = 256
    """Width of the deepest U-Net decoder block, halved at each block up (the FCN head ignores it)."""
    loss: str = "ce+dice"
    """"ce" (pixel cross-entropy), "dice" (soft Dice) or "ce+dice" (their sum)."""
    ignore_index: int = 255
    """Mask value of pixels that count for neither loss nor metrics (VOC borders)."""

    def __post_init__(self) -> None:
        _check_choice("segmentation.head", self.head, SEGMENTATION_HEADS)
        _check_choice("segmentation.loss", self.loss, SEGMENTATION_LOSSES)
        if self.decoder_channels < 1:
            raise ConfigError(f"segmentation.decoder_channels: must be >= 1, got {self.decoder_channels}")


@dataclass
class LossConfig:
    """The classification loss (task: classification or multilabel)."""

    name: str | None = None
    """ce (cross-entropy) or focal for classification; bce (binary cross-entropy on the logits), focal (sigmoid
    focal loss) or asymmetric (ASL, Ridnik et al. 2021) for multilabel. None: ce for classification, bce for
    multilabel."""
    class_weights: str | list[float] | None = None
    """null (every class counts the same), "auto" (inverse class frequency of the training set, normalised to mean
    1), or one weight per class: each class's loss term is multiplied by its weight."""
    focal_gamma: float = 2.0
    """focal: the focusing exponent (Lin et al. 2017); 0 is cross-entropy (or BCE)."""
    asl_gamma_neg: float = 4.0
    """asymmetric: the focusing exponent of negative labels."""
    asl_gamma_pos: float = 0.0
    """asymmetric: the focusing exponent of positive labels."""
    asl_clip: float = 0.05
    """asymmetric: probability margin shifted off the negatives (easy negatives below it count nothing)."""

    def __post_init__(self) -> None:
        if self.name is not None:
            _check_choice("loss.name", self.name, LOSSES)
        if isinstance(self.class_weights, str) and self.class_weights != "auto":
            raise ConfigError(
                f"loss.class_weights: expected null, 'auto' or a list of weights, got {self.class_weights!r}"
            )
        if isinstance(self.class_weights, list) and not (
            self.class_weights and all(w >= 0 for w in self.class_weights) and any(w > 0 for w in self.class_weights)
        ):
            raise ConfigError(f"loss.class_weights: weights must be >= 0 and not all 0, got {self.class_weights}")
        for key in ("focal_gamma", "asl_gamma_neg", "asl_gamma_pos"):
            if getattr(self, key) < 0:
                raise ConfigError(f"loss.{key}: must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.asl_clip < 1:
            raise ConfigError(f"loss.asl_clip: must be in [0, 1), got {self.asl_clip}")


@dataclass
class Config:
    task: str = "classification"
    """classification, multilabel (several labels per image), detection or segmentation: what the model learns;
    every task trains with this engine."""
    name: str = "run"
    """The run folder's name: outputs go to <output_dir>/<name>/."""
    output_dir: str = "runs"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    """task: detection only."""
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    """task: segmentation only."""
    loss: LossConfig = field(default_factory=LossConfig)
    """task: classification and multilabel."""

    def __post_init__(self) -> None:
        _check_choice("task", self.task, TASKS)
        self._check_labels()
        if self.task == "detection" and self.model.freeze != "none":
            raise ConfigError(
                f"model.freeze={self.model.freeze!r}: a detector's frozen blocks are set by "
                "detection.trainable_layers (and its BatchNorm by detection.frozen_bn)"
            )
        if self.task != "detection" and self.data.class_agnostic:
            raise ConfigError("data.class_agnostic applies to detection (task: detection)")
        if self.task in ("detection", "segmentation"):
            for key, unset in (("val_fraction", None), ("splits", None), ("sampler", "none")):
                if getattr(self.data, key) != unset:
                    raise ConfigError(f"data.{key} applies to classification, not to task {self.task!r}")

    def _check_labels(self) -> None:
        """task multilabel and data.multilabel say the same; the loss section fits the task (resolved here)."""
        d, loss = self.data, self.loss
        if d.multilabel and self.task in ("detection", "segmentation"):
            raise ConfigError(f"data.multilabel applies to classification (task: multilabel), not task {self.task!r}")
        if d.multilabel or self.task == "multilabel":
            self.task, d.multilabel = "multilabel", True
        if self.task not in ("classification", "multilabel"):
            return
        allowed = MULTILABEL_LOSSES if self.task == "multilabel" else SINGLE_LABEL_LOSSES
        loss.name = loss.name or allowed[0]
        if loss.name not in allowed:
            other = "multilabel" if self.task == "classification" else "classification"
            raise ConfigError(
                f"loss.name={loss.name!r} is a loss for task {other}; task {self.task} takes {', '.join(allowed)}"
            )
        if self.task == "multilabel" and (d.mixup_alpha > 0 or d.cutmix_alpha > 0):
            raise ConfigError("data.mixup_alpha and data.cutmix_alpha mix single labels; task multilabel takes neither")
        if self.train.label_smoothing > 0 and loss.name != "ce":
            raise ConfigError(
                f"train.label_smoothing smooths cross-entropy (loss.name: ce), not loss.name={loss.name!r}"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: unknown value {value!r}{_closest(value, choices)}; choose from {', '.join(choices)}")


def _closest(word: str, choices, n: int = 3) -> str:
    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str) -> Any:
    """`value` checked against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:  # an optional section: a mapping builds it
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return _build(arg, value, key + ".")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        names = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{key}: expected {names}, got {type(value).__name__} {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item)}, got {type(value).__name__} {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = _closest(prefix + str(key), [prefix + f for f in fields])
            raise ConfigError(
                f"unknown key {prefix + str(key)!r}{close}; "
                f"valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(sorted(fields))}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Validate a plain dict (as read from YAML) into a Config; errors name `source` and the key."""
    try:
        data = _upgraded(data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return dataclass_from_dict(Config, data, source)


def _upgraded(data: dict[str, Any]) -> dict[str, Any]:
    """Older recipes' and checkpoints' spellings in today's: train.eval_flip (a bool) is train.eval_tta."""
    train = data.get("train") if isinstance(data, dict) else None
    if not isinstance(train, dict) or "eval_flip" not in train:
        return data
    train = dict(train)
    flip = train.pop("eval_flip")
    if not isinstance(flip, bool):
        raise ConfigError(f"train.eval_flip: expected bool, got {type(flip).__name__} {flip!r} (now train.eval_tta)")
    train.setdefault("eval_tta", "flip" if flip else "none")
    return {**data, "train": train}


def dataclass_from_dict(cls: type[T], data: dict[str, Any] | None, source: str = "config") -> T:
    """Any config dataclass (this module's Config, detection's and segmentation's) from a plain dict.

    Unknown keys are refused with the closest known one, values are checked against the field annotations (nested
    dataclasses recursively), and every error is one ConfigError naming `source` and the dotted key.
    """
    try:
        return _build(cls, data or {}, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def set_key(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in a raw config dict, making the sections on the way; a non-mapping on the way is an error."""
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {k!r} is not a section")
    node[keys[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides to a raw config dict; values are YAML scalars (3, 0.1, true, [1, 2], null)."""
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=0.05")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: cannot parse the value: {e}") from None
        try:
            set_key(data, key.strip(), value)
        except ConfigError as e:
            raise ConfigError(f"--set {e}") from None
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML recipe (or start from the defaults when `path` is None), apply overrides, validate once.

    A recipe without `name` is named after its file (configs/demo.yaml runs in runs/demo/).
    """
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        data.setdefault("name", path.stem)
        source = str(path)
    try:
        apply_overrides(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return config_from_dict(data, source)


def save_config(config: Config, path: str | Path, header: str = "") -> Path:
    """The config as YAML (atomically), after `header` (comment lines, each starting with '#')."""
    from resnetkit.fileio import write_atomic

    return write_atomic(path, header + yaml.safe_dump(config.to_dict(), sort_keys=False))
