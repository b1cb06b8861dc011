"""Stratified, seeded splits of one collection of images: validation (and test) fractions, k folds, subsets.

A folder of class folders (or a CSV without a split column) has no train/val split of its own. `data.val_fraction`
(and `data.test_fraction`) split it: single-label by class, multi-label by iterative stratification (Sechidis,
Tsoumakas and Vlahavas, "On the stratification of multi-label data", ECML PKDD 2011), from the run's seed. The split
is written into the run folder as file lists, one path per line relative to the dataset,

    <run>/splits/train.txt  val.txt  test.txt  split.json

and the config's `data.splits` names that folder, so a resumed run, `resnetkit eval --checkpoint <run>/best.pt`,
`report` and `compare` read exactly the same images (`build_dataset(..., splits=...)` selects them). `train --folds
K` writes the same lists for each fold.

    >>> parts = iterative_stratification([[0], [1], [0, 1], [1]], num_classes=2, fractions=[0.5, 0.5], seed=0)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SPLIT_NAMES = ("train", "val", "test")


def _exact_sizes(n: int, fractions: np.ndarray) -> np.ndarray:
    """Part sizes summing to n, each the nearest to n x fraction (largest remainders take the leftover places)."""
    quota = fractions * n
    sizes = np.floor(quota).astype(np.int64)
    for part in np.argsort(sizes - quota, kind="stable")[: n - int(sizes.sum())]:
        sizes[part] += 1
    return sizes


def iterative_stratification(
    label_sets: Sequence[Sequence[int]], num_classes: int, fractions: Sequence[float], seed: int = 0
) -> np.ndarray:
    """The part (0 .. len(fractions) - 1) of each item, every label spread over the parts in proportion to
    `fractions`, and each part exactly its share of the items (largest remainders).

    Iterative stratification: the label with the fewest items still unassigned goes first; each of its items joins
    the part that most lacks that label (ties: the part lacking the most items, then a seeded coin). Single-label data
    (one label per item) is stratified per class the same way. Items without labels fill the parts' remaining room.
    """
    n = len(label_sets)
    fractions = np.asarray(fractions, dtype=np.float64)
    if n == 0 or len(fractions) == 0 or (fractions < 0).any() or fractions.sum() <= 0:
        raise ValueError(f"need items and non-negative fractions, got {n} items and fractions {fractions.tolist()}")
    fractions = fractions / fractions.sum()
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    sets = [sorted({int(c) for c in s}) for s in label_sets]
    counts = np.zeros(num_classes, dtype=np.float64)
    by_label: list[list[int]] = [[] for _ in range(num_classes)]
    for i in order.tolist():
        for c in sets[i]:
            if not 0 <= c < num_classes:
                raise ValueError(f"item {i} has label {c}, outside 0 .. {num_classes - 1}")
            counts[c] += 1
            by_label[c].append(i)
    sizes = _exact_sizes(n, fractions)
    room = sizes.astype(np.float64)  # items each part still takes
    wanted = np.outer(counts, fractions)  # (C, P): items of each label each part still wants
    left = counts.copy()
    part_of = np.full(n, -1, dtype=np.int64)

    def choose(candidates: np.ndarray) -> int:
        return int(candidates[0]) if len(candidates) == 1 else int(rng.choice(candidates))

    while (left > 0).any():
        label = int(np.where(left > 0, left, np.inf).argmin())
        for i in by_label[label]:
            if part_of[i] >= 0:
                continue
            open_parts = np.flatnonzero(room > 0)
            want = wanted[label, open_parts]
            best = open_parts[want >= want.max() - 1e-9]
            best = best[room[best] >= room[best].max() - 1e-9]
            part = choose(best)
            part_of[i] = part
            room[part] -= 1
            for c in sets[i]:
                wanted[c, part] -= 1
                left[c] -= 1
    for i in order.tolist():  # items without a label
        if part_of[i] < 0:
            part = choose(np.flatnonzero(room >= room.max() - 1e-9))
            part_of[i] = part
            room[part] -= 1
    return part_of


def stratified_subset(label_sets: Sequence[Sequence[int]], num_classes: int, n: int, seed: int = 0) -> list[int]:
    """n item indices (ascending) keeping each label's share: multi-label `data.subset`."""
    if n >= len(label_sets):
        return list(range(len(label_sets)))
    parts = iterative_stratification(label_sets, num_classes, [n, len(label_sets) - n], seed)
    return np.flatnonzero(parts == 0).tolist()


def label_sets_of(dataset) -> list[list[int]]:
    """Each item's classes: `label_sets` of a multi-label dataset, [target] of a single-label one."""
    if getattr(dataset, "multilabel", False):
        return [list(s) for s in dataset.label_sets]
    return [[int(t)] for t in dataset.targets]


def split_parts(dataset, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """The indices of train, val (and test, when test_fraction > 0), stratified and seeded."""
    fractions = [1 - val_fraction - test_fraction, val_fraction, test_fraction]
    parts = iterative_stratification(label_sets_of(dataset), len(dataset.classes), fractions, seed)
    return {name: np.flatnonzero(parts == k).tolist() for k, name in enumerate(SPLIT_NAMES) if fractions[k] > 0}


def fold_parts(dataset, folds: int, seed: int) -> list[list[int]]:
    """The indices of each of `folds` stratified, seeded folds (each fold's held-out part)."""
    parts = iterative_stratification(label_sets_of(dataset), len(dataset.classes), [1.0] * folds, seed)
    return [np.flatnonzero(parts == k).tolist() for k in range(folds)]


# ---- file lists in the run folder


def write_lists(folder: str | os.PathLike, dataset, parts: dict[str, list[int]], info: dict[str, Any]) -> Path:
    """<folder>/<split>.txt for each part (the dataset's relative paths, one a line) and split.json (how they were
    made, with their sizes)."""
    from resnetkit.fileio import write_atomic

    folder = Path(folder)
    names = dataset.relative_paths()
    for split, indices in parts.items():
        write_atomic(folder / f"{split}.txt", "".join(names[i] + "\n" for i in indices))
    sizes = {split: len(indices) for split, indices in parts.items()}
    write_atomic(folder / "split.json", json.dumps({**info, "sizes": sizes}, indent=2) + "\n")
    return folder


def read_list(folder: str | os.PathLike, split: str) -> tuple[Path, list[str]]:
    path = Path(folder) / f"{split}.txt"
    if not path.is_file():
        made = sorted(p.stem for p in Path(folder).glob("*.txt"))
        hint = " (set data.test_fraction for a test split)" if split == "test" else ""
        raise FileNotFoundError(
            f"{path} does not exist: the split lists in {folder} hold {', '.join(made) or 'nothing'}{hint}"
        )
    return path, [line for line in path.read_text().splitlines() if line.strip()]


def select_listed(dataset, folder: str | os.PathLike, split: str) -> None:
    """Keep the dataset's items named in <folder>/<split>.txt, in its order; names it lacks are one error."""
    path, listed = read_list(folder, split)
    index = {name: i for i, name in enumerate(dataset.relative_paths())}
    missing = [(lineno, name) for lineno, name in enumerate(listed, 1) if name not in index]
    if missing:
        shown = "\n".join(f"  {path}:{lineno}: {name}" for lineno, name in missing[:20])
        more = f"\n  ... ({len(missing)} in all)" if len(missing) > 20 else ""
        raise ValueError(f"{len(missing)} images of the split list {path} are not in the dataset:\n{shown}{more}")
    dataset.select([index[name] for name in listed])
    dataset.listed_split = split


def prepare_splits(cfg, run_dir: str | os.PathLike, *, resume: bool, write: bool):
    """The config with `data.splits` naming <run_dir>/splits, whose lists `data.val_fraction` (and test_fraction)
    made from the whole dataset, seeded with `cfg.seed`; lists already there are reused (a resumed run sees the same
    images). Without val_fraction the config comes back unchanged. Only the `write` process (rank 0) writes."""
    d = cfg.data
    if d.val_fraction is None:
        return cfg
    from resnetkit.data.datasets import build_dataset

    folder = (Path(run_dir) / "splits").resolve()
    info = {"dataset": d.name, "val_fraction": d.val_fraction, "test_fraction": d.test_fraction or 0.0}
    info["seed"] = cfg.seed
    made = folder / "split.json"
    if made.is_file():
        before = json.loads(made.read_text())
        changed = [k for k in info if before.get(k) != info[k]]
        if changed and resume:
            raise ValueError(
                f"--resume: {made} was made with "
                + ", ".join(f"{k}={before.get(k)!r}" for k in changed)
                + f" but the config says {', '.join(f'{k}={info[k]!r}' for k in changed)}"
            )
        if not changed:
            write = False  # reuse the lists
    if write:
        whole = build_dataset(d.name, "train", **dataset_options(d, whole=True))
        write_lists(folder, whole, split_parts(whole, d.val_fraction, d.test_fraction or 0.0, cfg.seed), info)
    return dataclasses.replace(cfg, data=dataclasses.replace(d, splits=str(folder)))


def dataset_options(data: Any, checkpoint: str | os.PathLike | None = None, *, whole: bool = False) -> dict:
    """build_dataset's keyword arguments (root, splits, the CSV columns) from a DataConfig or a checkpoint's
    config["data"] dict. A checkpoint's split lists are looked up where the config says, else beside the checkpoint
    (a run folder that was moved). whole: the dataset before any split lists (what the lists are made from)."""

    def get(key: str, default=None):
        return data.get(key, default) if isinstance(data, dict) else getattr(data, key, default)

    options: dict[str, Any] = {"root": get("root")}
    columns = {
        key: get(key)
        for key in ("path_column", "label_column", "split_column", "label_separator", "class_columns", "multilabel")
        if get(key) not in (None, False)
    }
    if columns:
        options["columns"] = columns
    splits = get("splits")
    if splits and not whole:
        if not Path(splits).is_dir() and checkpoint is not None and (Path(checkpoint).parent / "splits").is_dir():
            splits = str(Path(checkpoint).parent / "splits")
        options["splits"] = splits
    if whole:
        options["whole"] = True
    return options
