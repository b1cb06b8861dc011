"""`resnetkit train --config configs/NAME.yaml [--set key=value ...] [--resume]`, also under torchrun:

torchrun --nproc_per_node 2 -m resnetkit train --config configs/demo.yaml --set train.epochs=2
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a YAML recipe (from scratch or fine-tuning), resumable",
        description="Train as a YAML recipe says; outputs go to <output_dir>/<name>/ (default "
        "runs/<config file name>/). Under torchrun, each process trains a shard (DDP).",
    )
    p.add_argument("--config", required=True, help="a YAML recipe, e.g. configs/demo.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=0.05 --set train.epochs=3 (repeatable)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in the run folder from its last.pt")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from resnetkit.config import load_config
    from resnetkit.train.loop import NonFiniteLoss

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from resnetkit.cli import UserError
    from resnetkit.train.fit import train

    try:
        result = train(cfg, resume=args.resume)
    except NonFiniteLoss as e:
        raise UserError(f"{e}; the last good checkpoint is kept in {cfg.run_dir}") from None
    return 130 if result.interrupted else 0
