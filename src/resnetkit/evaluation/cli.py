"""`resnetkit eval` (every task), `resnetkit calibrate`, `resnetkit report RUN_DIR` and `resnetkit explain IMAGE...`:
thin shells over evaluate.py, calibrate.py, report.py and explain.py."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from resnetkit.cli_shared import UserError, add_device, add_model_source, load_model_source, positive
from resnetkit.config import TTA_CHOICES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint (or a bare model + weights) on a whole split: metrics, confusion matrix, "
        "calibration, misclassified images (multi-label: mAP, per-class AP/F1, precision-recall curves)",
        description="Either --checkpoint (class names, preprocessing and default data come from it) or --model NAME "
        "--weights FILE --data FOLDER (class names from the dataset). Writes eval.json, confusion_matrix.png/.csv, "
        "reliability.png and misclassified.png to --out.",
    )
    add_model_source(p)
    p.add_argument(
        "--preset",
        choices=["cifar", "imagenet", "cub448"],
        help="preprocessing of a bare --model (default: cifar for the CIFAR family, imagenet otherwise)",
    )
    p.add_argument("--data", help="dataset name or folder (default: the checkpoint's training data)")
    p.add_argument("--root", help="where a named dataset lives")
    p.add_argument(
        "--split",
        default=None,
        help="split to evaluate (default: test for classifiers, folders falling back to val/; the training "
        "validation split for detectors and segmenters)",
    )
    p.add_argument(
        "--tta",
        choices=TTA_CHOICES,
        default=None,
        help="test-time augmentation: flip (average with the mirror) or flip-translate (also shifted a pixel each way)",
    )
    p.add_argument("--out", help="output folder (default: eval/ beside the checkpoint, ./eval for --model)")
    p.add_argument("--batch-size", type=positive, default=None, help="images per batch (default 128; detection 4)")
    p.add_argument("--workers", type=int, default=2, help="data loading processes")
    add_device(p)
    p.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    p.add_argument("--json", action="store_true", help="print eval.json instead of the summary tables")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "calibrate",
        help="fit a classifier's temperature on its validation split (temperature scaling): calibrated "
        "probabilities for predict, serve and export, the same top-1",
        description="Fits one temperature T on the validation split of the checkpoint's config (the images and "
        "preprocessing training validated with) by minimising the NLL, and writes it into the checkpoint "
        "(atomically, in place unless --out; every other key kept). predict, serve, export and eval then use "
        "softmax(logits / T). Prints top-1, NLL and ECE before and after; writes calibration/calibration.json and "
        "reliability_before.png / reliability_after.png beside the written checkpoint.",
    )
    p.add_argument("--checkpoint", required=True, help="a classifier's training checkpoint, e.g. runs/demo/best.pt")
    p.add_argument("--out", help="write the calibrated checkpoint here instead of over --checkpoint")
    p.add_argument("--data", help="dataset name or folder to fit on (default: the checkpoint's training data)")
    p.add_argument("--split", help="held-out split to fit on (default: the checkpoint's data.val_split)")
    p.add_argument("--batch-size", type=positive, default=None, help="images per batch (default: the recipe's)")
    p.add_argument("--workers", type=int, default=None, help="data loading processes (default: the recipe's)")
    add_device(p)
    p.add_argument("--json", action="store_true", help="print calibration.json instead of the summary")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser(
        "report",
        help="one self-contained HTML report (and a Markdown twin) of a training run",
        description="Reads RUN_DIR (config.yaml, metrics.jsonl, curves.png, best.pt); evaluates best.pt into "
        "RUN_DIR/eval first unless eval/eval.json is there (or --reeval).",
    )
    p.add_argument("run_dir", help="a training run folder, e.g. runs/demo")
    p.add_argument("--out", help="where report.html and report.md go (default: RUN_DIR)")
    p.add_argument("--reeval", action="store_true", help="evaluate again even if RUN_DIR/eval/eval.json exists")
    p.add_argument("--data", help="dataset for the evaluation (default: the run's)")
    p.add_argument("--split", default="test")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "explain",
        help="Grad-CAM heatmaps of the top-k classes for each image",
        description="Writes, per image, <name>_gradcam.png: the image as the model sees it, then the heatmap "
        "overlay for each of the top-k classes labelled with class and probability; and explain.json.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    add_model_source(p)
    p.add_argument("--top-k", type=positive, default=3)
    p.add_argument("--layer", help="module to explain, e.g. layer3 (default: the last stage)")
    p.add_argument("--out", default="explain", help="output folder (default: ./explain)")
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity")
    add_device(p)
    p.set_defaults(func=cmd_explain)


def _pct(value: float) -> str:
    return f"{value * 100:.2f}%"


def print_summary(result: dict, out: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    title = f"{result['model']} on {result['data']} / {result['split']}" + (
        f" (tta {result['tta']})" if result.get("tta") else ""
    )
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    if result.get("multilabel"):
        return _print_multilabel(console, table, result, out)
    rows = [
        ("samples", f"{result['num_samples']:,}"),
        ("top-1", _pct(result["top1"])),
        ("top-5", _pct(result["top5"])),
        ("cross-entropy", f"{result['loss']:.4f}"),
        ("precision macro / weighted", f"{_pct(result['precision_macro'])} / {_pct(result['precision_weighted'])}"),
        ("recall macro / weighted", f"{_pct(result['recall_macro'])} / {_pct(result['recall_weighted'])}"),
        ("F1 macro / weighted", f"{_pct(result['f1_macro'])} / {_pct(result['f1_weighted'])}"),
        ("balanced accuracy", _pct(result["balanced_accuracy"])),
        ("ECE (15 bins)", _pct(result["ece"])),
        ("time", f"{result['seconds']:.1f} s on {result['device']}"),
    ]
    if result.get("temperature", 1.0) != 1.0:  # a calibrated checkpoint: its loss and ECE are at this temperature
        rows.insert(-1, ("temperature (calibrated)", f"{result['temperature']:.4g}"))
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if len(result["per_class"]) <= 30:
        per = Table(title="per class")
        for col in ("class", "precision", "recall", "F1", "support"):
            per.add_column(col, justify="left" if col == "class" else "right")
        for r in result["per_class"]:
            per.add_row(r["class"], _pct(r["precision"]), _pct(r["recall"]), _pct(r["f1"]), str(r["support"]))
        console.print(per)
    if result["skipped"]:
        console.print(f"skipped {len(result['skipped'])} unreadable images (listed in eval.json)")
    if out is not None:
        console.print(f"wrote {out}/eval.json, confusion_matrix.png/.csv, reliability.png, misclassified.png")


def _print_multilabel(console, table, result: dict, out: Path | None) -> None:
    from rich.table import Table

    rows = [
        ("samples", f"{result['num_samples']:,}"),
        ("mAP (macro)", f"{result['map']:.4f}"),
        ("F1 macro", _pct(result["f1_macro"])),
        ("exact-match ratio", _pct(result["exact_match"])),
        ("Hamming loss", f"{result['hamming_loss']:.4f}"),
        ("thresholds", result["thresholds_from"]),
        ("time", f"{result['seconds']:.1f} s on {result['device']}"),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if len(result["per_class"]) <= 30:
        per = Table(title="per class")
        for col in ("class", "AP", "precision", "recall", "F1", "threshold", "support"):
            per.add_column(col, justify="left" if col == "class" else "right")
        for r in result["per_class"]:
            ap = "-" if r["ap"] is None else f"{r['ap']:.4f}"
            f1 = [_pct(r["precision"]), _pct(r["recall"]), _pct(r["f1"])]
            per.add_row(r["class"], ap, *f1, f"{r['threshold']:.3f}", str(r["support"]))
        console.print(per)
    if result["skipped"]:
        console.print(f"skipped {len(result['skipped'])} unreadable images (listed in eval.json)")
    if out is not None:
        console.print(f"wrote {out}/eval.json, pr_curves.png")


def cmd_eval(args: argparse.Namespace) -> int:
    from resnetkit.train.distributed import process_group

    with process_group(args.device) as info:  # under torchrun: each rank evaluates its shard
        return _eval(args, info)


def _eval(args: argparse.Namespace, info) -> int:
    from resnetkit.evaluation.evaluate import evaluate, evaluate_task

    if args.model and not args.data:
        raise UserError("--model needs --data (the dataset to evaluate on)")
    bundle = load_model_source(args)
    default_out = Path(args.checkpoint).parent / "eval" if args.checkpoint else Path("eval")
    out = Path(args.out) if args.out else default_out
    progress = not args.json and info.is_main
    if bundle.task != "classification":
        if args.tta not in (None, "none"):
            raise UserError(f"--tta applies to classifiers; {args.checkpoint} is a {bundle.task} model")
        split = args.split or bundle.checkpoint["config"]["data"]["val_split"]
        result = evaluate_task(
            bundle,
            args.data,
            split,
            out,
            batch_size=args.batch_size,
            workers=args.workers,
            device=info.device,
            progress=progress,
        )
        if info.is_main:
            print(json.dumps(result, indent=2) if args.json else task_summary(result, out))
        return 0
    result = evaluate(
        bundle,
        args.data,
        args.split or "test",
        args.tta,
        out,
        root=args.root,
        batch_size=args.batch_size or 128,
        workers=args.workers,
        device=info.device,
        progress=progress,
    )
    if not info.is_main:
        return 0
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_summary(result, out)
    return 0


def task_summary(result: dict, out: Path) -> str:
    """The lines `resnetkit eval` prints for a detector or a segmenter."""
    lines = [f"{result['data']} [{result['split']}], {result['num_images']} images"]
    if result["task"] == "detection":
        for key, name in (("map", "mAP@[.5:.95]"), ("map50", "mAP@.5"), ("map75", "mAP@.75")):
            lines.append(f"  {name:<13} {result[key]:.4f}")
        per_class = result.get("per_class_ap") or {}
        if len(per_class) > 1:
            width = max(len(c) for c in per_class)
            lines.append(f"{'class':<{width}}  AP@[.5:.95]")
            lines += [f"{c:<{width}}  {_num(ap)}" for c, ap in per_class.items()]
    else:
        lines.append(
            f"mIoU {result['miou']:.4f}  pixel acc {result['pixel_acc']:.4f}  mean Dice {result['mean_dice']:.4f}"
        )
        width = max(len(c) for c in result["per_class_iou"])
        lines.append(f"{'class':<{width}}  {'IoU':>6}  {'Dice':>6}")
        for c, iou in result["per_class_iou"].items():
            dice = result["per_class_dice"][c]
            lines.append(f"{c:<{width}}  {_num(iou)}  {_num(dice)}")
    lines.append(f"wrote {out / 'eval.json'}")
    return "\n".join(lines)


def _num(v: float | None) -> str:
    return f"{v:6.4f}" if v is not None else "     -"


def cmd_calibrate(args: argparse.Namespace) -> int:
    from resnetkit.evaluation.calibrate import calibrate

    result = calibrate(
        args.checkpoint,
        args.out,
        data=args.data,
        split=args.split,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
    )
    print(json.dumps(result, indent=2) if args.json else calibration_summary(result))
    return 0


def calibration_summary(result: dict) -> str:
    """The lines `resnetkit calibrate` prints: the temperature, before/after metrics, and where everything went."""
    before, after = result["before"], result["after"]
    lines = [
        f"{result['source']} on {result['data']} [{result['split']}], {result['num_samples']} images: "
        f"temperature {result['temperature']:.4f}",
        f"  {'':<15} {'before':>9} {'after':>9}",
        f"  {'temperature':<15} {before['temperature']:>9.4f} {after['temperature']:>9.4f}",
    ]
    kept = [("mAP", "map"), ("F1 macro", "f1_macro"), ("exact match", "exact_match")]
    for name, key in kept if result.get("multilabel") else [("top-1", "top1")]:
        lines.append(f"  {name:<15} {_pct(before[key]):>9} {_pct(after[key]):>9}")
    lines += [
        f"  {'NLL':<15} {before['nll']:>9.4f} {after['nll']:>9.4f}",
        f"  {'ECE (15 bins)':<15} {_pct(before['ece']):>9} {_pct(after['ece']):>9}",
    ]
    if result.get("multilabel"):
        lines.append("  (the per-class thresholds move with T: every predicted label stays the same)")
    if result["at_search_edge"]:
        lines.append(
            f"note: T {result['temperature']:.3g} is at the end of the searched range (0.01..100): the NLL kept "
            "falling (a split the model makes no mistakes on?)"
        )
    if result["in_place"]:
        lines.append(
            f"wrote the temperature into {result['checkpoint']} in place (every other key as it was; --out writes "
            "a copy instead)"
        )
    else:
        lines.append(f"wrote the calibrated checkpoint {result['checkpoint']} ({result['source']} is unchanged)")
    folder = Path(result["figures"]["after"]).parent
    lines.append(f"wrote {folder}/calibration.json, reliability_before.png, reliability_after.png")
    return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> int:
    from resnetkit.evaluation.report import write_report

    run = Path(args.run_dir)
    if args.reeval or args.data:
        from resnetkit.evaluation.evaluate import evaluate

        checkpoint = run / "best.pt" if (run / "best.pt").is_file() else run / "last.pt"
        evaluate(checkpoint, args.data, args.split, out_dir=run / "eval", device=args.device)
    html_path, md_path = write_report(run, args.out, split=args.split, device=args.device)
    print(f"report: {html_path}")
    print(f"markdown: {md_path}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from resnetkit.evaluation.evaluate import resolve_device
    from resnetkit.evaluation.explain import explain_files

    bundle = load_model_source(args, device=resolve_device(args.device))
    for record in explain_files(bundle, args.images, args.out, args.top_k, args.layer, args.alpha):
        shown = ", ".join(f"{e['class']} {e['probability']:.1%}" for e in record["top_k"])
        print(f"{record['image']}: {shown} -> {record['output']}")
    return 0
