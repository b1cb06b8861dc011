"""`resnetkit train --config FILE [--set key=value ...] [--resume] [--budget 10m] [--folds K]`: every task
(classification, detection, segmentation: the recipe's `task:`), also under torchrun:

    torchrun --nproc_per_node 2 --max-restarts 1 -m resnetkit train --config configs/demo.yaml --set train.epochs=2
    resnetkit train --config configs/demo.yaml --folds 5       # k-fold cross-validation (resnetkit.train.folds)
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
    p.add_argument(
        "--folds",
        type=int,
        metavar="K",
        help="k-fold cross-validation: K stratified, seeded folds of the training images, one run folder each "
        "(<run>/fold-0 ...), and <run>/folds.json with the mean and std of every validation metric; --resume "
        "skips finished folds and resumes the interrupted one",
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
        if args.folds is not None:
            from resnetkit.train.folds import format_table, train_folds

            folds = train_folds(cfg, args.folds, resume=args.resume)
            if folds.summary:
                print(f"{len(folds.folds)} of {args.folds} folds in {folds.run_dir}/ (folds.json):")
                print(format_table(folds))
            return 130 if folds.interrupted else 0
        result = train(cfg, resume=args.resume)
    except NonFiniteLoss as e:
        raise UserError(f"{e}; the last good checkpoint is kept in {cfg.run_dir}") from None
    return 130 if result.interrupted else 0
