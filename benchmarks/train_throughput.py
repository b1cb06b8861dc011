"""Training throughput (images/s): resnetkit's training step against a plain torchvision loop, same machine, one run.

    python benchmarks/train_throughput.py [--steps 10] [--repeats 3] [--threads 2]

Both train the same architecture on the same random batch (the data pipeline is left out: this measures the step):
- ResNet-18 with the CIFAR stem (3x3 conv, no max-pool) at 32 px, batch 128;
- ResNet-50 at 224 px, batch 16.
"plain" is the textbook loop on torchvision's model (NCHW, fp32). "ours" is resnetkit.train.loop.train_step with the
recipe's flags (channels_last; bf16 autocast too on a GPU) in a process set up as `resnetkit.train` sets it up
(`train.keep_freed_memory`: glibc's malloc keeps freed memory for reuse). Every measurement runs in a fresh process
of its own, so no loop inherits another's allocator state or caches; the loops take turns `--repeats` times and the
table shows each one's median (and the range of the speed-ups over the rounds, plain's round against ours').
`--compile` adds a column for `train.compile: true` (the model torch.compile'd as the engine does it; the
compilation happens in the warm-up steps, outside the timing). `--bf16` adds one for `train.amp: bf16` (autocast on
a CPU too). `--system-malloc` adds one for ours with `train.keep_freed_memory: false`. `--profile` prints, for ours,
the operators that take the most CPU time in the timed steps (torch.profiler; ours' rate in that run includes the
profiler's overhead).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from _isolated import isolated

from resnetkit.config import Config, ModelConfig, TrainConfig
from resnetkit.tasks import get_task
from resnetkit.train.loop import Parts, keep_freed_memory, train_step
from resnetkit.train.optim import LRSchedule, build_optimizer


def torchvision_model(name: str, cifar_stem: bool) -> nn.Module:
    model = getattr(torchvision.models, name)(num_classes=10)
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def time_steps(step, steps: int, batch: int) -> float:
    step()  # warm-up: allocator, oneDNN/cuDNN primitive choice
    step()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * batch / (time.perf_counter() - t0)


def plain(name: str, cifar_stem: bool, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    model = torchvision_model(name, cifar_stem).to(x.device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return time_steps(step, steps, len(x))


def ours(
    name: str,
    options: dict,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    compile: bool = False,
    amp: str | None = None,
    profile: bool = False,
    keep_memory: bool = True,
) -> float:
    """Ours' images/s; `amp` None is the recipes' default (bf16 on a GPU, none on a CPU)."""
    amp = amp or ("bf16" if x.device.type == "cuda" else "none")
    train = TrainConfig(channels_last=True, amp=amp, compile=compile, keep_freed_memory=keep_memory)
    if train.keep_freed_memory:
        keep_freed_memory()  # as resnetkit.train does before it builds anything
    cfg = Config(model=ModelConfig(name=name, options=options), train=train)
    task = get_task("classification")
    task.setup_objective(cfg, [str(c) for c in range(10)], torch.full((10,), len(x)))  # as build_loaders does
    model, _, _ = task.build_model(cfg, load_weights=False)
    model = model.to(x.device, memory_format=torch.channels_last).train()
    opt = build_optimizer(model, cfg.optim, cfg.model)
    parts = Parts(
        torch.compile(model) if compile else model,  # as the engine wraps it (train/fit.py)
        task,
        opt,
        torch.amp.GradScaler(enabled=False),
        LRSchedule(opt, cfg.schedule, 0.01, 100),
        None,
        cfg,
        x.device,
    )

    def step():
        train_step(parts, (x, y), sync=True)

    if not profile:
        return time_steps(step, steps, len(x))
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    with profiler(activities=[ProfilerActivity.CPU]) as prof:
        rate = time_steps(step, steps, len(x))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return rate


def measure(kind: str, name: str, cifar: bool, size: int, batch: int, steps: int, flags: dict, threads) -> float:
    """One loop's images/s on the case's random batch (each in a fresh process: `_isolated.isolated`)."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if kind == "plain":
        return plain(name, cifar, x, y, steps)
    return ours(name, {"stem": "cifar"} if cifar else {}, x, y, steps, **flags)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per case (after 2 warm-up steps)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of every loop, taking turns (medians shown)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--compile", action="store_true", help="add a column for ours with train.compile: true")
    ap.add_argument("--bf16", action="store_true", help="add a column for ours with train.amp: bf16 (for a CPU)")
    ap.add_argument("--system-malloc", action="store_true", help="add a column for train.keep_freed_memory: false")
    ap.add_argument("--profile", action="store_true", help="print ours' most expensive operators (torch.profiler)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = [
        ("resnet18 CIFAR stem, 32 px, batch 128", "resnet18", True, 32, 128, args.steps),
        ("resnet50, 224 px, batch 16", "resnet50", False, 224, 16, max(args.steps // 2, 2)),
    ]
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    variants = {"resnetkit compiled": {"compile": True}} if args.compile else {}
    if args.bf16:
        variants["resnetkit bf16"] = {"amp": "bf16"}
    if args.system_malloc:
        variants["resnetkit, malloc as glibc's"] = {"keep_memory": False}
    extra = "".join(f" {title} img/s | speed-up |" for title in variants)
    print(f"| {'case':40s} | plain torchvision img/s | resnetkit img/s | speed-up |{extra}")
    rule = f"|{'-' * 42}|-------------------------|-----------------|----------|"
    print(rule + "".join("-" * (len(title) + 8) + "|----------|" for title in variants))
    loops = {"plain": ("plain", {}), "ours": ("ours", {"profile": args.profile})}
    loops |= {title: ("ours", flags) for title, flags in variants.items()}
    ranges = []
    for title, name, cifar, size, batch, steps in cases:
        case = (name, cifar, size, batch, steps)
        rates = {loop: [] for loop in loops}
        for _ in range(args.repeats):  # taking turns, so a slow spell of the machine hits every loop
            for loop, (kind, flags) in loops.items():
                rates[loop].append(isolated(measure, kind, *case, flags, args.threads))
        a = statistics.median(rates["plain"])
        row = f"| {title:40s} | {a:23.1f} |"
        for loop in list(loops)[1:]:
            b = statistics.median(rates[loop])
            width = 15 if loop == "ours" else len(loop) + 6
            row += f" {b:{width}.1f} | {b / a:7.2f}x |"
            ratios = [ours / plain for ours, plain in zip(rates[loop], rates["plain"])]
            ranges.append(f"{title}, {loop}: speed-up per round {min(ratios):.2f}x-{max(ratios):.2f}x")
        print(row, flush=True)
    if args.repeats > 1:
        print("\n".join(ranges))


if __name__ == "__main__":
    main()
