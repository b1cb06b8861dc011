"""`resnetkit predict` and `resnetkit serve`."""

from __future__ import annotations

import argparse
import csv
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="top-k classes of images or folders of images",
        description="Classify images with a checkpoint (its own classes and preprocessing) or a zoo "
        "model with weights. Unreadable files are reported and skipped; the exit code is 1 if any was.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a resnetkit training checkpoint (.pt)")
    source.add_argument("--model", help="a zoo model name, with --weights")
    p.add_argument("--weights", help="with --model: imagenet, imagenet-v2, or a weights file")
    p.add_argument(
        "inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and folders (searched recursively)"
    )
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table", help="output on stdout")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "serve",
        help="HTTP server with a web page: /v1/predict, /v1/explain, /metrics, /docs",
        description="Serve a checkpoint over HTTP (FastAPI on uvicorn). Open http://HOST:PORT/ for the "
        "web page and /docs for the API.",
    )
    p.add_argument("--checkpoint", required=True, help="a resnetkit training checkpoint (.pt)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch")
    p.add_argument("--workers", type=int, default=1, help="server processes, each with its own model (default 1)")
    p.add_argument("--max-batch", type=int, default=16, help="images per model call (default 16)")
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


def cmd_predict(args: argparse.Namespace) -> int:
    from resnetkit.cli import StderrProgress, UserError
    from resnetkit.deploy.predict import ImageError, Predictor, list_images, open_image

    if args.model and not args.weights:
        raise UserError("--model needs --weights (imagenet, imagenet-v2, or a weights file)")
    if args.weights and not args.model:
        raise UserError("--weights goes with --model; a checkpoint is given with --checkpoint")
    if args.top_k < 1 or args.batch_size < 1:
        raise UserError("--top-k and --batch-size must be at least 1")
    files = list_images(args.inputs)
    if not files:
        raise UserError(f"no image files found in {', '.join(args.inputs)}")
    if args.checkpoint:
        predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device)
    else:
        try:
            predictor = Predictor.from_weights(args.model, args.weights, device=args.device)
        except RuntimeError as e:
            if args.weights not in ("imagenet", "imagenet-v2"):
                raise
            raise UserError(str(e)) from e  # offline: the message says where to put the file

    results: list[dict] = []
    with StderrProgress() as bar:
        for start in range(0, len(files), args.batch_size):
            chunk, images = [], []
            for path in files[start : start + args.batch_size]:
                try:
                    images.append(open_image(path))
                    chunk.append(path)
                except ImageError as e:
                    print(f"resnetkit predict: skipped {e}", file=sys.stderr)
                    results.append({"file": str(path), "error": str(e)})
            if images:
                probs = predictor.probabilities(predictor.to_tensor(images))
                for path, top in zip(chunk, predictor.top_indices(probs, args.top_k)):
                    results.append(
                        {
                            "file": str(path),
                            "top_k": [{"class": predictor.classes[i], "index": i, "prob": round(p, 6)} for i, p in top],
                        }
                    )
            bar.update("predicting", min(start + args.batch_size, len(files)), len(files))
    order = {str(f): i for i, f in enumerate(files)}
    results.sort(key=lambda r: order[r["file"]])
    _print_results(results, args.format)
    return 1 if any("error" in r for r in results) else 0


def _print_results(results: list[dict], fmt: str) -> None:
    if fmt == "json":
        json.dump(results, sys.stdout, indent=2)
        print()
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

        table = Table(show_lines=True)
        for col in ("file", "class", "prob"):
            table.add_column(col, justify="right" if col == "prob" else "left", overflow="fold")
        for r in results:
            if "error" in r:
                table.add_row(r["file"], f"[red]{r['error']}[/red]", "")
            else:
                table.add_row(
                    r["file"],
                    "\n".join(p["class"] for p in r["top_k"]),
                    "\n".join(f"{p['prob']:.3f}" for p in r["top_k"]),
                )
        Console().print(table)


def cmd_serve(args: argparse.Namespace) -> int:
    from resnetkit.deploy.serve import ServeConfig, serve

    if args.workers < 1:
        from resnetkit.cli import UserError

        raise UserError("--workers must be at least 1")
    config = ServeConfig(
        checkpoint=args.checkpoint,
        backend=args.backend,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_request_bytes=int(args.max_request_mb * 1024 * 1024),
        threads=args.threads,
        **({"max_pixels": args.max_pixels} if args.max_pixels else {}),
    )
    serve(config, host=args.host, port=args.port, workers=args.workers, log_level=args.log_level)
    return 0
