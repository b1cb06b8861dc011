"""`resnetkit models` and `resnetkit summary MODEL`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model zoo: parameters and GFLOPs at the default input size")
    p.add_argument("--family", choices=["imagenet", "cifar", "densenet"], help="only this family")
    p.add_argument("--num-classes", type=int, default=None, help="head size (default: 1000 ImageNet, 10 CIFAR)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("summary", help="per-stage table of one model: output shape, parameters, multiply-adds")
    p.add_argument("model", help="a registered model name (see `resnetkit models`)")
    p.add_argument("--input-size", type=int, default=None, help="square input side in pixels (default: the model's)")
    p.add_argument("--num-classes", type=int, default=None)
    p.set_defaults(func=cmd_summary)


def cmd_models(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from resnetkit.models import create_model, default_input_size, list_models
    from resnetkit.models.summary import count_params, total_macs

    table = Table(title="resnetkit model zoo", caption="GFLOPs: multiply-adds, counted as torchvision publishes them")
    for col in ("model", "family", "input", "params", "GFLOPs"):
        table.add_column(col, justify="left" if col in ("model", "family") else "right")
    from resnetkit.registry import model_family

    for name in list_models(args.family):
        kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
        model = create_model(name, **kwargs)
        size = default_input_size(name)
        table.add_row(
            name, model_family(name), f"{size}", f"{count_params(model):,}", f"{total_macs(model, size) / 1e9:.3f}"
        )
    Console().print(table)
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from resnetkit.models import create_model, default_input_size
    from resnetkit.models.summary import count_params, summarize

    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    model = create_model(args.model, **kwargs)
    size = args.input_size or default_input_size(args.model)
    rows = summarize(model, size)
    table = Table(title=f"{args.model} at {size}x{size}")
    for col in ("stage", "output shape", "params", "mult-adds"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for r in rows:
        table.add_row(r.name, "x".join(map(str, r.output_shape)), f"{r.params:,}", f"{r.macs:,}")
    total = sum(r.macs for r in rows)
    table.add_section()
    table.add_row("total", "", f"{count_params(model):,}", f"{total:,}  ({total / 1e9:.2f} G)")
    Console().print(table)
    return 0
