"""Where onnxruntime's fp32 time goes in ResNet-50, and how close each kind of convolution runs to the machine's peak.

    .venv/bin/python benchmarks/onnxruntime_profile.py --batch 32 --runs 3

Exports resnetkit's ResNet-50 (random weights, seeded), runs it in onnxruntime with profiling on, and sums the
kernel time of every node over `--runs` calls. Each convolution's FLOPs come from the PyTorch model (a forward hook
per Conv2d), matched to onnxruntime's node names; the table gives the time and the achieved GFLOP/s per kind of
convolution (the 7x7 stem, the 1x1 reductions and expansions, the 3x3s, the downsampling 1x1s), next to the
fp32 matrix-multiply throughput measured in the same run (torch.mm, 4096x4096, best of 5). This is the evidence
for BENCHMARKS.md's statement that onnxruntime's fp32 ResNet-50 already runs at the machine's compute ceiling.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from resnetkit.deploy.bench import gemm_gflops
from resnetkit.deploy.export import INPUT_NAME, export_model
from resnetkit.models import create_model


def conv_flops(model: torch.nn.Module, size: int) -> dict[str, float]:
    """FLOPs (2 x multiply-adds) of every Conv2d for one image, by module name."""
    flops: dict[str, float] = {}

    def hook(name: str):
        def record(module, inputs, output):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            flops[name] = 2.0 * output.numel() * per_output

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    for h in handles:
        h.remove()
    return flops


def module_of(node_name: str) -> str | None:
    """The PyTorch conv behind an onnxruntime node: the exporter names nodes after the module that made the output
    (after fusion, the ReLU or the conv itself); '/layer1/layer1.0/relu_1/...' is the output of conv2."""
    if node_name.startswith("/relu/"):
        return "conv1"
    m = re.match(r"/(layer\d)/layer\d\.(\d+)/(relu_1|relu_2|relu|conv3|downsample/downsample\.0)", node_name)
    if not m:
        return None
    layer, block, what = m.groups()
    conv = {"relu": "conv1", "relu_1": "conv2", "relu_2": "conv3", "conv3": "conv3"}.get(what, "downsample.0")
    return f"{layer}.{block}.{conv}"


def kind_of(module: str) -> str:
    if module == "conv1":
        return "stem 7x7/2 (3 -> 64)"
    if module.endswith("downsample.0"):
        return "downsample 1x1"
    return {"conv1": "1x1 reduce", "conv2": "3x3", "conv3": "1x1 expand (+ residual add)"}[module.rsplit(".", 1)[1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's (the cores)")
    args = parser.parse_args()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)

    torch.manual_seed(0)
    model = create_model("resnet50").eval()
    flops = conv_flops(model, 224)
    roofline = gemm_gflops()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet50.onnx"
        export_model(model, path, "onnx", {"input_size": 224}, model_name="resnet50")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224), dtype=np.float32)
        session.run(None, {INPUT_NAME: x})  # warm-up (also profiled: dropped below)
        start = time.perf_counter()
        for _ in range(args.runs):
            session.run(None, {INPUT_NAME: x})
        wall = (time.perf_counter() - start) / args.runs
        events = json.loads(Path(session.end_profiling()).read_text())

    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(kernels) // (args.runs + 1)
    kernels = kernels[per_run:]  # drop the warm-up call
    by_op: dict[str, float] = collections.defaultdict(float)
    by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])  # seconds, FLOPs
    for e in kernels:
        seconds = e["dur"] / 1e6 / args.runs
        by_op[e["args"]["op_name"]] += seconds
        module = module_of(e["name"]) if e["args"]["op_name"] == "Conv" else None
        if module in flops:
            by_kind[kind_of(module)][0] += seconds
            by_kind[kind_of(module)][1] += flops[module] * args.batch / args.runs
    total = sum(by_op.values())
    print(
        f"ResNet-50, batch {args.batch}, {threads} threads, onnxruntime {ort.__version__}: {wall * 1e3:.0f} ms per "
        f"call ({args.batch / wall:.1f} images/s); fp32 GEMM (torch.mm 4096) {roofline:.0f} GFLOP/s\n"
    )
    print("| operator | ms per call | share |")
    print("|---|---:|---:|")
    for op, seconds in sorted(by_op.items(), key=lambda kv: -kv[1])[:6]:
        print(f"| {op} | {seconds * 1e3:.1f} | {100 * seconds / total:.1f}% |")
    print("\n| convolution kind | ms per call | GFLOP per call | GFLOP/s | of the GEMM throughput |")
    print("|---|---:|---:|---:|---:|")
    for kind, (seconds, flop) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        rate = flop / seconds / 1e9
        print(f"| {kind} | {seconds * 1e3:.1f} | {flop / 1e9:.1f} | {rate:.0f} | {100 * rate / roofline:.0f}% |")


if __name__ == "__main__":
    main()
