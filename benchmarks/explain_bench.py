"""Grad-CAM cost against the plain forward pass it needs anyway (the peer: a prediction), per model, batch 1.

    .venv/bin/python benchmarks/explain_bench.py [--threads 1] [--repeats 5]

Prints a table: model, input size, forward ms, Grad-CAM ms (forward + backward to the last stage + the map), and
their ratio. Median of `repeats` runs after one warm-up, on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from resnetkit import create_model
from resnetkit.evaluation.explain import gradcam

MODELS = [("resnet20", 32, {}), ("resnet18", 224, {}), ("resnet50", 224, {}), ("densenet121", 224, {})]


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"threads={args.threads} repeats={args.repeats} torch {torch.__version__}")
    print(f"{'model':<12} {'input':>5} {'forward ms':>11} {'grad-cam ms':>12} {'ratio':>6}")
    for name, size, kwargs in MODELS:
        model = create_model(name, **kwargs).eval()
        x = torch.randn(1, 3, size, size)

        def forward(model=model, x=x):
            with torch.inference_mode():
                model(x)

        fwd = _median_ms(forward, args.repeats)
        cam = _median_ms(lambda model=model, x=x: gradcam(model, x), args.repeats)
        print(f"{name:<12} {size:>5} {fwd:>11.1f} {cam:>12.1f} {cam / fwd:>6.2f}")


if __name__ == "__main__":
    main()
