"""`resnetkit data stats FOLDER` (normalisation statistics) and `resnetkit data info DATA` (splits, classes, counts)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="dataset tools: normalisation statistics, split and class counts")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    s = data_sub.add_parser("stats", help="per-channel mean and std of every image under a folder (or a dataset)")
    s.add_argument("source", help="a folder of images (searched recursively) or a dataset name such as shapes")
    s.add_argument("--split", default="train", help="split, when SOURCE is a dataset name (default: train)")
    s.add_argument("--max-images", type=int, default=None, help="use only the first N images")
    s.set_defaults(func=cmd_stats)

    s = data_sub.add_parser("info", help="the splits, classes and image counts of a dataset")
    s.add_argument(
        "source", help="shapes, cifar10, cifar100, cub200, shapes-multi, cifar10-mosaic:PATH, a dataset folder or a CSV"
    )
    s.add_argument("--root", default=None, help="where named datasets live (default: $RESNETKIT_DATA)")
    s.set_defaults(func=cmd_info)


def cmd_stats(args: argparse.Namespace) -> int:
    from pathlib import Path

    from resnetkit.data.datasets import BUILTIN, build_dataset
    from resnetkit.data.transforms import compute_mean_std

    name = args.source
    is_named = name in BUILTIN or name.startswith("shapes")
    source = build_dataset(name, args.split) if is_named and not Path(name).exists() else Path(name)
    mean, std = compute_mean_std(source, args.max_images)
    print("mean " + " ".join(f"{m:.4f}" for m in mean))
    print("std  " + " ".join(f"{s:.4f}" for s in std))
    print(f"# as a config: mean: {mean}  std: {std}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from collections import Counter
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from resnetkit.data.datasets import build_dataset, is_flat_folder
    from resnetkit.data.splits import label_sets_of

    splits = {}
    for split in ("train", "test"):
        try:
            splits[split] = build_dataset(args.source, split, root=args.root)
        except (FileNotFoundError, ValueError):
            if split != "train":
                continue
            if not is_flat_folder(Path(args.source)):
                raise
            # A folder of class folders: every image (data.val_fraction splits it when training).
            splits["all"] = build_dataset(args.source, "train", root=args.root, whole=True)
    first = next(iter(splits.values()))
    kind = "multi-label " if getattr(first, "multilabel", False) else ""
    table = Table(title=f"{args.source}: {type(first).__name__}, {len(first.classes)} classes {kind}".rstrip())
    table.add_column("class")
    for split in splits:
        table.add_column(split, justify="right")
    # Images per class (multi-label: images holding the label).
    counts = {split: Counter(c for labels in label_sets_of(ds) for c in labels) for split, ds in splits.items()}
    for i, name in enumerate(first.classes):
        table.add_row(name, *(f"{counts[s][i]:,}" for s in splits))
    table.add_section()
    table.add_row("total", *(f"{len(ds):,}" for ds in splits.values()))
    Console(emoji=False).print(table)
    return 0
