"""An HTTP server for a classifier: FastAPI on uvicorn, with micro-batching, Prometheus metrics and a web page.

    resnetkit serve --checkpoint runs/cifar/best.pt --port 8000      # then open http://127.0.0.1:8000/
    curl -F files=@cat.jpg 'http://127.0.0.1:8000/v1/predict?top_k=3'

Endpoints: POST /v1/predict (multipart field `files`, one or several images; query `top_k`; a multi-label model
also answers each image's "labels", every class at or above its threshold), POST /v1/explain
(field `file`: the Grad-CAM overlay of the top class as a base64 PNG), GET /v1/model, GET /health, GET /metrics,
GET /docs (OpenAPI), GET / (the web page).

Every bad request (too large, a decompression bomb, not an image, a missing or wrong field) is answered with a
4xx status and a JSON body {"error": "..."}; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import io
import json
import os
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from resnetkit.data.image import BadImageError, ImageTooLarge, decode_image, to_pil
from resnetkit.deploy.predict import Predictor

# 8k x 8k: far above any photo a ResNet needs, far below what a decompression bomb asks for (a 1 KB PNG can declare
# 2^32 pixels): a server's limit is stricter than the decoder's default.
SERVE_MAX_PIXELS = 64_000_000

CONFIG_ENV = "RESNETKIT_SERVE_CONFIG"  # how `--workers N` hands the settings to each uvicorn worker process


@dataclass
class ServeConfig:
    """What `resnetkit serve` was asked for; plain data so it can travel to worker processes as JSON."""

    checkpoint: str | None = None  # a checkpoint or exported file; or:
    model: str | None = None  # a zoo model name, with
    weights: str | None = None  # its weights ("imagenet", "imagenet-v2", a file)
    backend: str = "torch"  # "torch" or "onnxruntime"
    max_batch: int = 16  # images per model call
    max_wait_ms: float = 5.0  # how long the first image of a batch waits for others
    max_request_bytes: int = 20 * 1024 * 1024  # whole request body; larger ones are answered 413
    max_pixels: int = SERVE_MAX_PIXELS  # per request, checked from each header before decoding
    max_images: int = 64  # images per request
    max_top_k: int = 100
    threads: int = 0  # torch threads per worker process; 0: the machine's cores divided among the workers

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.model is None):
            raise ValueError("serve a checkpoint or exported file, or a model name with weights")
        if self.backend not in ("torch", "onnxruntime"):
            raise ValueError(f"backend must be 'torch' or 'onnxruntime', got {self.backend!r}")
        for key in ("max_batch", "max_request_bytes", "max_pixels", "max_images", "max_top_k"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")


# ---------------------------------------------------------------------------------------------------- metrics

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
ENDPOINTS = ("/", "/health", "/metrics", "/v1/model", "/v1/predict", "/v1/explain", "/docs", "/openapi.json")


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        self.total += 1
        self.sum += value

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out, running = [], 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {running}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        suffix = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{suffix} {self.sum:.6f}", f"{name}_count{suffix} {self.total}"]
        return out


class Metrics:
    """Request counts by endpoint and status, request latency and batch size histograms, in Prometheus text."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.images = 0

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[(endpoint, status)] += 1
        self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, size: int) -> None:
        self.batch_size.observe(size)
        self.images += size

    def render(self) -> str:
        lines = [
            "# HELP resnetkit_requests_total HTTP requests by endpoint and status code.",
            "# TYPE resnetkit_requests_total counter",
        ]
        for (endpoint, status), n in sorted(self.requests.items()):
            lines.append(f'resnetkit_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        lines += [
            "# HELP resnetkit_request_latency_seconds Time from request to response.",
            "# TYPE resnetkit_request_latency_seconds histogram",
        ]
        for endpoint, hist in sorted(self.latency.items()):
            lines += hist.lines("resnetkit_request_latency_seconds", f'endpoint="{endpoint}"')
        lines += [
            "# HELP resnetkit_batch_size Images per model call (micro-batches of concurrent requests).",
            "# TYPE resnetkit_batch_size histogram",
        ]
        lines += self.batch_size.lines("resnetkit_batch_size")
        lines += [
            "# HELP resnetkit_images_total Images classified.",
            "# TYPE resnetkit_images_total counter",
            f"resnetkit_images_total {self.images}",
        ]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- batching


class MicroBatcher:
    """Groups images from concurrent requests into one model call: up to `max_batch` images, or whatever has
    arrived `max_wait_ms` after the first one. Model calls run one at a time on `executor` (a single thread), so
    the event loop keeps accepting requests while the model works."""

    def __init__(
        self,
        run_batch,
        max_batch: int,
        max_wait_ms: float,
        executor: ThreadPoolExecutor,
        metrics: Metrics | None = None,
    ):
        self.run_batch = run_batch  # float batch (N, C, H, W) -> per-image results, indexable by position
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.executor = executor
        self.metrics = metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    async def submit(self, image: torch.Tensor):
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((image, future))
        return await future

    async def _collect(self) -> list:
        items = [await self.queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while len(items) < self.max_batch:
            with contextlib.suppress(asyncio.QueueEmpty):
                items.append(self.queue.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            # Not asyncio.wait_for(queue.get()): on Python 3.11 a timeout racing a completed get loses the item.
            getter = asyncio.ensure_future(self.queue.get())
            done, _ = await asyncio.wait({getter}, timeout=remaining)
            if getter in done:
                items.append(getter.result())
                continue
            getter.cancel()  # a cancelled get leaves its item in the queue for the next batch
            break
        return items

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._collect()
            items = [(x, f) for x, f in items if not f.done()]  # drop requests whose client went away
            if not items:
                continue
            if self.metrics is not None:
                self.metrics.observe_batch(len(items))
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, torch.stack([x for x, _ in items]))
            except Exception as e:  # a model failure fails this batch's requests, not the server
                for _, future in items:
                    if not future.done():
                        future.set_exception(e)
                continue
            for i, (_, future) in enumerate(items):
                if not future.done():
                    future.set_result(results[i])


# ---------------------------------------------------------------------------------------------------- ASGI layers


class LimitsAndMetrics:
    """Outermost ASGI layer: refuses request bodies over `max_bytes` with 413 (by Content-Length before reading,
    and while reading for chunked uploads), and records every response's status and latency."""

    def __init__(self, app, max_bytes: int, metrics: Metrics):
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = {"code": 500, "sent": False}
        received, too_large = 0, False

        async def send_tracking(message):
            if too_large:
                return  # the app's answer to a cut-off body (a parse error) is replaced by the 413 below
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
            await send(message)

        async def receive_limited():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Tell the app the client went away: FastAPI would turn an exception raised here into a 400.
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                too_large = True
            else:
                try:
                    await self.app(scope, receive_limited, send_tracking)
                except Exception:
                    if not too_large:
                        raise
            if too_large and not status["sent"]:
                await self._drain(receive)
                too_large = False  # let the 413 itself through send_tracking
                await _send_json(
                    send_tracking, 413, {"error": f"request body over the limit of {self.max_bytes:,} bytes"}
                )
        finally:
            self.metrics.observe_request(endpoint, status["code"], time.perf_counter() - start)

    async def _drain(self, receive) -> None:
        """Read (and drop) what the client is still sending, up to a bound, so that it reads the 413 instead of
        a connection reset mid-upload."""
        drained = 0
        while drained < 8 * self.max_bytes:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
            drained += len(message.get("body", b""))


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


# ---------------------------------------------------------------------------------------------------- the app


def load_predictor(config: ServeConfig) -> tuple[Predictor, nn.Module | None]:
    """The Predictor to serve and the eager model Grad-CAM needs (None when serving an .onnx file).

    The model comes from `load_bundle` (a checkpoint, an export, or a zoo model with weights). A PyTorch model
    under the onnxruntime backend is exported to ONNX first (`export_model`, which checks the exported logits
    against the eager model's) and served from an onnxruntime session.
    """
    from resnetkit.bundle import load_bundle
    from resnetkit.deploy.runtime import OnnxRuntimeModel

    if config.checkpoint:
        bundle = load_bundle(config.checkpoint, threads=config.threads or None)
    else:
        bundle = load_bundle(model=config.model, weights=config.weights)
    predictor = Predictor(bundle)
    eager = bundle.model if isinstance(bundle.model, nn.Module) else None
    if eager is None and config.backend != "onnxruntime":
        raise ValueError(f"{bundle.source} is an ONNX file: serve it with --backend onnxruntime")
    if eager is not None and config.backend == "onnxruntime":
        from resnetkit.deploy.export import export_model

        with tempfile.TemporaryDirectory(prefix="resnetkit-serve-") as tmp:
            onnx = Path(tmp) / f"{predictor.name}.onnx"
            export_model(
                eager,
                onnx,
                "onnx",
                predictor.preprocess,
                predictor.classes,
                model_name=predictor.name,
                multilabel=bundle.multilabel,
                thresholds=bundle.thresholds,
            )
            predictor.model = OnnxRuntimeModel(onnx, threads=config.threads or None)  # the session holds the graph
    return predictor, eager


def create_app(predictor: Predictor, config: ServeConfig, explain_model: nn.Module | None = None):
    """The FastAPI app (wrapped in the size-limit and metrics layer) serving `predictor`."""
    from resnetkit._version import __version__

    metrics = Metrics()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    if explain_model is None and isinstance(predictor.model, nn.Module):
        explain_model = predictor.model
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["batcher"] = MicroBatcher(
            predictor.probabilities, config.max_batch, config.max_wait_ms, executor, metrics
        )
        state["batcher"].start()
        yield
        await state["batcher"].stop()
        executor.shutdown(wait=False)

    app = FastAPI(
        title="resnetkit",
        version=__version__,
        lifespan=lifespan,
        description=f"Image classification with {predictor.name} ({len(predictor.classes)} classes).",
    )
    web = resources.files("resnetkit.deploy").joinpath("web")
    app.mount("/static", StaticFiles(directory=str(web)), name="static")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
        return JSONResponse({"error": "; ".join(problems) or "invalid request"}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):  # a bug: still one JSON line, never a traceback
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    async def read_images(files: list[UploadFile]):
        if len(files) > config.max_images:
            raise HTTPException(413, f"{len(files)} images in one request, over the limit of {config.max_images}")
        # The pixel limit holds for the whole request: 64 blank 8k x 8k PNGs fit in a few MB but decode to 12 GB.
        images, budget = [], config.max_pixels
        for i, upload in enumerate(files):
            name = upload.filename or f"files[{i}]"
            data = await upload.read()
            try:
                image = await run_in_threadpool(functools.partial(decode_image, data, name=name, max_pixels=budget))
            except ImageTooLarge as e:
                together = f"{name}: the images of this request together exceed {config.max_pixels:,} pixels"
                raise HTTPException(413, together if budget < config.max_pixels else str(e)) from None
            except BadImageError as e:
                raise HTTPException(415, str(e)) from None
            budget -= image.shape[-1] * image.shape[-2]
            images.append(image)
        return images

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(str(web.joinpath("index.html")), media_type="text/html")

    @app.get("/health", summary="liveness: 200 while the server can answer")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/model", summary="the model served: name, classes, input size, preprocessing, version")
    async def model_info():
        return {
            "name": predictor.name,
            "classes": predictor.classes,
            "num_classes": len(predictor.classes),
            "input_size": predictor.input_size,
            "preprocess": predictor.preprocess,
            "temperature": predictor.temperature,
            "backend": config.backend,
            "multilabel": predictor.multilabel,
            "thresholds": predictor.thresholds,
            "version": __version__,
            "max_batch": config.max_batch,
            "max_wait_ms": config.max_wait_ms,
        }

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post(
        "/v1/predict",
        summary="classify one or several images (multipart field `files`): the top-k classes, and for a "
        "multi-label model every label at or above its threshold",
    )
    async def predict(
        files: list[UploadFile] = File(..., description="one or more image files"),
        top_k: int = Query(5, ge=1, le=config.max_top_k),
    ):
        start = time.perf_counter()
        images = await read_images(files)
        batch = await run_in_threadpool(predictor.to_tensor, images)
        probs = await asyncio.gather(*(state["batcher"].submit(x) for x in batch))
        ranked = predictor.ranked(torch.stack(probs), top_k)
        return {
            "model": predictor.name,
            "latency_ms": round(1000 * (time.perf_counter() - start), 2),
            "predictions": [{"file": f.filename, **record} for f, record in zip(files, ranked)],
        }

    @app.post("/v1/explain", summary="Grad-CAM overlay of the top class (multipart field `file`), base64 PNG")
    async def explain(file: UploadFile = File(..., description="one image file")):
        if explain_model is None:
            raise HTTPException(501, "Grad-CAM needs the eager model: serve the .pt checkpoint, not an .onnx file")
        (image,) = await read_images([file])
        result = await asyncio.get_running_loop().run_in_executor(executor, _explain, explain_model, predictor, image)
        return result

    return LimitsAndMetrics(app, config.max_request_bytes, metrics)


def _explain(model: nn.Module, predictor: Predictor, image) -> dict[str, Any]:
    """Grad-CAM of the top class, drawn over the part of the photo the model sees (its centre crop)."""
    from resnetkit.evaluation.explain import gradcam, overlay

    x = predictor.to_tensor([image])
    with torch.no_grad():
        logits = model(x).float() / predictor.temperature
        probs = (logits.sigmoid() if predictor.multilabel else logits.softmax(1))[0]
    index = int(probs.argmax())
    heat = gradcam(model, x, class_idx=index)[0]
    view = _model_view(to_pil(image), predictor.preprocess)
    png = io.BytesIO()
    overlay(view, heat).save(png, format="PNG")
    return {
        "class": predictor.classes[index],
        "index": index,
        "prob": float(probs[index]),
        "overlay_png_base64": base64.b64encode(png.getvalue()).decode(),
    }


def _model_view(image, preprocess: dict[str, Any], max_side: int = 384):
    """The centre square the evaluation transform crops (resize shorter side, centre crop), at display size."""
    side = min(image.size) * preprocess["input_size"] / preprocess.get("resize", preprocess["input_size"])
    side = min(side, min(image.size))
    left, top = (image.width - side) / 2, (image.height - side) / 2
    crop = image.crop((round(left), round(top), round(left + side), round(top + side)))
    display = max(preprocess["input_size"], min(max_side, round(side)))
    return crop.resize((display, display))


def app_from_env():
    """uvicorn factory for `--workers N`: each worker process builds its app from the JSON config in the env."""
    config = ServeConfig(**json.loads(os.environ[CONFIG_ENV]))
    torch.set_num_threads(config.threads or 1)
    predictor, eager = load_predictor(config)
    return create_app(predictor, config, eager)


def serve(
    config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, log_level: str = "info"
) -> None:
    """Run the server until interrupted. Each worker is a process with its own model copy and torch threads."""
    import uvicorn

    if config.checkpoint and not Path(config.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint not found: {config.checkpoint}")
    # Workers x threads beyond the cores makes every thread wait for the others (10x slower on a busy 2-core box).
    config.threads = config.threads or max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(config.threads)
    if workers == 1:
        predictor, eager = load_predictor(config)
        app = create_app(predictor, config, eager)
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
        return
    os.environ[CONFIG_ENV] = json.dumps(asdict(config))
    os.environ.setdefault("OMP_NUM_THREADS", str(config.threads))
    uvicorn.run(
        "resnetkit.deploy.serve:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        timeout_graceful_shutdown=5,
        # A worker loading torch and its model on a busy machine misses uvicorn's default 5 s ping and is restarted.
        timeout_worker_healthcheck=60,
    )


__all__ = ["Metrics", "MicroBatcher", "ServeConfig", "create_app", "load_predictor", "serve"]
