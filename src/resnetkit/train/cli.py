"""`resnetkit train --config FILE [--set key=value ...] [--resume] [--budget 10m]`: every task (classification,
detection, segmentation: the recipe's `task:`), also under torchrun:

    torchrun --nproc_per_node 2 --max-restarts 1 -m resnetkit train --config configs/demo.yaml --set train.epochs=2
"""

from __future__ import annotations

import argparse

from resnetkit.cli_shared import add_config_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a YAML recipe (classification, detection or segmentation), resumable",
        description="Train as a YAML recipe says; outputs go to <output_dir>/<name>/ (default "
        "runs/<config file name>/). Under torchrun, each process trains a shard (DDP); a group that torchrun "
        "restarts (--max-restarts) resumes from last.pt by itself.",
    )
    add_config_arguments(p)
    p.add_argument(
        "--budget",
        metavar="DURATION",
        help="a wall-time budget for the whole run (train.budget): seconds, or 30s, 10m, 2h; the engine plans the "
        "steps that fit and lays the schedule over them",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from resnetkit.config import load_config

    overrides = [*args.overrides, *([f"train.budget={args.budget}"] if args.budget else [])]
    cfg = load_config(args.config, overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from resnetkit.cli_shared import UserError
    from resnetkit.train.fit import train
    from resnetkit.train.loop import NonFiniteLoss

    try:
        result = train(cfg, resume=args.resume)
    except NonFiniteLoss as e:
        raise UserError(f"{e}; the last good checkpoint is kept in {cfg.run_dir}") from None
    return 130 if result.interrupted else 0
