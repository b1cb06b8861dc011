"""The source's optimiser study (its CUB-200 reproduction), redone on CIFAR-10 with `resnetkit compare` and
`resnetkit tune`, in one run:

    python benchmarks/optimizer_study.py [--data ../shared/data/cifar10-jpg] [--subset 10000] [--epochs 10] \\
        [--trials 20] [--tune-workers 1] [--full-epochs 10] [--out runs/optimizer-study]

(a) compare: the source's seven optimisers (plain SGD, SGD with momentum, Nesterov, AdaGrad, AdaDelta, RMSProp,
    Adam) on a stratified, seeded --subset of the training split, the same --epochs for all, from the same initial
    weights and data order; each at its preset's learning rate (resnetkit.study.recipe.OPTIM_PRESET_SOURCES says
    where each comes from, and it is printed). The rest of the recipe is configs/cifar10_fast.yaml's (ResNet-20,
    cached pipeline, batch 256, label smoothing 0.1, flip TTA), with a cosine schedule instead of its one-cycle,
    so that every optimiser gets the same, neutral decay. Prints the table; the figure and page are written.
(b) tune: an Optuna study on the same subset and epochs over SGD's learning rate, momentum, Nesterov, weight decay,
    label smoothing, a momentum warm-up and the schedule (--space to search another), --trials trials shared by
    --tune-workers processes (one SQLite study).
(c) the best recipe of (b) trained on the whole training split (or --full-subset images) for --full-epochs, against
    configs/cifar10_fast.yaml for the same epochs, both evaluated on the test split; prints them side by side
    (test accuracy with flip TTA, epochs, wall time).

Every step is resumable: run the same command again after a stop and finished runs and trials are reused.
Scale it down with --subset, --epochs, --trials, --full-subset, --full-epochs and a --data folder with fewer test
images (the test split is every run's validation).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

SPACE = {
    "optim.lr": {"low": 0.02, "high": 1.0, "log": True},
    "optim.momentum": {"low": 0.8, "high": 0.95},
    "optim.nesterov": [True, False],
    "optim.weight_decay": {"low": 1.0e-5, "high": 1.0e-3, "log": True},
    "train.label_smoothing": {"low": 0.0, "high": 0.2},
    "optim.momentum_warmup": [None, {"start": 0.5, "steps": 200}],
    "schedule": [{"name": "cosine"}, {"name": "onecycle"}, {"name": "plateau", "patience": 1, "gamma": 0.3}],
}


def fast_recipe(data: str, out: Path, name: str, *extra: str):
    from resnetkit.config import load_config

    where = [f"data.name={data}", f"output_dir={out}", f"name={name}"]
    return load_config(ROOT / "configs/cifar10_fast.yaml", [*where, *extra])


def train_and_time(cfg) -> dict:
    """Train (or resume, or reuse a finished run), then its final and best test accuracy, epochs and wall time."""
    from resnetkit.evaluation.report import read_metrics
    from resnetkit.train.fit import train

    started = time.perf_counter()
    train(cfg, resume=(cfg.run_dir / "last.pt").is_file(), quiet=True)
    wall = time.perf_counter() - started
    rows = read_metrics(cfg.run_dir / "metrics.jsonl")
    return {
        "final": rows[-1]["val_acc"],
        "best": max(r["val_acc"] for r in rows),
        "epochs": len(rows),
        "train_s": sum(r["epoch_time_s"] for r in rows),
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpg"))
    ap.add_argument("--subset", type=int, default=10000, help="training images of the study (a, b)")
    ap.add_argument("--epochs", type=int, default=10, help="epochs of every run of (a) and (b)")
    ap.add_argument("--trials", type=int, default=20, help="trials of (b)")
    ap.add_argument("--tune-workers", type=int, default=1, help="tune processes sharing the study")
    ap.add_argument("--space", help="SPACE.yaml for (b) (default: the SGD space above)")
    ap.add_argument("--full-epochs", type=int, default=10, help="epochs of (c), for both recipes")
    ap.add_argument("--full-subset", type=int, help="(c) on this many training images instead of all")
    ap.add_argument("--out", default=str(ROOT / "runs/optimizer-study"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE for every recipe")
    args = ap.parse_args()

    import optuna

    from resnetkit.config import load_config, save_config
    from resnetkit.evaluation.report import environment, table_md
    from resnetkit.study.compare import compare
    from resnetkit.study.recipe import OPTIM_PRESET_SOURCES, OPTIM_PRESETS, SOURCE_OPTIMIZERS
    from resnetkit.study.tune import tune

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the tables say what the trials did
    out = Path(args.out).resolve()
    env = environment()
    print(f"machine: {env['cpu']}, gpu {env['gpu']}, torch {env['torch']}, {env['cpu threads']} threads")
    study = [f"data.subset={args.subset}", f"train.epochs={args.epochs}", "schedule.name=cosine", *args.overrides]
    base = fast_recipe(args.data, out, "optimizers", *study)

    # (a) the seven optimisers
    print(f"\n(a) compare: {len(SOURCE_OPTIMIZERS)} optimisers, {args.subset} images, {args.epochs} epochs")
    lrs = [(name, OPTIM_PRESETS[name]["lr"], OPTIM_PRESET_SOURCES[name]) for name in SOURCE_OPTIMIZERS]
    print(table_md(lrs, ("preset", "lr", "where the lr comes from")))
    started = time.perf_counter()
    compared = compare(base, {"optim": list(SOURCE_OPTIMIZERS)}, quiet=True)
    print(f"\n{compared.table.read_text()}")
    print(f"figure {compared.figure}, page {compared.html} ({time.perf_counter() - started:.0f} s)")

    # (b) the search, on the same subset and epochs
    space = args.space or out / "space.yaml"
    if not args.space:
        out.mkdir(parents=True, exist_ok=True)
        Path(space).write_text(yaml.safe_dump(SPACE, sort_keys=False))
    tune_base = fast_recipe(args.data, out, "sgd", *study)
    print(f"\n(b) tune: {args.trials} trials over {space}, {args.tune_workers} process(es)")
    started = time.perf_counter()
    helpers = []
    if args.tune_workers > 1:
        recipe_path = save_config(tune_base, out / "tune-base.yaml")
        cmd = [sys.executable, "-m", "resnetkit", "tune", "--config", str(recipe_path), "--space", str(space)]
        cmd += ["--trials", str(args.trials)]
        helpers = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL) for _ in range(args.tune_workers - 1)]
    tuned = tune(tune_base, space, args.trials, quiet=True)
    for helper in helpers:
        helper.wait()
    if helpers:  # the last one to finish has every trial in its report: rewrite it here
        tuned = tune(tune_base, space, args.trials, quiet=True)
    print(tuned.table.read_text())
    print(f"best val_acc {tuned.best_value:.4f}: {tuned.best_config} ({time.perf_counter() - started:.0f} s)")

    # (c) the best recipe on the full training split, against configs/cifar10_fast.yaml
    full = [f"train.epochs={args.full_epochs}", f"data.subset={args.full_subset or 'null'}", f"output_dir={out}"]
    full += args.overrides
    tag = f"{args.full_subset or 'all'}x{args.full_epochs}"  # a run is reused only for the same images and epochs
    best = load_config(tuned.best_config, [*full, f"name=best-full-{tag}"])
    fast = fast_recipe(args.data, out, f"fast-full-{tag}", *full)
    what = f"{args.full_subset or 'all'} training images, {args.full_epochs} epochs, test split"
    print(f"\n(c) the best recipe of (b) against configs/cifar10_fast.yaml: {what}")
    rows = []
    for label, cfg in (("tune's best recipe", best), ("configs/cifar10_fast.yaml", fast)):
        r = train_and_time(cfg)
        rows.append(
            [label, f"{r['final']:.2%}", f"{r['best']:.2%}", r["epochs"], f"{r['train_s']:.0f}", f"{r['wall_s']:.0f}"]
        )
    header = ("recipe", "test acc (final, flip TTA)", "best epoch's", "epochs", "train wall s", "wall s")
    print(table_md(rows, header))


if __name__ == "__main__":
    main()
