"""What every command's parser and handler share: the one-line user error, the stderr progress bar, and the flags
every command spells the same way (--checkpoint or --model/--weights, --config/--set/--resume, --device). A leaf
module: the root `resnetkit.cli` and each area's `cli.py` import it, it imports neither.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


class UserError(Exception):
    """An error caused by the user's input: printed as one line, without a traceback."""


class StderrProgress:
    """Rich progress bars on stderr (one per stage) when it is a terminal, so stdout stays clean for json/csv;
    nothing otherwise. `update(stage, done, total)` after each batch."""

    def __enter__(self) -> StderrProgress:
        self.bar, self.tasks = None, {}
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import Progress

            self.bar = Progress(console=Console(stderr=True), transient=True)
            self.bar.start()
        return self

    def update(self, stage: str, done: int, total: int) -> None:
        if self.bar is None:
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total)
        self.bar.update(self.tasks[stage], completed=done)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def add_model_source(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    """--checkpoint (a training checkpoint or an exported file), or --model NAME with --weights: what
    `load_model_source` turns into a bundle (`resnetkit.bundle.load_bundle`)."""
    source = p.add_mutually_exclusive_group(required=required)
    source.add_argument(
        "--checkpoint",
        help="a training checkpoint (.pt, any task) or an exported file (.onnx, .safetensors, TorchScript)",
    )
    source.add_argument("--model", help="a zoo model name (see `resnetkit models`), with --weights")
    p.add_argument("--weights", help="with --model: imagenet, imagenet-v2, or a weights file (state dict, checkpoint)")


def load_model_source(args: argparse.Namespace, **options: Any):
    """The bundle that --checkpoint or --model/--weights name; flags that do not go together are a UserError."""
    from resnetkit.bundle import load_bundle

    preset = getattr(args, "preset", None)
    if args.checkpoint:
        if args.weights or preset:
            raise UserError("--weights and --preset go with --model; a --checkpoint carries its own")
        return load_bundle(args.checkpoint, use_ema=getattr(args, "ema", False), **options)
    if not args.weights:
        raise UserError("--model needs --weights (imagenet, imagenet-v2, or a weights file)")
    try:
        return load_bundle(model=args.model, weights=args.weights, preset=preset, **options)
    except RuntimeError as e:  # offline pretrained weights: the message says where to put the file
        raise UserError(str(e)) from e


def add_config_arguments(p: argparse.ArgumentParser, *, resume: bool = True) -> None:
    """--config FILE (a YAML recipe), --set KEY=VALUE (repeatable), and --resume unless `resume=False` (commands that
    resume by themselves, or never)."""
    p.add_argument("--config", required=True, help="a YAML recipe, e.g. configs/demo.yaml (its task: see `task:`)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=0.05 --set train.epochs=3 (repeatable)",
    )
    if resume:
        p.add_argument("--resume", action="store_true", help="continue the run in the run folder from its last.pt")


def add_device(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument("--device", default=default, help=f"auto, cpu, cuda, cuda:1, ... (default {default})")


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
