"""k-fold cross-validation: `resnetkit train --config X --folds 5`, every fold a normal run of the one engine.

The training images are cut into K stratified, seeded folds (`resnetkit.data.splits.fold_parts`: per class, or by
iterative stratification for multi-label data). Fold k trains on the other K - 1 folds and validates on fold k, in
its own run folder with its split lists:

    <run>/fold-0/ ... <run>/fold-{K-1}/     config.yaml, best.pt, last.pt, metrics.jsonl, splits/{train,val}.txt
    <run>/folds.json                        each fold's final validation metrics, and their mean and std

`--resume` skips the folds already done, resumes the interrupted one from its last.pt (the engine's exact resume)
and starts the rest. `resnetkit eval --checkpoint <run>/fold-2/best.pt` evaluates a fold's model on its own held-out
images (its config names its lists).

    >>> from resnetkit.train.folds import train_folds
    >>> result = train_folds("configs/demo.yaml", folds=5)
    >>> result.summary["val_acc"]["mean"], result.summary["val_acc"]["std"]
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resnetkit.config import Config, ConfigError


@dataclass
class FoldsResult:
    run_dir: Path
    folds: list[dict[str, Any]] = field(default_factory=list)
    """Per finished fold: fold, run_dir, metrics (its final validation metrics and best_<metric>)."""
    summary: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per metric: mean, std (sample standard deviation over the folds), min, max."""
    interrupted: bool = False


def train_folds(
    config: Config | str | Path | dict,
    folds: int,
    *,
    resume: bool = False,
    quiet: bool = False,
    callbacks: Sequence[Any] = (),
) -> FoldsResult:
    """Train `folds` runs of `config`, fold k validating on the k-th of `folds` stratified, seeded parts of the
    training images; write <run>/folds.json after each fold and return every fold's metrics with their summary.
    callbacks: as `train`'s, for every fold (`run.run_dir` says which)."""
    from resnetkit.data.datasets import build_dataset
    from resnetkit.data.splits import dataset_options, fold_parts, write_lists
    from resnetkit.fileio import write_atomic
    from resnetkit.train.fit import as_config, train

    cfg = as_config(config)
    d = cfg.data
    if folds < 2:
        raise ConfigError(f"--folds: need at least 2 folds, got {folds}")
    if cfg.task != "classification" and cfg.task != "multilabel":
        raise ConfigError(f"--folds applies to classification, not to task {cfg.task!r}")
    if d.val_fraction is not None or d.splits is not None:
        raise ConfigError("--folds cuts the validation splits itself: unset data.val_fraction and data.splits")
    root = cfg.run_dir
    summary_path = root / "folds.json"
    if not resume and (summary_path.is_file() or (root / "fold-0").is_dir()):
        raise ValueError(f"{root} already holds k-fold runs: pass --resume to continue them, or --set name=NEW")
    main = int(os.environ.get("RANK", "0")) == 0
    done: dict[int, dict[str, Any]] = {}
    if resume and summary_path.is_file():
        before = json.loads(summary_path.read_text())
        if before.get("k") != folds:
            raise ValueError(f"--resume: {summary_path} holds {before.get('k')} folds, not --folds {folds}")
        done = {f["fold"]: f for f in before.get("folds", [])}

    whole = build_dataset(d.name, "train", **dataset_options(d, task=cfg.task, whole=True))
    if not hasattr(whole, "relative_paths"):
        raise ValueError(f"--folds splits image files (a folder of class folders, a CSV listing), not {d.name}")
    parts = fold_parts(whole, folds, cfg.seed)
    result = FoldsResult(root)
    info = {"dataset": d.name, "k": folds, "seed": cfg.seed}
    for k in range(folds):
        fold_cfg = _fold_config(cfg, k, root)
        fold_dir = fold_cfg.run_dir
        if k in done:
            result.folds.append(done[k])
            continue
        splits = Path(fold_cfg.data.splits)
        if main and not (splits / "split.json").is_file():
            train_items = [i for j, part in enumerate(parts) if j != k for i in part]
            write_lists(splits, whole, {"train": sorted(train_items), "val": parts[k]}, {**info, "fold": k})
        run = train(fold_cfg, resume=resume and (fold_dir / "last.pt").is_file(), quiet=quiet, callbacks=callbacks)
        if run.interrupted:
            result.interrupted = True
            break
        result.folds.append({"fold": k, "run_dir": str(fold_dir), "metrics": _final_metrics(fold_dir, run.metrics)})
        result.summary = summarise([f["metrics"] for f in result.folds])
        if main:
            state = {**info, "folds": result.folds, "summary": result.summary}
            write_atomic(summary_path, json.dumps(state, indent=2) + "\n")
    result.summary = summarise([f["metrics"] for f in result.folds])
    return result


def _fold_config(cfg: Config, k: int, root: Path) -> Config:
    """Fold k's config: run folder <run>/fold-k, its split lists in <run>/fold-k/splits (val: fold k)."""
    splits = (root / f"fold-{k}" / "splits").resolve()
    data = dataclasses.replace(cfg.data, splits=str(splits), train_split="train", val_split="val")
    return dataclasses.replace(cfg, name=f"fold-{k}", output_dir=str(root), data=data)


def _final_metrics(run_dir: Path, metrics: dict[str, Any]) -> dict[str, float]:
    """The last evaluated epoch's validation metrics (from metrics.jsonl, so a fold resumed after its end has them
    too) and the best value of the metric that chose best.pt."""
    from resnetkit.evaluation.report import read_metrics

    final: dict[str, float] = {}
    for row in read_metrics(run_dir / "metrics.jsonl"):
        values = {k: v for k, v in row.items() if k.startswith("val_") and isinstance(v, (int, float))}
        if values:
            final = values
    for key, value in metrics.items():
        if key.startswith("best_") and isinstance(value, (int, float)):
            final[key] = value
    return final


def summarise(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric present in every row: mean, std (sample, n - 1; 0 for one row), min and max."""
    if not rows:
        return {}
    keys = [k for k in rows[0] if all(k in r for r in rows)]
    out = {}
    for key in keys:
        values = [float(r[key]) for r in rows]
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
        out[key] = {"mean": mean, "std": math.sqrt(var), "min": min(values), "max": max(values)}
    return out


def format_table(result: FoldsResult) -> str:
    """The summary as aligned text: a row per metric, mean ± std, then each fold's value."""
    folds = result.folds
    header = ["metric", "mean", "std", *(f"fold {f['fold']}" for f in folds)]
    rows = [
        [key, f"{s['mean']:.4f}", f"{s['std']:.4f}", *(f"{f['metrics'][key]:.4f}" for f in folds)]
        for key, s in result.summary.items()
    ]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [header, *rows]
    ]
    return "\n".join(lines)
