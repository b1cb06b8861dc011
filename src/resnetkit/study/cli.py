"""`resnetkit compare`: a thin shell over study/compare.py.

    resnetkit compare --config configs/cifar10_resnet20.yaml --subset 10000 \\
        --vary optim=sgd,sgdm,nag,adagrad,adadelta,rmsprop,adam
"""

from __future__ import annotations

import argparse

from resnetkit.cli_shared import add_config_arguments, positive
from resnetkit.study.recipe import OPTIM_PRESETS


def _add_subset(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--subset",
        type=positive,
        metavar="N",
        help="train on a stratified, seeded subset of N training images (data.subset), the same for every run",
    )


def _overrides(args: argparse.Namespace) -> list[str]:
    return [*args.overrides, *([f"data.subset={args.subset}"] if getattr(args, "subset", None) else [])]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="train every combination of the varied keys from one seed and data order; one table, figure and page",
        description="Each combination is a normal run folder inside the comparison folder (default "
        "<output_dir>/<name>-compare/), which also gets comparison.md/.csv (best and final validation metric and "
        "loss, epochs, wall time, images/s), comparison.png (every run's training and validation curves side by "
        "side) and comparison.html (both, self-contained). Runs already there are reused (finished) or resumed "
        "(interrupted), so a stopped comparison restarts where it was.",
    )
    add_config_arguments(p, resume=False)
    p.add_argument(
        "--vary",
        action="append",
        required=True,
        metavar="KEY=V1,V2,...",
        help="values of one key, as YAML (repeat for the cross product): optim.lr=0.1,0.01; a section takes whole "
        "option groups or optimiser presets: optim=sgdm,nag,{name: adam, lr: 0.001}; presets: "
        f"{', '.join(OPTIM_PRESETS)}",
    )
    _add_subset(p)
    p.add_argument("--out", help="the comparison folder (default <output_dir>/<name>-compare)")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from resnetkit.study.compare import compare, parse_vary

    vary = [parse_vary(text) for text in args.vary]
    result = compare(args.config, vary, overrides=_overrides(args), out=args.out)
    print(result.table.read_text(), end="")
    print(f"comparison: {result.table}, {result.figure}, {result.html}")
    for run in result.runs:
        if run.status.startswith("diverged"):
            print(f"{run.label} {run.status}")
    if result.interrupted:
        print("interrupted: run the same command again to continue")
        return 130
    return 0
