"""`resnetkit compare`, `resnetkit tune` and `resnetkit lr-find`: thin shells over study/compare.py, tune.py and
lr_find.py.

    resnetkit compare --config configs/cifar10_resnet20.yaml --subset 10000 \\
        --vary optim=sgd,sgdm,nag,adagrad,adadelta,rmsprop,adam
    resnetkit tune --config configs/cifar10_resnet20.yaml --space space.yaml --trials 30 --subset 10000
    resnetkit lr-find --config configs/cifar10_resnet20.yaml
"""

from __future__ import annotations

import argparse

from resnetkit.cli_shared import UserError, add_config_arguments, positive
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

    p = sub.add_parser(
        "tune",
        help="hyperparameter search with Optuna (TPE, median pruning); processes anywhere share one study",
        description="Trials are runs of the recipe with values from SPACE.yaml (dotted keys to {low, high[, log, "
        "int, step]} or a list of choices). Start as many `tune` processes as you like, on one machine (the default "
        "SQLite storage) or many (--storage postgresql://... or mysql://...): they share the study and stop once it "
        "holds --trials trials. Writes best.yaml (a ready recipe), trials.md/.csv, history.png and importance.png "
        "into the study folder (default <output_dir>/<study>/).",
    )
    add_config_arguments(p, resume=False)
    p.add_argument("--space", required=True, metavar="SPACE.yaml", help="the search space")
    p.add_argument("--trials", type=positive, required=True, help="the study's total number of trials")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///<study folder>/study.db)")
    p.add_argument("--study", help="study name (default <name>-tune)")
    p.add_argument(
        "--startup-trials",
        type=positive,
        default=5,
        help="random trials before TPE models the results, and trials finished before pruning starts (default 5)",
    )
    p.add_argument("--no-base-trial", action="store_true", help="do not run the base recipe itself as trial 0")
    p.add_argument(
        "--heartbeat",
        type=positive,
        default=30,
        metavar="SECONDS",
        help="a running trial's heartbeat; one silent for four beats (its worker died) is run again (default 30)",
    )
    _add_subset(p)
    p.add_argument("--out", help="the study folder (default <output_dir>/<study>)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser(
        "lr-find",
        help="learning-rate range test: loss against an exponentially rising lr, a suggested lr",
        description="Trains from the recipe's initial weights with the lr rising exponentially from --start to "
        "--end over --steps optimizer steps, in a temporary run folder (the recipe's run folder and weights are not "
        "touched); stops when the loss diverges. Suggests the lr where the loss, smoothed over a decade of lr, stops "
        "falling. "
        "Writes lr_find.png and lr_find.json to --out (default <output_dir>/<name>-lr-find).",
    )
    add_config_arguments(p, resume=False)
    p.add_argument("--start", type=float, default=1e-7, help="first learning rate (default 1e-7)")
    p.add_argument("--end", type=float, default=10.0, help="last learning rate (default 10)")
    p.add_argument("--steps", type=positive, default=100, help="optimizer steps of the sweep (default 100)")
    p.add_argument("--out", help="output folder (default <output_dir>/<name>-lr-find)")
    p.set_defaults(func=cmd_lr_find)


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


def cmd_tune(args: argparse.Namespace) -> int:
    import optuna

    from resnetkit.study.tune import tune

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # each trial gets our own line
    result = tune(
        args.config,
        args.space,
        args.trials,
        overrides=_overrides(args),
        storage=args.storage,
        study_name=args.study,
        out=args.out,
        startup_trials=args.startup_trials,
        base_trial=not args.no_base_trial,
        heartbeat=args.heartbeat,
    )
    print(result.table.read_text(), end="")
    for note in result.notes:
        print(f"note: {note}")
    if result.best_config is not None:
        print(f"best {result.metric} {result.best_value:.4f}: {result.best_config}")
    written = [p for p in (result.table, result.history, result.importance) if p is not None]
    print(f"study {result.study_name} in {result.storage}; wrote {', '.join(map(str, written))}")
    if result.interrupted:
        print("interrupted: run the same command again to continue the study")
        return 130
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from resnetkit.study.lr_find import lr_find

    found = lr_find(
        args.config, overrides=args.overrides, start=args.start, end=args.end, steps=args.steps, out=args.out
    )
    if found.suggestion is None:
        raise UserError("lr-find: no finite loss was recorded")
    print(
        f"suggested lr {found.suggestion:.3g} (where the smoothed loss stops falling) after {len(found.lrs)} steps"
        f"{'' if found.diverged else '; no divergence before --end: raise it'}"
    )
    print(f"wrote {found.figure}, {found.json}")
    return 0
