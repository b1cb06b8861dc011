"""Load on `resnetkit serve`: requests/s and latency from concurrent clients, with and without micro-batching,
on the torch and onnxruntime backends. Speed does not depend on the weights, so the model is randomly initialised.

    .venv/bin/python benchmarks/serve_load.py --model resnet18 --requests 160 --clients 8

Each configuration runs in its own server process on a loopback port; the clients send one real ImageNet photo per
request (../shared/data/imagenet-sample), cycling through the first 16.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from resnetkit.checkpoint import save_checkpoint
from resnetkit.data import imagenet_classes, preprocess_info
from resnetkit.models import create_model

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-sample"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, backend: str, max_batch: int, max_wait_ms: float, threads: int):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "resnetkit",
            "serve",
            "--checkpoint",
            str(checkpoint),
            "--port",
            str(port),
            "--backend",
            backend,
            "--max-batch",
            str(max_batch),
            "--max-wait-ms",
            str(max_wait_ms),
            "--threads",
            str(threads),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


async def load(url: str, payloads: list[tuple[str, bytes]], requests: int, clients: int):
    latencies, errors = [], 0

    async def client(i: int, http: httpx.AsyncClient):
        nonlocal errors
        for j in range(i, requests, clients):
            name, data = payloads[j % len(payloads)]
            start = time.perf_counter()
            response = await http.post(f"{url}/v1/predict", files={"files": (name, data)}, params={"top_k": 5})
            latencies.append(time.perf_counter() - start)
            errors += response.status_code != 200

    async with httpx.AsyncClient(timeout=300) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        return time.perf_counter() - start, latencies, errors


def batch_stats(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics").text
    value = {m[1]: float(m[2]) for m in re.finditer(r"^(resnetkit_batch_size_(?:sum|count)) (\S+)$", text, re.M)}
    return value["resnetkit_batch_size_sum"], value["resnetkit_batch_size_count"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in the server")
    parser.add_argument("--backends", default="torch,onnxruntime")
    args = parser.parse_args()

    photos = sorted(SAMPLE.glob("*.JPEG"))[:16]
    if not photos:
        sys.exit(f"no photos in {SAMPLE}")
    payloads = [(p.name, p.read_bytes()) for p in photos]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "model.pt"
        torch.manual_seed(0)
        model = create_model(args.model)
        save_checkpoint(
            checkpoint,
            {
                "model": model.state_dict(),
                "model_name": args.model,
                "model_kwargs": {},
                "classes": imagenet_classes(),
                "preprocess": preprocess_info("imagenet"),
            },
        )
        rows = []
        for backend in args.backends.split(","):
            for max_batch, max_wait in ((1, 0.0), (16, 5.0)):
                proc, url = start_server(checkpoint, backend, max_batch, max_wait, args.threads)
                try:
                    asyncio.run(load(url, payloads, 2 * args.clients, args.clients))  # warm-up
                    before = batch_stats(url)
                    seconds, latencies, errors = asyncio.run(load(url, payloads, args.requests, args.clients))
                    after = batch_stats(url)
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
                p50, p99 = np.percentile(latencies, [50, 99]) * 1000
                mean_batch = (after[0] - before[0]) / max(after[1] - before[1], 1)
                rows.append((backend, max_batch, max_wait, args.requests / seconds, p50, p99, mean_batch, errors))
                print(f"done: {backend} max-batch {max_batch}", file=sys.stderr)

    print(
        f"\n{args.model} at 224 px, {args.requests} requests (1 photo each) from {args.clients} concurrent clients, "
        f"{args.threads} torch threads\n"
    )
    print("| backend | --max-batch | --max-wait-ms | requests/s | p50 ms | p99 ms | mean batch | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for backend, mb, mw, rps, p50, p99, mean_batch, errors in rows:
        print(f"| {backend} | {mb} | {mw:g} | {rps:.1f} | {p50:.0f} | {p99:.0f} | {mean_batch:.1f} | {errors} |")


if __name__ == "__main__":
    main()
