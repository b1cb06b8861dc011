"""The `resnetkit` command line: one subcommand per verb, each a thin shell over a library function.

Each area registers its commands through `register(subparsers)` in its own `cli.py`, listed in COMMAND_MODULES.
Those modules import no torch at module level, and handlers import the heavy parts only when they run, so
`resnetkit --help` and `resnetkit COMMAND --help` stay fast. The same idea has the same flag everywhere, built by
the helpers of `resnetkit.cli_shared`: --checkpoint (or --model/--weights), --config/--set/--resume, --batch-size,
--out, --device.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from resnetkit.cli_shared import UserError

COMMAND_MODULES = [
    "resnetkit.models.cli",  # models, summary
    "resnetkit.data.cli",  # data stats|info
    "resnetkit.train.cli",  # train (every task)
    "resnetkit.study.cli",  # compare, tune, lr-find
    "resnetkit.evaluation.cli",  # eval (every task), calibrate, report, explain
    "resnetkit.deploy.cli",  # predict (every task), serve, export, quantize, bench infer
]


def build_parser() -> argparse.ArgumentParser:
    from resnetkit._version import __version__

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
