"""`resnetkit bench infer`: CPU inference speed of every path, side by side, from one run.

    resnetkit bench infer --model resnet50 --batch 1,32 --iters 5

Rows: torchvision eager (NCHW, as users write it), resnetkit eager, resnetkit optimised (BN folded, channels_last,
inference mode), optionally resnetkit compiled (the same plus torch.compile with Inductor freezing; minutes of
compilation per batch size, so only with --backends), resnetkit onnxruntime (`optimize_for_cpu(backend=
"onnxruntime")`: the verified export run with every graph optimisation), onnxruntime default (the peer: the model
exported with plain `torch.onnx.export` and run in an `InferenceSession` with default options, only the thread count
set to match) and int8 (onnxruntime QDQ, calibrated on random images: speed does not depend on the weights; for
accuracy see benchmarks/int8_agreement.py). Each row gives images/s, the median latency of one batch, the ratio to
torchvision eager, and the fraction of the machine's fp32 matrix-multiply throughput (a large torch.mm measured in the
same run) that the model's FLOPs reach.

The timed calls are interleaved (one call of each path in turn, `iters` rounds), so that load from other jobs on a
shared machine falls on every path alike and the ratios stay meaningful even when the absolute numbers do not.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

BACKENDS = (
    "torchvision eager",
    "resnetkit eager",
    "resnetkit optimised",
    "resnetkit compiled",
    "resnetkit onnxruntime",
    "onnxruntime default",
    "int8",
)
# torch.compile costs minutes per batch size on 2 cores: measured when asked for (--backends), not by default.
DEFAULT_BACKENDS = tuple(b for b in BACKENDS if b != "resnetkit compiled")
BASELINE = "torchvision eager"
SETTLE_S = 0.05  # untimed pause before each timed call


@dataclass
class BenchRow:
    backend: str
    batch: int
    latency_ms: float  # median over the timed calls, one whole batch
    images_per_s: float
    ratio: float | None  # images/s over torchvision eager's at the same batch size
    roofline_fraction: float  # achieved GFLOP/s over the measured fp32 GEMM GFLOP/s
    calls: int  # timed calls the median is taken over


@dataclass
class BenchResult:
    model: str
    input_size: int
    gflop_per_image: float
    gemm_gflops: float
    threads: int
    iters: int  # the fewest timed calls per row (small batches get more: see BenchRow.calls)
    rows: list[BenchRow]


def gemm_gflops(n: int = 4096, repeats: int = 5) -> float:
    """The machine's fp32 matrix-multiply throughput: the best of `repeats` n x n torch.mm calls, in GFLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up: thread pool and MKL's buffers
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _torchvision_model(name: str) -> nn.Module | None:
    import torchvision

    builder = getattr(torchvision.models, name, None)
    return builder(weights=None).eval() if callable(builder) else None


def build_backends(
    name: str, input_size: int, threads: int, work_dir: Path, backends: tuple[str, ...] = BACKENDS
) -> dict[str, Callable[[torch.Tensor], object]]:
    """One callable per backend, each taking a float NCHW batch. torchvision eager is absent for models that
    torchvision does not have (the CIFAR ResNets, ResNet-9)."""
    from resnetkit.bundle import load_bundle
    from resnetkit.deploy.engine import optimize_for_cpu
    from resnetkit.deploy.export import export_model
    from resnetkit.deploy.quantize import quantize_onnx
    from resnetkit.deploy.runtime import OnnxRuntimeModel

    torch.manual_seed(0)  # random weights, but the same each run: the exports' 1e-4 check sees the same logits
    model = load_bundle(model=name).module
    preprocess = {"input_size": input_size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    calls: dict[str, Callable[[torch.Tensor], object]] = {}

    def eager(m: nn.Module) -> Callable[[torch.Tensor], object]:
        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():  # what a user writes; inference_mode is part of the optimised path
                return m(x)

        return run

    tv = _torchvision_model(name)
    if "torchvision eager" in backends and tv is not None:
        calls["torchvision eager"] = eager(tv)
    if "resnetkit eager" in backends:
        calls["resnetkit eager"] = eager(model)
    if "resnetkit optimised" in backends:
        calls["resnetkit optimised"] = optimize_for_cpu(model)
    if "resnetkit compiled" in backends:
        calls["resnetkit compiled"] = optimize_for_cpu(model, compile=True)
    if "resnetkit onnxruntime" in backends:
        calls["resnetkit onnxruntime"] = optimize_for_cpu(
            model, backend="onnxruntime", input_size=input_size, threads=threads
        )
    if "onnxruntime default" in backends:
        calls["onnxruntime default"] = _onnxruntime_default(
            tv if tv is not None else model, input_size, threads, work_dir
        )
    if "int8" in backends:
        fp32 = work_dir / f"{name}.onnx"
        export_model(model, fp32, "onnx", preprocess, model_name=name)
        generator = torch.Generator().manual_seed(0)
        calibration = [torch.randn(4, 3, input_size, input_size, generator=generator) for _ in range(2)]
        int8 = quantize_onnx(fp32, work_dir / f"{name}.int8.onnx", calibration)
        calls["int8"] = OnnxRuntimeModel(int8, threads=threads)
    return calls


def _onnxruntime_default(model: nn.Module, input_size: int, threads: int, work_dir: Path) -> Callable:
    """The peer as a user writes it: `torch.onnx.export` with a dynamic batch, then a default InferenceSession."""
    import warnings

    import numpy as np
    import onnxruntime as ort

    path = work_dir / "default.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(1, 3, input_size, input_size),),
            str(path),
            dynamo=False,
            input_names=["x"],
            dynamic_axes={"x": {0: "batch"}},
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # the only setting: the same thread count as every other row
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> np.ndarray:
        return session.run(None, {"x": x.numpy()})[0]

    return run


def bench_infer(
    name: str = "resnet50",
    batches: tuple[int, ...] = (1, 32),
    iters: int = 5,
    input_size: int | None = None,
    threads: int | None = None,
    backends: tuple[str, ...] = DEFAULT_BACKENDS,
    progress: Callable[[str], None] | None = None,
    gemm_size: int = 4096,
    min_seconds: float = 10.0,
) -> BenchResult:
    """Time every backend at every batch size; see the module docstring for what is measured and how."""
    from resnetkit.models import create_model, default_input_size
    from resnetkit.models.summary import total_macs

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    if iters < 1 or not batches or min(batches) < 1:
        raise ValueError(f"need iters >= 1 and batch sizes >= 1, got iters={iters}, batches={batches}")
    say = progress or (lambda message: None)
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    size = input_size or default_input_size(name)
    gflop = 2 * total_macs(create_model(name), size) / 1e9
    say(f"measuring the fp32 GEMM roofline ({threads} threads)")
    before = gemm_gflops(gemm_size)
    times: dict[int, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        say(f"building {name} backends (export to ONNX, int8 calibration)")
        calls = build_backends(name, size, threads, Path(tmp), backends)
        for batch in batches:
            x = torch.randn(batch, 3, size, size)
            for call in calls.values():  # warm-up: compilation, allocator, oneDNN primitive caches, ORT arenas
                call(x)
            times[batch] = {b: [] for b in calls}
            # Small batches take milliseconds, where one descheduling moves a median of 3: after the first timed
            # round, give every batch size about `min_seconds` of rounds (at least `iters`, at most 100).
            rounds, i = iters, 0
            while i < rounds:
                say(f"batch {batch}: round {i + 1}/{rounds}")
                for backend, call in calls.items():
                    # onnxruntime's pool threads spin for a while after a call, on the cores the next path needs:
                    # a pause lets them park, so that no path pays for the one before it.
                    time.sleep(SETTLE_S)
                    start = time.perf_counter()
                    call(x)
                    times[batch][backend].append(time.perf_counter() - start)
                if i == 0:
                    round_s = sum(samples[0] for samples in times[batch].values())
                    rounds = max(iters, min(100, math.ceil(min_seconds / max(round_s, 1e-6))))
                i += 1
    say("measuring the fp32 GEMM roofline again")
    roofline = max(before, gemm_gflops(gemm_size))  # the better of the two: a busy moment only lowers it
    rows = []
    for batch, per_backend in times.items():
        base = statistics.median(per_backend[BASELINE]) if BASELINE in per_backend else None
        for backend, samples in per_backend.items():
            latency = statistics.median(samples)
            rows.append(
                BenchRow(
                    backend,
                    batch,
                    latency * 1e3,
                    batch / latency,
                    base / latency if base else None,
                    batch * gflop / latency / roofline,
                    len(samples),
                )
            )
    return BenchResult(name, size, gflop, roofline, threads, iters, rows)


def format_markdown(result: BenchResult) -> str:
    lines = [
        f"{result.model} at {result.input_size}px, {result.gflop_per_image:.2f} GFLOP/image; fp32 GEMM roofline "
        f"{result.gemm_gflops:.0f} GFLOP/s; {result.threads} threads; median latency of the interleaved timed calls",
        "",
        "| backend | batch | images/s | latency (ms) | x torchvision eager | % of GEMM roofline | timed calls |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result.rows:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "n/a"
        lines.append(
            f"| {r.backend} | {r.batch} | {r.images_per_s:.2f} | {r.latency_ms:.1f} | {ratio} | "
            f"{100 * r.roofline_fraction:.1f}% | {r.calls} |"
        )
    return "\n".join(lines)


def print_table(result: BenchResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{result.model} inference on CPU, {result.input_size}px, {result.threads} threads",
        caption=f"{result.gflop_per_image:.2f} GFLOP/image; fp32 GEMM roofline {result.gemm_gflops:.0f} "
        f"GFLOP/s measured in this run; median of the interleaved timed calls",
    )
    for col in ("backend", "batch", "images/s", "latency ms", "x torchvision eager", "% GEMM roofline", "calls"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    previous = None
    for r in result.rows:
        if previous is not None and r.batch != previous:
            table.add_section()
        previous = r.batch
        table.add_row(
            r.backend,
            str(r.batch),
            f"{r.images_per_s:.2f}",
            f"{r.latency_ms:.1f}",
            f"{r.ratio:.2f}x" if r.ratio is not None else "n/a",
            f"{100 * r.roofline_fraction:.1f}%",
            str(r.calls),
        )
    Console(width=max(100, Console().width)).print(table)
