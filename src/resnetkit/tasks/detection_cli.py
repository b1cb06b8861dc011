"""`resnetkit detect train|eval|predict`: Faster R-CNN + FPN on a zoo backbone.

resnetkit detect train --config configs/detect_cub.yaml --epochs 8 --out runs/detect-cub
resnetkit detect eval runs/detect-cub/best.pt --data ../shared/data/cub200-2011-subset/CUB_200_2011 --split test
resnetkit detect predict runs/detect-cub/best.pt photo.jpg more_photos/ --out predictions/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}

# Flags of `detect train` and the config field each sets (None: keep the config's value).
_TRAIN_FLAGS = {
    "data": "data",
    "backbone": "model.backbone",
    "weights": "model.weights",
    "trainable_layers": "model.trainable_layers",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "image_size": "image_size",
    "lr": "lr",
    "optimizer": "optimizer",
    "val_split": "val_split",
    "max_train_images": "max_train_images",
    "workers": "workers",
    "out": "out",
    "device": "device",
    "seed": "seed",
}


def register(sub: argparse._SubParsersAction) -> None:
    det = sub.add_parser("detect", help="object detection: Faster R-CNN + FPN on any zoo ResNet (train, eval, predict)")
    verbs = det.add_subparsers(dest="detect_command", metavar="{train,eval,predict}", required=True)

    p = verbs.add_parser("train", help="train a detector; writes last.pt, best.pt, metrics.jsonl, curves.png, tb/")
    p.add_argument("--config", help="a YAML recipe, e.g. configs/detect_cub.yaml (flags below override it)")
    p.add_argument("--data", help="a COCO .json file, a folder of <split>.json files, or a CUB-200-2011 root")
    p.add_argument("--backbone", help="zoo model name (default resnet50)")
    p.add_argument("--weights", help='backbone weights: "imagenet", "imagenet-v2" or a file')
    p.add_argument("--trainable-layers", type=int, help="blocks that learn, from the top (0-5 for ResNets)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--image-size", type=int, help="longer image side in pixels")
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=["sgd", "adamw"])
    p.add_argument("--val-split", help='split evaluated after epochs ("" for none; default test)')
    p.add_argument("--max-train-images", type=int, help="use only the first N training images")
    p.add_argument("--workers", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--out", help="run folder (default runs/detect)")
    p.add_argument("--per-species", action="store_true", help="CUB: one class per species instead of 'bird'")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set model.fpn_channels=128 (repeatable)",
    )
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser("eval", help="COCO mAP@[.5:.95], mAP@.5 and mAP@.75 of a checkpoint on a split")
    p.add_argument("checkpoint", help="a `detect train` checkpoint (best.pt / last.pt)")
    p.add_argument("--data", help="dataset (default: the one the checkpoint was trained on)")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="where to write eval.json (default: beside the checkpoint)")
    p.set_defaults(func=cmd_eval)

    p = verbs.add_parser("predict", help="draw labelled boxes with scores on images")
    p.add_argument("checkpoint", help="a `detect train` checkpoint")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--out", default="predictions", help="folder for the drawn images and predictions.json")
    p.add_argument("--score-thresh", type=float, default=0.5, help="draw detections scoring at least this")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_predict)


def _parse_set(items: list[str]) -> dict:
    import yaml

    from resnetkit.cli import UserError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from resnetkit.tasks.detection import load_detection_config, train_detector

    overrides = {}
    for flag, key in _TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    if args.per_species:
        overrides["class_agnostic"] = False
    overrides.update(_parse_set(args.set))
    config = load_detection_config(args.config, overrides)
    if not config.data:
        from resnetkit.cli import UserError

        raise UserError("no data: pass --data PATH (COCO .json, folder of <split>.json, or CUB root) or --config")
    metrics = train_detector(config, resume=args.resume)
    shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
    print(f"done: {config.out} {json.dumps(shown)}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from resnetkit.tasks.detection import detector_from_checkpoint, evaluate_detector, load_detection_data

    model, ckpt = detector_from_checkpoint(args.checkpoint, device=args.device)
    config = ckpt.get("config", {})
    data = args.data or config.get("data")
    if not data:
        from resnetkit.cli import UserError

        raise UserError(f"{args.checkpoint} names no dataset: pass --data")
    dataset = load_detection_data(data, args.split, class_agnostic=config.get("class_agnostic", True))
    if len(dataset.classes) != len(ckpt["classes"]):
        raise ValueError(
            f"{data} has {len(dataset.classes)} classes but {args.checkpoint} was trained on {len(ckpt['classes'])}"
        )
    metrics = evaluate_detector(model, dataset, batch_size=args.batch_size, progress=True)
    result = {"checkpoint": str(args.checkpoint), "data": str(data), "split": args.split, **metrics}
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name("eval.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{data} [{args.split}], {metrics['images']} images")
    for key, name in (("map", "mAP@[.5:.95]"), ("map50", "mAP@.5"), ("map75", "mAP@.75")):
        print(f"  {name:<13} {metrics[key]:.4f}")
    print(f"wrote {out}")
    return 0


def _image_files(items: list[str]) -> list[Path]:
    files = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"image not found: {path}")
    return files


def cmd_predict(args: argparse.Namespace) -> int:
    from resnetkit.tasks.detection import detector_from_checkpoint, draw_detections, predict_images, read_rgb, save_rgb

    model, ckpt = detector_from_checkpoint(args.checkpoint, device=args.device)
    classes = ckpt["classes"]
    files = _image_files(args.images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for path, det in zip(files, predict_images(model, files)):
        drawn = draw_detections(read_rgb(path), det, classes, args.score_thresh)
        target = out / f"{path.stem}.png"
        save_rgb(drawn, target)
        keep = det["scores"] >= args.score_thresh
        boxes = [
            {"label": classes[int(c) - 1], "score": round(float(s), 4), "box": [round(v, 1) for v in b]}
            for b, s, c in zip(det["boxes"][keep].tolist(), det["scores"][keep].tolist(), det["labels"][keep].tolist())
        ]
        records.append({"image": str(path), "output": str(target), "detections": boxes})
        best = f", best {boxes[0]['label']} {boxes[0]['score']:.2f}" if boxes else ""
        print(f"{path}: {len(boxes)} boxes{best} -> {target}")
    (out / "predictions.json").write_text(json.dumps(records, indent=2) + "\n")
    return 0
