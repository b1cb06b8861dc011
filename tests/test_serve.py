"""`resnetkit serve`: the real server in a subprocess on a loopback port, spoken to over HTTP.

A resnet18 at 64 px is overfit in the test on six real ImageNet photos (one per class), so the right answers are
known; the server must give them, agree with `resnetkit predict`, refuse every bad input with a 4xx JSON error and
keep serving, hold up under concurrent load, and count it all in /metrics.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import struct
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from _serving import free_port, serving
from PIL import Image

from resnetkit.checkpoint import save_checkpoint
from resnetkit.cli import main
from resnetkit.data import eval_transform_from, preprocess_info
from resnetkit.data.image import decode_image
from resnetkit.deploy.serve import MicroBatcher
from resnetkit.models import create_model

PHOTOS = [
    "n01440764_tench",
    "n02089078_black-and-tan_coonhound",
    "n02325366_wood_rabbit",
    "n03018349_china_cabinet",
    "n03776460_mobile_home",
    "n04326547_stone_wall",
]
MAX_REQUEST_MB = 2
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here and in the server: two threads per process on a busy 2-core machine wait on each other
    (measured 10x slower training with six other test runs beside this one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def photos(imagenet_sample) -> list[Path]:
    return [imagenet_sample / f"{name}.JPEG" for name in PHOTOS]


@pytest.fixture(scope="module")
def trained_checkpoint(photos, tmp_path_factory) -> Path:
    """A resnet18 at 64 px overfit on the six photos (until eval-mode predictions are all right)."""
    torch.manual_seed(0)
    preprocess = preprocess_info("imagenet", input_size=64)
    transform = eval_transform_from(preprocess)
    x = torch.stack([transform(decode_image(p)) for p in photos])
    y = torch.arange(len(photos))
    model = create_model("resnet18", num_classes=len(photos))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(200):
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 9:
            with torch.no_grad():
                if (model.eval()(x).argmax(1) == y).all():
                    break
    else:
        pytest.fail("the model did not learn six photos in 200 steps")
    classes = [p.stem.split("_", 1)[1].replace("_", " ") for p in photos]
    path = tmp_path_factory.mktemp("served") / "best.pt"
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "model_name": "resnet18",
            "model_kwargs": {"num_classes": len(photos)},
            "classes": classes,
            "preprocess": preprocess,
            "version": "test",
        },
    )
    return path


@pytest.fixture(scope="module")
def server(trained_checkpoint, tmp_path_factory):
    """`resnetkit serve` in a subprocess; yields its base URL; stops it afterwards."""
    args = [
        "--checkpoint",
        trained_checkpoint,
        "--batch-size",
        "8",
        "--max-wait-ms",
        "10",
        "--max-request-mb",
        str(MAX_REQUEST_MB),
        "--max-pixels",
        str(MAX_PIXELS),
        "--threads",
        "1",
        "--log-level",
        "warning",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with serving(args, tmp_path_factory.mktemp("serve") / "serve.log", env=env) as url:
        yield url


def post_images(url: str, paths_or_bytes, top_k: int = 5, field: str = "files") -> httpx.Response:
    files = []
    for item in paths_or_bytes:
        name, data = (item.name, item.read_bytes()) if isinstance(item, Path) else item
        files.append((field, (name, data, "application/octet-stream")))
    return httpx.post(f"{url}/v1/predict", params={"top_k": top_k}, files=files, timeout=60)


def test_server_predictions_are_right_and_match_predict_cli(server, photos, trained_checkpoint, capsys):
    assert main(["predict", "--checkpoint", str(trained_checkpoint), *map(str, photos), "--format", "json"]) == 0
    cli = {Path(r["file"]).name: r["top_k"] for r in json.loads(capsys.readouterr().out)}
    together = post_images(server, photos, top_k=3)
    assert together.status_code == 200, together.text
    assert [p["file"] for p in together.json()["predictions"]] == [p.name for p in photos]
    for label, photo in enumerate(photos):
        alone = post_images(server, [photo]).json()["predictions"][0]["top_k"]
        assert len(alone) == 5
        assert alone[0]["index"] == label == cli[photo.name][0]["index"]  # right, and the same as `predict`
        assert alone[0]["prob"] == pytest.approx(cli[photo.name][0]["prob"], abs=1e-4)
        batched = together.json()["predictions"][label]["top_k"]
        assert [p["index"] for p in batched] == [p["index"] for p in alone[:3]]


def test_model_info_health_and_openapi(server):
    info = httpx.get(f"{server}/v1/model").json()
    assert info["name"] == "resnet18" and info["input_size"] == 64 and info["num_classes"] == 6
    assert info["classes"][0] == "tench" and info["version"]
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    schema = httpx.get(f"{server}/openapi.json").json()
    assert {"/v1/predict", "/v1/explain", "/v1/model", "/health", "/metrics"} <= set(schema["paths"])
    assert "swagger" in httpx.get(f"{server}/docs").text.lower()


def test_explain_returns_gradcam_overlay_of_top_class(server, photos):
    response = httpx.post(f"{server}/v1/explain", files={"file": (photos[2].name, photos[2].read_bytes())}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["index"] == 2 and body["class"] == "wood rabbit"
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png_base64"])))
    assert overlay.format == "PNG" and overlay.width == overlay.height >= 64
    assert np.asarray(overlay).std() > 10  # a picture, not a blank


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares width x height pixels (a decompression bomb needs nothing more)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")
    )


def test_bad_inputs_get_4xx_json_and_the_server_keeps_serving(server, photos):
    jpeg = photos[0].read_bytes()
    big = io.BytesIO()
    Image.new("RGB", (1200, 1000), "white").save(big, format="PNG")  # 1.2 M pixels > 1 M, a small file
    half = io.BytesIO()
    Image.new("RGB", (800, 800), "white").save(half, format="PNG")  # 0.64 M pixels: one fits, two do not
    cases = {
        "body over the size limit": lambda: post_images(server, [("big.jpg", os.urandom(MAX_REQUEST_MB * 2**20 + 10))]),
        "bomb beyond PIL's own limit": lambda: post_images(server, [("bomb.png", png_header_only(100_000, 100_000))]),
        "image over the pixel limit": lambda: post_images(server, [("big.png", big.getvalue())]),
        "images together over the pixel limit": lambda: post_images(
            server, [("a.png", half.getvalue()), ("b.png", half.getvalue())]
        ),
        "not an image": lambda: post_images(server, [("notes.jpg", b"hello, I am text")]),
        "truncated jpeg": lambda: post_images(server, [("cut.jpg", jpeg[:300])]),
        "empty file": lambda: post_images(server, [("empty.jpg", b"")]),
        "missing field": lambda: httpx.post(f"{server}/v1/predict", data={"x": "1"}),
        "no body": lambda: httpx.post(f"{server}/v1/predict"),
        "wrong field name": lambda: post_images(server, [photos[0]], field="image"),
        "top_k zero": lambda: post_images(server, [photos[0]], top_k=0),
        "top_k not a number": lambda: httpx.post(f"{server}/v1/predict?top_k=abc", files={"files": ("a.jpg", jpeg)}),
        "json instead of multipart": lambda: httpx.post(f"{server}/v1/predict", json={"files": "a.jpg"}),
        "explain without file": lambda: httpx.post(f"{server}/v1/explain", files={"files": ("a.jpg", jpeg)}),
        "explain with text": lambda: httpx.post(f"{server}/v1/explain", files={"file": ("a.jpg", b"text")}),
        "wrong method": lambda: httpx.get(f"{server}/v1/predict"),
        "unknown path": lambda: httpx.get(f"{server}/v2/predict"),
    }
    expected = {
        "body over the size limit": 413,
        "bomb beyond PIL's own limit": 413,
        "image over the pixel limit": 413,
        "images together over the pixel limit": 413,
        "not an image": 415,
        "truncated jpeg": 415,
        "empty file": 415,
        "wrong method": 405,
        "unknown path": 404,
    }
    for what, request in cases.items():
        response = request()
        assert 400 <= response.status_code < 500, f"{what}: {response.status_code} {response.text[:200]}"
        if what in expected:
            assert response.status_code == expected[what], f"{what}: {response.status_code} {response.text[:200]}"
        error = response.json()["error"]
        assert isinstance(error, str) and error, what
        still = post_images(server, [photos[1]])  # the server is still serving, and still right
        assert still.status_code == 200 and still.json()["predictions"][0]["top_k"][0]["index"] == 1, what
    assert "1200x1000" in post_images(server, [("big.png", big.getvalue())]).json()["error"]


def test_chunked_oversize_upload_and_thin_images(server, photos):
    """A body with no Content-Length is counted while it streams; a 60000x1 image is classified, not blown up to
    gigabytes by the resize."""

    def stream():
        yield b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\n'
        for _ in range(MAX_REQUEST_MB * 4):
            yield b"\0" * 2**20

    response = httpx.post(
        f"{server}/v1/predict",
        content=stream(),
        headers={"content-type": "multipart/form-data; boundary=xyz"},
        timeout=60,
    )
    assert response.status_code == 413 and "limit" in response.json()["error"]
    thin = io.BytesIO()
    Image.new("RGB", (60000, 1), "gray").save(thin, format="PNG")
    response = post_images(server, [("thin.png", thin.getvalue())])
    assert response.status_code == 200 and len(response.json()["predictions"][0]["top_k"]) == 5
    assert post_images(server, [photos[3]]).json()["predictions"][0]["top_k"][0]["index"] == 3


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value}; every sample line must parse."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_]+="[^"]*",?)*\})? (\S+)', line)
        assert match, f"not a Prometheus sample line: {line!r}"
        samples[match[1] + (match[2] or "")] = float(match[3])
    return samples


def test_load_micro_batches_and_metrics(server, photos):
    """A few hundred requests from 8 concurrent clients: no errors; /metrics counts them all."""
    before = parse_metrics(httpx.get(f"{server}/metrics").text)
    payloads = [(p.name, p.read_bytes()) for p in photos]
    latencies, statuses = [], []

    async def client(i: int, n: int, http: httpx.AsyncClient):
        for j in range(n):
            name, data = payloads[(i + j) % len(payloads)]
            start = time.perf_counter()
            response = await http.post(f"{server}/v1/predict", files={"files": (name, data)}, params={"top_k": 1})
            latencies.append(time.perf_counter() - start)
            statuses.append(response.status_code)
            assert response.json()["predictions"][0]["top_k"][0]["index"] == (i + j) % len(payloads)

    async def run():
        async with httpx.AsyncClient(timeout=60) as http:
            await asyncio.gather(*(client(i, 30, http) for i in range(8)))

    asyncio.run(run())
    assert statuses == [200] * 240
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
    print(f"\nload test: 240 requests from 8 clients, p50 {p50:.0f} ms, p99 {p99:.0f} ms")

    after = parse_metrics(httpx.get(f"{server}/metrics").text)
    key = 'resnetkit_requests_total{endpoint="/v1/predict",status="200"}'
    assert after[key] - before.get(key, 0) == 240
    images = after["resnetkit_images_total"] - before["resnetkit_images_total"]
    batches = after["resnetkit_batch_size_count"] - before["resnetkit_batch_size_count"]
    assert images == 240 and 1 <= batches <= 240
    assert after["resnetkit_batch_size_sum"] - before["resnetkit_batch_size_sum"] == images
    # Histograms are cumulative and end at the count.
    buckets = [
        v for k, v in after.items() if k.startswith('resnetkit_request_latency_seconds_bucket{endpoint="/v1/predict"')
    ]
    assert (
        buckets == sorted(buckets)
        and buckets[-1] == after['resnetkit_request_latency_seconds_count{endpoint="/v1/predict"}']
    )
    print(f"micro-batches: {batches:.0f} model calls for {images:.0f} images")


def test_micro_batcher_groups_concurrent_requests():
    """Eight images submitted together with max_batch 4 become two model calls, each result going to its caller."""
    from concurrent.futures import ThreadPoolExecutor

    calls = []

    def run_batch(batch: torch.Tensor) -> torch.Tensor:
        calls.append(len(batch))
        return batch.flatten(1).sum(1)

    async def scenario():
        with ThreadPoolExecutor(1) as executor:
            batcher = MicroBatcher(run_batch, max_batch=4, max_wait_ms=1000, executor=executor)
            batcher.start()
            results = await asyncio.gather(*(batcher.submit(torch.full((1, 2, 2), float(i))) for i in range(8)))
            await batcher.stop()
        return results

    results = asyncio.run(scenario())
    assert calls == [4, 4]
    assert [float(r) for r in results] == [4.0 * i for i in range(8)]


def test_serve_refuses_a_missing_checkpoint(tmp_path, capsys):
    assert main(["serve", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err


@pytest.fixture(scope="module")
def chromium() -> str:
    path = "/usr/bin/chromium"
    if not Path(path).exists():
        if os.environ.get("RESNETKIT_REQUIRE_DATA") == "1":
            pytest.fail("chromium is required in CI (apt-get install chromium; .ci/run does it)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return path


def test_web_page_shows_bars_and_overlay(server, photos, chromium, tmp_path):
    """The page in headless Chromium: choose (then drop) a photo, the top-5 bars and the Grad-CAM overlay appear."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 620})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server + "/")
            page.wait_for_function("document.getElementById('model-info').textContent.includes('resnet18')")
            page.set_input_files("#file", str(photos[4]))
            page.wait_for_selector("#bars li", timeout=60_000)
            page.wait_for_function("document.getElementById('overlay').naturalWidth > 0", timeout=60_000)
            labels = page.locator("#bars .label").all_text_contents()
            widths = page.locator("#bars .fill").evaluate_all("els => els.map(e => e.getBoundingClientRect().width)")
            page.screenshot(path=str(tmp_path / "web.png"))
            if os.environ.get("RESNETKIT_WEB_SCREENSHOT"):
                page.screenshot(path=os.environ["RESNETKIT_WEB_SCREENSHOT"])
            # Dropping a file on the drop zone works the same way.
            page.evaluate(
                """([name, b64]) => {
                    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                    const transfer = new DataTransfer();
                    transfer.items.add(new File([bytes], name, { type: "image/jpeg" }));
                    const drop = document.getElementById("drop");
                    const event = new DragEvent("drop", { dataTransfer: transfer, cancelable: true });
                    drop.dispatchEvent(event);
                }""",
                [photos[0].name, base64.b64encode(photos[0].read_bytes()).decode()],
            )
            page.wait_for_function("document.querySelector('#bars .label')?.textContent === 'tench'", timeout=60_000)
            page.wait_for_function(
                "document.getElementById('overlay-caption').textContent.includes('tench')", timeout=60_000
            )
        finally:
            browser.close()
    assert errors == []
    assert len(labels) == 5 and labels[0] == "mobile home"
    assert widths == sorted(widths, reverse=True) and widths[0] > 0
    assert Image.open(tmp_path / "web.png").size == (1100, 620)


class ThreadServer:
    """uvicorn serving an app object on a loopback port from a thread of this process."""

    def __init__(self, app):
        import threading

        import uvicorn

        self.url = f"http://127.0.0.1:{free_port()}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=int(self.url.rsplit(":", 1)[1]), log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        return self.url

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_onnxruntime_backend_agrees_with_torch(server, photos, trained_checkpoint, tmp_path):
    """--backend onnxruntime on the checkpoint (exported and checked on load), and on a bare exported .onnx file."""
    from resnetkit.deploy.export import export_model
    from resnetkit.deploy.serve import ServeConfig, create_app, load_predictor

    torch_answers = post_images(server, photos).json()["predictions"]
    checked = ServeConfig(checkpoint=str(trained_checkpoint), backend="onnxruntime", threads=1)
    predictor, eager = load_predictor(checked)
    assert type(predictor.model).__name__ == "OnnxRuntimeModel"
    onnx_path = tmp_path / "model.onnx"
    export_model(eager, onnx_path, "onnx", predictor.preprocess, predictor.classes, model_name="resnet18")
    bare = ServeConfig(checkpoint=str(onnx_path), backend="onnxruntime", threads=1)
    for config, (served, explainer) in ((checked, (predictor, eager)), (bare, load_predictor(bare))):
        with ThreadServer(create_app(served, config, explainer)) as url:
            info = httpx.get(f"{url}/v1/model").json()
            assert info["backend"] == "onnxruntime" and info["classes"] == predictor.classes
            answers = post_images(url, photos).json()["predictions"]
            for got, want in zip(answers, torch_answers):
                assert [p["index"] for p in got["top_k"]] == [p["index"] for p in want["top_k"]]
                assert got["top_k"][0]["prob"] == pytest.approx(want["top_k"][0]["prob"], abs=1e-4)
            cam = httpx.post(f"{url}/v1/explain", files={"file": (photos[0].name, photos[0].read_bytes())})
            if explainer is None:  # a bare ONNX file has no eager model to take gradients of
                assert cam.status_code == 501 and "Grad-CAM" in cam.json()["error"]
            else:
                assert cam.status_code == 200 and cam.json()["index"] == 0
    with pytest.raises(ValueError, match="--backend onnxruntime"):
        load_predictor(ServeConfig(checkpoint=str(onnx_path), backend="torch"))
