"""`resnetkit predict` (every task), `serve`, `export`, `quantize` and `bench infer`: thin shells over
resnetkit.deploy (and the tasks' predict_files)."""

from __future__ import annotations

import argparse
import csv
import json
import sys

from resnetkit.cli_shared import StderrProgress, UserError, add_device, add_model_source, load_model_source, positive


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="predictions for images or folders of images: top-k classes, boxes, or masks (by the model's task)",
        description="Run a model (a checkpoint of any task, an exported file, or a zoo model with weights) on "
        "images. Classifiers print the top-k classes (multi-label ones also every label at or above its "
        "threshold); detectors and segmenters draw boxes or overlays into --out. "
        "Unreadable files are reported and skipped; the exit code is 1 if any was.",
    )
    add_model_source(p)
    p.add_argument(
        "inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and folders (searched recursively)"
    )
    p.add_argument("--top-k", type=positive, default=5, help="classifiers: classes per image (default 5)")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table", help="classifiers: stdout format")
    p.add_argument("--batch-size", type=positive, default=32, help="images per model call (default 32)")
    p.add_argument("--out", default="predictions", help="detectors, segmenters: output folder (default predictions)")
    p.add_argument("--score-thresh", type=float, default=0.5, help="detectors: draw boxes scoring at least this")
    p.add_argument("--alpha", type=float, default=0.5, help="segmenters: colour opacity of the overlay, 0..1")
    p.add_argument("--save-masks", action="store_true", help="segmenters: also write <name>_mask.png")
    add_device(p, default="cpu")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "serve",
        help="HTTP server with a web page: /v1/predict, /v1/explain, /metrics, /docs",
        description="Serve a classifier over HTTP (FastAPI on uvicorn): a checkpoint, an exported file, or a zoo model "
        "with weights. Open http://HOST:PORT/ for the web page and /docs for the API.",
    )
    add_model_source(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch")
    p.add_argument("--workers", type=int, default=1, help="server processes, each with its own model (default 1)")
    p.add_argument("--batch-size", type=positive, default=16, help="most images per model call (default 16)")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long a request waits for others to share its batch (default 5)",
    )
    p.add_argument("--max-request-mb", type=float, default=20.0, help="request body limit in MB (default 20)")
    p.add_argument("--max-pixels", type=int, default=None, help="per-image pixel limit (default 64,000,000)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: cores / workers)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "export",
        help="export a model to ONNX, TorchScript or safetensors, verified against eager",
        description="Export a model with a dynamic batch size and its preprocessing metadata (embedded "
        "and in PATH.json). The exported file is read back and its logits compared with the eager "
        "model's on a batch; a max abs difference above --tolerance fails the export.",
    )
    add_model_source(p)
    p.add_argument("--format", required=True, help="onnx, torchscript or safetensors")
    p.add_argument("--out", required=True, help="output file, e.g. model.onnx")
    p.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights")
    p.add_argument("--input-size", type=int, default=None, help="override the input size in the metadata")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit difference allowed (default 1e-4)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "quantize",
        help="int8 ONNX calibrated on your images, with its top-1 agreement with fp32 on others",
        description="Post-training static int8 quantisation (onnxruntime QDQ, per-channel weights): calibrate on "
        "--calib images from the folders, then report the int8-vs-fp32 top-1 agreement on up to --check other "
        "images and the speed of both. Writes OUT and OUT.json (metadata; serve it with `resnetkit serve "
        "--checkpoint OUT --backend onnxruntime`).",
    )
    add_model_source(p)
    p.add_argument("--images", nargs="+", required=True, metavar="FOLDER", help="image folders (searched recursively)")
    p.add_argument("--out", required=True, help="output file, e.g. model.int8.onnx")
    p.add_argument("--calib", type=int, default=512, help="calibration images (default 512)")
    p.add_argument("--check", type=int, default=1000, help="other images to measure the agreement on (default 1000)")
    p.add_argument("--method", default="minmax", choices=["minmax", "percentile", "entropy"], help="calibration")
    p.add_argument("--fp32-ends", action="store_true", help="keep the first convolution and the classifier in fp32")
    p.add_argument("--min-agreement", type=float, default=None, help="exit 1 if the agreement is below this (0-1)")
    p.add_argument("--ema", action="store_true", help="quantise the checkpoint's EMA weights")
    p.add_argument("--batch-size", type=positive, default=64, help="images per call (default 64)")
    p.set_defaults(func=cmd_quantize, input_size=None)

    p = sub.add_parser("bench", help="benchmarks: `bench infer` times CPU inference paths side by side")
    bench_sub = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    p = bench_sub.add_parser(
        "infer",
        help="images/s and latency of torchvision eager, resnetkit eager and optimised, "
        "onnxruntime and int8, with ratios and the fraction of the measured GEMM roofline",
    )
    p.add_argument("--model", default="resnet50", help="a registered model name, random weights (default resnet50)")
    p.add_argument("--batch-size", default="1,32", help="comma-separated batch sizes (default 1,32)")
    p.add_argument("--iters", type=int, default=5, help="at least this many timed calls per path and batch size")
    p.add_argument(
        "--min-seconds",
        type=float,
        default=10.0,
        help="more timed rounds for fast (small) batches, up to about this many seconds per batch size (0: --iters)",
    )
    p.add_argument("--input-size", type=int, default=None, help="default: the model's")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads for torch and onnxruntime (default: torch's, i.e. the cores)",
    )
    p.add_argument(
        "--backends",
        default=None,
        help="comma-separated, from: torchvision eager, resnetkit eager, resnetkit optimised, resnetkit compiled, "
        "resnetkit onnxruntime, onnxruntime default, int8 (default: all but resnetkit compiled, which torch.compiles "
        "for minutes per batch size)",
    )
    p.add_argument(
        "--gemm-size", type=int, default=4096, help="side of the square fp32 matmul timed as the roofline (4096)"
    )
    p.add_argument("--markdown", action="store_true", help="also print the table as Markdown (for BENCHMARKS.md)")
    p.set_defaults(func=cmd_bench_infer)


def cmd_predict(args: argparse.Namespace) -> int:
    from resnetkit.data.image import list_images

    bundle = load_model_source(args, device=args.device)
    files = list_images(args.inputs)
    if not files:
        raise UserError(f"no image files found in {', '.join(args.inputs)}")
    with StderrProgress() as bar:
        if bundle.task == "classification":
            from resnetkit.deploy.predict import Predictor, predict_files

            records = predict_files(
                Predictor(bundle), files, batch_size=args.batch_size, top_k=args.top_k, progress=bar.update
            )
        elif bundle.task == "detection":
            from resnetkit.tasks.detection import predict_files

            records = predict_files(
                bundle, files, args.out, score_thresh=args.score_thresh, batch_size=args.batch_size, progress=bar.update
            )
        else:
            from resnetkit.tasks.segmentation import predict_files

            records = predict_files(
                bundle, files, args.out, alpha=args.alpha, save_masks=args.save_masks, progress=bar.update
            )
    for record in records:
        if "error" in record:
            print(f"resnetkit predict: skipped {record['error']}", file=sys.stderr)
    if bundle.task == "classification":
        _print_results(records, args.format)
    else:
        for r in records:
            if "output" in r:
                found = f"{len(r['detections'])} boxes" if "detections" in r else "overlay"
                print(f"{r['image']}: {found} -> {r['output']}")
        print(f"wrote {sum('output' in r for r in records)} image(s) to {args.out}")
    return 1 if any("error" in r for r in records) else 0


def _print_results(results: list[dict], fmt: str) -> None:
    if fmt == "json":
        json.dump(results, sys.stdout, indent=2)
        print()
    elif fmt == "csv" and any("labels" in r for r in results):  # multi-label: one row per label predicted
        writer = csv.writer(sys.stdout)
        writer.writerow(["file", "label", "index", "prob", "threshold", "error"])
        for r in results:
            if "error" in r:
                writer.writerow([r["file"], "", "", "", "", r["error"]])
            elif not r["labels"]:
                writer.writerow([r["file"], "", "", "", "", ""])
            for p in r.get("labels", []):
                writer.writerow([r["file"], p["class"], p["index"], f"{p['prob']:.6f}", f"{p['threshold']:.6f}", ""])
    elif fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(["file", "rank", "class", "index", "prob", "error"])
        for r in results:
            if "error" in r:
                writer.writerow([r["file"], "", "", "", "", r["error"]])
            for rank, p in enumerate(r.get("top_k", []), 1):
                writer.writerow([r["file"], rank, p["class"], p["index"], f"{p['prob']:.6f}", ""])
    else:
        from rich.console import Console
        from rich.table import Table

        multilabel = any("labels" in r for r in results)
        table = Table(show_lines=True)
        for col in ("file", "labels", "class", "prob") if multilabel else ("file", "class", "prob"):
            table.add_column(col, justify="right" if col == "prob" else "left", overflow="fold")
        for r in results:
            if "error" in r:
                table.add_row(r["file"], f"[red]{r['error']}[/red]", *[""] * (1 + multilabel))
            else:
                labels = ["\n".join(f"{p['class']} {p['prob']:.3f}" for p in r["labels"]) or "-"] if multilabel else []
                table.add_row(
                    r["file"],
                    *labels,
                    "\n".join(p["class"] for p in r["top_k"]),
                    "\n".join(f"{p['prob']:.3f}" for p in r["top_k"]),
                )
        Console().print(table)


def cmd_serve(args: argparse.Namespace) -> int:
    from resnetkit.deploy.serve import ServeConfig, serve

    if args.workers < 1:
        raise UserError("--workers must be at least 1")
    if args.model and not args.weights:
        raise UserError("--model needs --weights (imagenet, imagenet-v2, or a weights file)")
    config = ServeConfig(
        checkpoint=args.checkpoint,
        model=args.model,
        weights=args.weights,
        backend=args.backend,
        max_batch=args.batch_size,
        max_wait_ms=args.max_wait_ms,
        max_request_bytes=int(args.max_request_mb * 1024 * 1024),
        threads=args.threads,
        **({"max_pixels": args.max_pixels} if args.max_pixels else {}),
    )
    serve(config, host=args.host, port=args.port, workers=args.workers, log_level=args.log_level)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from resnetkit.deploy.export import FORMATS, export_model

    if args.format not in FORMATS:
        raise UserError(f"--format {args.format!r} is not one of {', '.join(FORMATS)}")
    bundle = load_model_source(args)
    preprocess = bundle.preprocess
    if args.input_size:  # keep the resize/crop ratio (256/224 for ImageNet) at the new size
        ratio = preprocess.get("resize", preprocess["input_size"]) / preprocess["input_size"]
        preprocess = {**preprocess, "input_size": args.input_size, "resize": round(args.input_size * ratio)}
    report = export_model(
        bundle.module,
        args.out,
        args.format,
        preprocess,
        bundle.classes,
        model_name=bundle.name,
        model_kwargs=bundle.model_kwargs,
        temperature=bundle.temperature,
        tolerance=args.tolerance,
        multilabel=bundle.multilabel,
        thresholds=bundle.thresholds,
    )
    print(report.summary())
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from resnetkit.data.image import list_images
    from resnetkit.deploy.quantize import quantize_from_images

    if args.min_agreement is not None and not 0 <= args.min_agreement <= 1:
        raise UserError(f"--min-agreement is a fraction between 0 and 1, got {args.min_agreement}")
    files = list_images(args.images)
    if not files:
        raise UserError(f"no images found under {', '.join(args.images)}")
    bundle = load_model_source(args)
    with StderrProgress() as bar:
        report = quantize_from_images(
            bundle.module,
            bundle.preprocess,
            bundle.classes,
            files,
            args.out,
            calib=args.calib,
            check=args.check,
            method=args.method,
            fp32_ends=args.fp32_ends,
            batch_size=args.batch_size,
            model_name=bundle.name,
            model_kwargs=bundle.model_kwargs,
            temperature=bundle.temperature,
            progress=bar.update,
            multilabel=bundle.multilabel,
            thresholds=bundle.thresholds,
        )
    print(report.summary())
    if args.min_agreement is not None and report.agreement < args.min_agreement:
        print(f"agreement {report.agreement:.4f} is below --min-agreement {args.min_agreement}", file=sys.stderr)
        return 1
    return 0


def _parse_batches(text: str) -> tuple[int, ...]:
    try:
        batches = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise UserError(f"--batch-size wants comma-separated integers like 1,32; got {text!r}") from None
    if not batches or min(batches) < 1:
        raise UserError(f"--batch-size wants positive batch sizes; got {text!r}")
    return batches


def cmd_bench_infer(args: argparse.Namespace) -> int:
    from resnetkit.deploy.bench import DEFAULT_BACKENDS, bench_infer, format_markdown, print_table
    from resnetkit.registry import accepted_kwargs

    accepted_kwargs(args.model)  # an unknown name raises, with the closest valid names
    backends = DEFAULT_BACKENDS if args.backends is None else tuple(b.strip() for b in args.backends.split(","))
    result = bench_infer(
        args.model,
        _parse_batches(args.batch_size),
        args.iters,
        args.input_size,
        args.threads,
        backends,
        progress=lambda message: print(message, flush=True),
        gemm_size=args.gemm_size,
        min_seconds=args.min_seconds,
    )
    print_table(result)
    if args.markdown:
        print(format_markdown(result))
    return 0
