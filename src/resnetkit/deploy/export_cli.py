"""`resnetkit export`, `resnetkit quantize` and `resnetkit bench infer`."""

from __future__ import annotations

import argparse
import sys

from resnetkit.cli import StderrProgress, UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a model to ONNX, TorchScript or safetensors, verified against eager",
        description="Export a model with a dynamic batch size and its preprocessing metadata (embedded "
        "and in PATH.json). The exported file is read back and its logits compared with the eager "
        "model's on a batch; a max abs difference above --tolerance fails the export.",
    )
    _add_source(p)
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
    _add_source(p)
    p.add_argument("--images", nargs="+", required=True, metavar="FOLDER", help="image folders (searched recursively)")
    p.add_argument("--out", required=True, help="output file, e.g. model.int8.onnx")
    p.add_argument("--calib", type=int, default=512, help="calibration images (default 512)")
    p.add_argument("--check", type=int, default=1000, help="other images to measure the agreement on (default 1000)")
    p.add_argument("--method", default="minmax", choices=["minmax", "percentile", "entropy"], help="calibration")
    p.add_argument("--fp32-ends", action="store_true", help="keep the first convolution and the classifier in fp32")
    p.add_argument("--min-agreement", type=float, default=None, help="exit 1 if the agreement is below this (0-1)")
    p.add_argument("--ema", action="store_true", help="quantise the checkpoint's EMA weights")
    p.add_argument("--batch-size", type=int, default=64, help="images per call (default 64)")
    p.set_defaults(func=cmd_quantize, input_size=None)

    p = sub.add_parser("bench", help="benchmarks: `bench infer` times CPU inference paths side by side")
    bench_sub = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    p = bench_sub.add_parser(
        "infer",
        help="images/s and latency of torchvision eager, resnetkit eager and optimised, "
        "onnxruntime and int8, with ratios and the fraction of the measured GEMM roofline",
    )
    p.add_argument("--model", default="resnet50", help="a registered model name (default resnet50)")
    p.add_argument("--batch", default="1,32", help="comma-separated batch sizes (default 1,32)")
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


def _add_source(p: argparse.ArgumentParser) -> None:
    """--checkpoint, or --model with --weights: what `_load_source` reads."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a resnetkit training checkpoint (model, classes, preprocessing)")
    source.add_argument("--model", help="a registered model name; weights from --weights")
    p.add_argument("--weights", help="with --model: 'imagenet', 'imagenet-v2', or a weights file")


def _load_source(args: argparse.Namespace):
    """(model, preprocess, classes, model_name, model_kwargs) from --checkpoint or --model/--weights."""
    from resnetkit.checkpoint import model_from_checkpoint
    from resnetkit.deploy.predict import Predictor, imagenet_preprocess
    from resnetkit.models import default_input_size

    if args.checkpoint:
        if args.weights:
            raise UserError("--weights goes with --model; a --checkpoint carries its own weights")
        model, ckpt = model_from_checkpoint(args.checkpoint, use_ema=args.ema)
        preprocess = ckpt.get("preprocess") or imagenet_preprocess(default_input_size(ckpt["model_name"]))
        return model, preprocess, ckpt.get("classes"), ckpt["model_name"], ckpt.get("model_kwargs") or {}
    if not args.weights:
        raise UserError("--model needs --weights (imagenet, imagenet-v2 or a weights file)")
    predictor = Predictor.from_weights(args.model, args.weights)
    num_classes = predictor.model.get_classifier().out_features
    return predictor.model, predictor.preprocess, predictor.classes, args.model, {"num_classes": num_classes}


def cmd_export(args: argparse.Namespace) -> int:
    from resnetkit.deploy.export import FORMATS, export_model

    if args.format not in FORMATS:
        raise UserError(f"--format {args.format!r} is not one of {', '.join(FORMATS)}")
    model, preprocess, classes, name, kwargs = _load_source(args)
    if args.input_size:  # keep the resize/crop ratio (256/224 for ImageNet) at the new size
        ratio = preprocess.get("resize", preprocess["input_size"]) / preprocess["input_size"]
        preprocess = {**preprocess, "input_size": args.input_size, "resize": round(args.input_size * ratio)}
    report = export_model(
        model,
        args.out,
        args.format,
        preprocess,
        classes,
        model_name=name,
        model_kwargs=kwargs,
        tolerance=args.tolerance,
    )
    print(report.summary())
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from resnetkit.deploy.predict import list_images
    from resnetkit.deploy.quantize import quantize_from_images

    if args.min_agreement is not None and not 0 <= args.min_agreement <= 1:
        raise UserError(f"--min-agreement is a fraction between 0 and 1, got {args.min_agreement}")
    files = list_images(args.images)
    if not files:
        raise UserError(f"no images found under {', '.join(args.images)}")
    model, preprocess, classes, name, kwargs = _load_source(args)
    with StderrProgress() as bar:
        report = quantize_from_images(
            model,
            preprocess,
            classes,
            files,
            args.out,
            calib=args.calib,
            check=args.check,
            method=args.method,
            fp32_ends=args.fp32_ends,
            batch_size=args.batch_size,
            model_name=name,
            model_kwargs=kwargs,
            progress=bar.update,
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
        raise UserError(f"--batch wants comma-separated integers like 1,32; got {text!r}") from None
    if not batches or min(batches) < 1:
        raise UserError(f"--batch wants positive batch sizes; got {text!r}")
    return batches


def cmd_bench_infer(args: argparse.Namespace) -> int:
    from resnetkit.deploy.bench import DEFAULT_BACKENDS, bench_infer, format_markdown, print_table
    from resnetkit.registry import accepted_kwargs

    accepted_kwargs(args.model)  # an unknown name raises, with the closest valid names
    backends = DEFAULT_BACKENDS if args.backends is None else tuple(b.strip() for b in args.backends.split(","))
    result = bench_infer(
        args.model,
        _parse_batches(args.batch),
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
