"""`resnetkit eval`, `resnetkit report RUN_DIR` and `resnetkit explain IMAGE...`: thin shells over evaluate.py,
report.py and explain.py."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint (or a bare model + weights) on a whole split: metrics, confusion matrix, "
        "calibration, misclassified images",
        description="Either --checkpoint (class names, preprocessing and default data come from it) or --model NAME "
        "--weights FILE --data FOLDER (class names from the dataset). Writes eval.json, confusion_matrix.png/.csv, "
        "reliability.png and misclassified.png to --out.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a training checkpoint, e.g. runs/demo/best.pt")
    source.add_argument("--model", help="a registered model name (with --weights and --data)")
    p.add_argument("--weights", help="weights for --model: state dict, checkpoint or .safetensors file")
    p.add_argument(
        "--preset",
        choices=["cifar", "imagenet", "cub448"],
        help="preprocessing of a bare --model (default: cifar for the CIFAR family, imagenet otherwise)",
    )
    p.add_argument("--data", help="dataset name or folder (default: the checkpoint's training data)")
    p.add_argument("--root", help="where a named dataset lives")
    p.add_argument("--split", default="test", help="split to evaluate (default: test; folders fall back to val/)")
    p.add_argument("--tta", choices=["flip"], default=None, help="test-time augmentation: average with the mirror")
    p.add_argument("--out", help="output folder (default: eval/ beside the checkpoint, ./eval for --model)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="data loading processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    p.add_argument("--json", action="store_true", help="print eval.json instead of the summary tables")
    p.set_defaults(func=cmd_eval)

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
    p.add_argument("--checkpoint", required=True, help="a training checkpoint, e.g. runs/demo/best.pt")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--layer", help="module to explain, e.g. layer3 (default: the last stage)")
    p.add_argument("--out", default="explain", help="output folder (default: ./explain)")
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity")
    p.add_argument("--device", default="auto")
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
    rows = [
        ("samples", f"{result['num_samples']:,}"),
        ("top-1", _pct(result["top1"])),
        ("top-5", _pct(result["top5"])),
        ("cross-entropy", f"{result['loss']:.4f}"),
        ("precision macro / weighted", f"{_pct(result['precision_macro'])} / {_pct(result['precision_weighted'])}"),
        ("recall macro / weighted", f"{_pct(result['recall_macro'])} / {_pct(result['recall_weighted'])}"),
        ("F1 macro / weighted", f"{_pct(result['f1_macro'])} / {_pct(result['f1_weighted'])}"),
        ("ECE (15 bins)", _pct(result["ece"])),
        ("time", f"{result['seconds']:.1f} s on {result['device']}"),
    ]
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


def cmd_eval(args: argparse.Namespace) -> int:
    from resnetkit.train.distributed import cleanup, setup

    info = setup(args.device)  # under torchrun: join the process group, each rank evaluates its shard
    try:
        return _eval(args, info)
    finally:
        cleanup()


def _eval(args: argparse.Namespace, info) -> int:
    from resnetkit.cli import UserError
    from resnetkit.evaluate import default_preprocess, evaluate, load_bare_model

    common = dict(
        split=args.split,
        tta=args.tta,
        root=args.root,
        batch_size=args.batch_size,
        workers=args.workers,
        device=info.device,
        progress=not args.json and info.is_main,
    )
    if args.checkpoint:
        if args.weights or args.preset:
            raise UserError("--weights and --preset go with --model, not --checkpoint")
        out = Path(args.out) if args.out else Path(args.checkpoint).parent / "eval"
        result = evaluate(args.checkpoint, args.data, out_dir=out, use_ema=args.ema, **common)
    else:
        if not args.weights or not args.data:
            raise UserError("--model needs --weights FILE and --data FOLDER")
        from resnetkit.data import build_dataset, preprocess_info

        preprocess = preprocess_info(args.preset) if args.preset else default_preprocess(args.model)
        classes = build_dataset(args.data, args.split, root=args.root).classes
        model = load_bare_model(args.model, args.weights, len(classes))
        out = Path(args.out) if args.out else Path("eval")
        result = evaluate(
            model, args.data, out_dir=out, classes=classes, preprocess=preprocess, model_name=args.model, **common
        )
    if not info.is_main:
        return 0
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_summary(result, out)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from resnetkit.report import write_report

    run = Path(args.run_dir)
    if args.reeval or args.data:
        from resnetkit.evaluate import evaluate

        checkpoint = run / "best.pt" if (run / "best.pt").is_file() else run / "last.pt"
        evaluate(checkpoint, args.data, args.split, out_dir=run / "eval", device=args.device)
    html_path, md_path = write_report(run, args.out, split=args.split, device=args.device)
    print(f"report: {html_path}")
    print(f"markdown: {md_path}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from resnetkit.checkpoint import model_from_checkpoint
    from resnetkit.cli import UserError
    from resnetkit.data import open_image
    from resnetkit.evaluate import resolve_device
    from resnetkit.explain import explain_top_k, plot_explanation

    if args.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {args.top_k}")
    paths = [Path(p) for p in args.images]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"image file {path} does not exist")
    model, ckpt = model_from_checkpoint(args.checkpoint)
    if not ckpt.get("classes") or not ckpt.get("preprocess"):
        raise UserError(f"{args.checkpoint} lacks 'classes' or 'preprocess': it was not written by resnetkit train")
    model.to(resolve_device(args.device))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records, used = [], set()
    for path in paths:
        view, entries = explain_top_k(
            model, open_image(path), ckpt["preprocess"], ckpt["classes"], args.top_k, args.layer
        )
        name = f"{path.stem}_gradcam.png"
        if name in used:  # two inputs with the same file name from different folders
            name = f"{path.stem}_{len(used)}_gradcam.png"
        used.add(name)
        plot_explanation(view, entries, out / name, title=path.name, alpha=args.alpha)
        records.append(
            {
                "image": str(path),
                "output": str(out / name),
                "layer": args.layer or "last stage",
                "top_k": [{"class": e["class"], "probability": e["probability"]} for e in entries],
            }
        )
        shown = ", ".join(f"{e['class']} {e['probability']:.1%}" for e in entries)
        print(f"{path}: {shown} -> {out / name}")
    (out / "explain.json").write_text(json.dumps(records, indent=2) + "\n")
    return 0
