"""Model statistics: parameters and multiply-adds, in total and per stage."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class LayerRow:
    name: str
    output_shape: tuple[int, ...]
    params: int
    macs: int


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _rows_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's top-level pieces in forward order; a `features` (DenseNet) or `stages` (pre-activation ResNets)
    Sequential is opened up, one row per stage."""
    rows = []
    for name, child in model.named_children():
        if name in ("features", "stages") and isinstance(child, nn.Sequential):
            rows.extend((f"{name}.{n}", c) for n, c in child.named_children())
        else:
            rows.append((name, child))
    return rows


@torch.no_grad()
def summarize(model: nn.Module, input_size: int = 224, in_chans: int = 3) -> list[LayerRow]:
    """Per-stage output shape (batch 1), parameters and multiply-adds (convolutions and linear layers, as
    torchvision's published GFLOPS figures count them: 4.09 G for ResNet-50 at 224 px). Squeeze-and-excitation's
    1x1 and ECA's 1-D convolutions count; pooling (ResNet-D's average-pool shortcuts included), the attention gates'
    products and the residual additions do not, as the max-pool and the additions never did."""
    model = model.eval()
    pieces = _rows_of(model)
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, n=n: shapes.__setitem__(n, tuple(out.shape))) for n, m in pieces
    ]
    try:
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, in_chans, input_size, input_size))
    finally:
        for h in hooks:
            h.remove()
    flops = counter.get_flop_counts()
    prefix = type(model).__name__
    rows = []
    for name, module in pieces:
        if name not in shapes:
            continue  # defined but unused in forward (none in the zoo today)
        macs = sum(flops.get(f"{prefix}.{name}", {}).values()) // 2
        rows.append(LayerRow(name, shapes[name], count_params(module), macs))
    return rows


def total_macs(model: nn.Module, input_size: int = 224, in_chans: int = 3) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, in_chans, input_size, input_size))
    return counter.get_total_flops() // 2
