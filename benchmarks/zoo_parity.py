"""Parity of resnetkit's timm-named models with timm: parameters, state-dict keys, eval outputs both ways.

    python benchmarks/zoo_parity.py [--size 40]

For each model: timm's and ours built with different random weights and randomised BatchNorm statistics, then each
loads the other's state dict strictly; the table gives both parameter counts, whether the keys (in order) are equal,
and the largest absolute difference of the eval-mode logits, ours-with-timm's-weights vs timm and back.
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch.nn as nn

from resnetkit import create_model
from resnetkit.models.summary import count_params

NAMES = [
    "resnet18d", "resnet34d", "resnet50d", "resnet101d", "resnet152d", "seresnet50", "seresnet101",
    "seresnext50_32x4d", "seresnext101_32x8d", "ecaresnet50d", "ecaresnet101d", "resnetv2_50", "resnetv2_101",
]  # fmt: skip


def randomised(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.0)
                m.bias.uniform_(-0.1, 0.1)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=40, help="input side (odd stage sizes exercise ceil-mode pools)")
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(2, 3, args.size, args.size)
    print(f"timm {timm.__version__}, torch {torch.__version__}, input {tuple(x.shape)}")
    print("| model | parameters (ours) | parameters (timm) | keys equal | max abs diff timm->ours | ours->timm |")
    print("|---|---|---|---|---|---|")
    for name in NAMES:
        theirs, ours = randomised(timm.create_model(name, pretrained=False)), randomised(create_model(name))
        with torch.no_grad():
            theirs_out, ours_out = theirs(x), ours(x)
            theirs_state = {k: v.clone() for k, v in theirs.state_dict().items()}
            keys = list(ours.state_dict()) == list(theirs_state)
            theirs.load_state_dict(ours.state_dict())
            ours.load_state_dict(theirs_state)
            a = (ours(x) - theirs_out).abs().max().item()
            b = (theirs(x) - ours_out).abs().max().item()
        print(f"| {name} | {count_params(ours):,} | {count_params(theirs):,} | {keys} | {a:.1e} | {b:.1e} |")


if __name__ == "__main__":
    main()
