"""The `resnetkit` command line: one subcommand per verb, each a thin shell over the library.

Each area registers its own subcommands through a `register(subparsers)` function in its `cli` module, listed in
COMMAND_MODULES; handlers import the heavy parts only when they run, so `resnetkit --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "resnetkit.models.cli",  # models, summary
    "resnetkit.data.cli",  # data stats|info
    "resnetkit.train.cli",  # train
    "resnetkit.eval_cli",  # eval, report, explain
    "resnetkit.deploy.serve_cli",  # predict, serve
    "resnetkit.deploy.export_cli",  # export, quantize, bench infer
    "resnetkit.tasks.detection_cli",  # detect train|eval|predict
    "resnetkit.tasks.segmentation_cli",  # segment train|eval|predict
]


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


def build_parser() -> argparse.ArgumentParser:
    from resnetkit import __version__

    parser = argparse.ArgumentParser(
        prog="resnetkit",
        description="Build, train, evaluate, explain, export and serve ResNets, and use them as backbones.",
    )
    parser.add_argument("--version", action="version", version=f"resnetkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, FileNotFoundError, ValueError) as e:
        # Errors resnetkit raises on bad input carry a message naming the file, key or field: show just that.
        print(f"resnetkit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
