"""`resnetkit segment train|eval|predict`: a thin shell over `resnetkit.tasks.segmentation`.

resnetkit segment train --data shapes --model resnet18 --stem cifar --image-size 64 --epochs 6 --name seg-shapes
resnetkit segment eval runs/seg-shapes/best.pt --split val
resnetkit segment predict runs/seg-shapes/best.pt images/ --out overlays/
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    seg = sub.add_parser("segment", help="semantic segmentation: U-Net or FCN on a zoo ResNet encoder")
    cmds = seg.add_subparsers(dest="segment_command", metavar="SUBCOMMAND", required=True)

    p = cmds.add_parser("train", help="train on the synthetic shapes set or an image + PNG mask folder")
    p.add_argument("--config", help="YAML file of SegmentationConfig fields; flags given here override it")
    p.add_argument("--data", help="'shapes' (synthetic, default) or a folder: <split>/images + <split>/masks, or VOC")
    p.add_argument("--model", help="encoder: any zoo model, e.g. resnet18, resnet50, resnext50_32x4d, resnet20")
    p.add_argument("--head", choices=["unet", "fcn"], help="decoder (default unet)")
    p.add_argument("--weights", help="encoder weights: 'imagenet' or a file")
    p.add_argument(
        "--stem", choices=["imagenet", "cifar"], help="encoder stem (ImageNet family); cifar for small images"
    )
    p.add_argument("--decoder-channels", type=int)
    p.add_argument("--image-size", type=int, help="square side images and masks are resized to (default 64)")
    p.add_argument("--num-images", type=int, help="synthetic set: training images (validation gets a quarter)")
    p.add_argument("--loss", choices=["ce", "dice", "ce+dice"], help="default ce+dice")
    p.add_argument("--ignore-index", type=int, help="mask value to ignore (default 255)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--repeat", type=int, help="passes over the training set per epoch (tiny sets)")
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--no-flip", dest="flip", action="store_false", default=None, help="no random horizontal flips")
    p.add_argument("--workers", type=int)
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is often fastest on a busy shared CPU)")
    p.add_argument("--seed", type=int)
    p.add_argument("--name", help="run name: the run folder is <output-dir>/<name> (default segment)")
    p.add_argument("--output-dir", help="default runs")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue the run saved in this last.pt")
    p.set_defaults(func=cmd_train)

    p = cmds.add_parser("eval", help="mIoU, per-class IoU and Dice, pixel accuracy of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--data", help="default: the data the checkpoint was trained on")
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", help="folder for seg_eval.json (default: the checkpoint's folder)")
    p.set_defaults(func=cmd_eval)

    p = cmds.add_parser("predict", help="write colour overlays (and optionally palette masks) for images")
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--out", default="predictions", help="output folder (default predictions)")
    p.add_argument("--alpha", type=float, default=0.5, help="colour opacity in the overlay, 0..1 (default 0.5)")
    p.add_argument("--save-masks", action="store_true", help="also write <name>_mask.png (palette PNG of classes)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.set_defaults(func=cmd_predict)


_TRAIN_FIELDS = (
    "data",
    "model",
    "head",
    "weights",
    "stem",
    "decoder_channels",
    "image_size",
    "num_images",
    "loss",
    "ignore_index",
    "epochs",
    "batch_size",
    "repeat",
    "lr",
    "weight_decay",
    "flip",
    "workers",
    "device",
    "seed",
    "name",
    "output_dir",
)


def cmd_train(args: argparse.Namespace) -> int:
    from resnetkit.tasks.segmentation import SegmentationConfig, train_segmentation

    values = {}
    if args.config:
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"config not found: {path}")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a mapping of SegmentationConfig fields")
    values.update({k: getattr(args, k) for k in _TRAIN_FIELDS if getattr(args, k) is not None})
    config = SegmentationConfig.from_dict(values, str(args.config) if args.config else "segmentation config")
    result = train_segmentation(config, resume=args.resume)
    print(f"run folder: {result.run_dir}")
    print(
        f"best val mIoU {result.metrics['best_miou']:.4f}; checkpoints: {result.best_checkpoint}, "
        f"{result.last_checkpoint}"
    )
    return 0


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def cmd_eval(args: argparse.Namespace) -> int:
    from resnetkit.tasks.segmentation import evaluate_segmentation

    _set_threads(args.threads)
    out = args.out or Path(args.checkpoint).parent
    report = evaluate_segmentation(args.checkpoint, args.data, args.split, args.batch_size, args.device, out)
    print(f"{report['data']} {report['split']}: {report['num_images']} images")
    print(f"mIoU {report['miou']:.4f}  pixel acc {report['pixel_acc']:.4f}  mean Dice {report['mean_dice']:.4f}")
    width = max(len(c) for c in report["per_class_iou"])
    print(f"{'class':<{width}}  {'IoU':>6}  {'Dice':>6}")
    for c, iou in report["per_class_iou"].items():
        dice = report["per_class_dice"][c]
        print(f"{c:<{width}}  {_num(iou)}  {_num(dice)}")
    print(f"wrote {Path(out) / 'seg_eval.json'}")
    return 0


def _num(v: float | None) -> str:
    return f"{v:6.4f}" if v is not None else "     -"


def cmd_predict(args: argparse.Namespace) -> int:
    from resnetkit.tasks.segmentation import predict_segmentation

    _set_threads(args.threads)
    written = predict_segmentation(args.checkpoint, args.images, args.out, args.alpha, args.save_masks, args.device)
    for path in written:
        print(path)
    print(f"wrote {len(written)} overlay(s) to {args.out}")
    return 0
