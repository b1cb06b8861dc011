"""One image decoder for every path: the same awkward files (transparency, 16 bits, CMYK, palette with transparency,
greyscale, phone photos with an EXIF orientation) give identical model inputs through the training dataset's loader,
`resnetkit predict` and a real `resnetkit serve` on loopback; the rotated photos come out upright."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest
import torch
from _serving import free_port
from PIL import Image

from resnetkit.bundle import Bundle
from resnetkit.data import build_loader, preprocess_info
from resnetkit.data.image import decode_image
from resnetkit.deploy.predict import Predictor, predict_files

PREPROCESS = preprocess_info("imagenet", input_size=32)  # resize 37, centre crop 32: every path resizes


def upright(width: int = 24, height: int = 40) -> np.ndarray:
    """A portrait image: red on top, blue at the bottom, a green dot top left (shows any mirroring)."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[: height // 2] = (220, 30, 30)
    pixels[height // 2 :] = (30, 30, 220)
    pixels[2:8, 2:8] = (30, 220, 30)
    return pixels


def awkward_files(folder) -> dict[str, str]:
    """The files, and what each one must decode to."""
    folder.mkdir(parents=True)
    files = {}
    rgba = np.zeros((30, 30, 4), np.uint8)
    rgba[...] = (255, 0, 0, 64)  # a quarter-opaque red: on white, (255, 191, 191)
    Image.fromarray(rgba, "RGBA").save(folder / "transparent.png")
    files["transparent.png"] = "pink"
    Image.fromarray(np.full((30, 30), 32896, np.uint16)).save(folder / "grey16.png")  # 16-bit mid-grey
    files["grey16.png"] = "grey"
    Image.new("CMYK", (30, 30), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)
    files["cmyk.jpg"] = "red"
    palette = Image.new("P", (30, 30), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.paste(0, (0, 0, 15, 30))
    palette.info["transparency"] = 0  # the left half transparent: white
    palette.save(folder / "palette_transparent.png", transparency=0)
    files["palette_transparent.png"] = "white-left"
    Image.new("L", (30, 30), 77).save(folder / "grey.png")
    files["grey.png"] = "grey77"
    photo = Image.fromarray(upright())
    for tag, stored in (
        (6, photo.transpose(Image.Transpose.ROTATE_90)),
        (8, photo.transpose(Image.Transpose.ROTATE_270)),
    ):
        exif = Image.Exif()
        exif[0x0112] = tag  # Orientation: how a viewer must turn the stored pixels to show the photo upright
        stored.save(folder / f"phone_exif{tag}.jpg", exif=exif, quality=95)
        files[f"phone_exif{tag}.jpg"] = "upright"
    return files


def test_decoded_pixels(tmp_path):
    folder = tmp_path / "train" / "odd"
    expected = awkward_files(folder)
    for name, kind in expected.items():
        x = decode_image(folder / name)
        assert x.dtype == torch.uint8 and x.shape[0] == 3, name
        centre = x[:, x.shape[1] // 2, x.shape[2] // 2].tolist()
        if kind == "pink":
            assert centre == pytest.approx([255, 191, 191], abs=1), name
        elif kind == "grey":
            assert centre == pytest.approx([128, 128, 128], abs=1), name  # scaled from 16 bits, not clipped
        elif kind == "red":
            assert centre[0] > 230 and centre[1] < 30 and centre[2] < 30, name
        elif kind == "white-left":
            assert x[:, 15, 3].tolist() == [255, 255, 255] and x[:, 15, 25].tolist() == [10, 200, 30], name
        elif kind == "grey77":
            assert centre == [77, 77, 77], name
        else:  # the phone photos: stored sideways, decoded upright (portrait, red on top, the dot top left)
            assert x.shape == (3, 40, 24), f"{name}: {tuple(x.shape)}"
            assert x[0, 10, 12] > 180 and x[2, 10, 12] < 80 and x[2, 30, 12] > 180, name
            assert x[1, 4, 4] > 180 and x[0, 4, 4] < 80, name


class Recorder(torch.nn.Module):
    """A stand-in classifier that keeps every batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.head = torch.nn.Linear(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return torch.zeros(len(x), 2)


def test_training_predict_and_serve_see_identical_inputs(tmp_path):
    import uvicorn

    from resnetkit.deploy.serve import ServeConfig, create_app

    expected = awkward_files(tmp_path / "data" / "val" / "odd")
    names = sorted(expected)
    files = [tmp_path / "data" / "val" / "odd" / n for n in names]

    # 1. The training pipeline's evaluation loader (the DataLoader path: per-sample transforms in a worker).
    loader = build_loader(tmp_path / "data", "val", preset=PREPROCESS, batch_size=3, train=False, workers=1)
    assert [p for p, _ in loader.dataset.samples] == [str(f) for f in files]
    trained = torch.cat([images for images, _ in loader])

    # 2. resnetkit predict's library loop.
    recorder = Recorder()
    predictor = Predictor(Bundle(recorder, PREPROCESS, ["a", "b"], "recorder"))
    records = predict_files(predictor, files, batch_size=4)
    assert all("error" not in r for r in records)
    predicted = torch.cat(recorder.seen)

    # 3. A real server on loopback, one image per request.
    recorder.seen.clear()
    config = ServeConfig(checkpoint="unused", max_batch=1, max_wait_ms=0)
    server = uvicorn.Server(uvicorn.Config(create_app(predictor, config), host="127.0.0.1", port=free_port()))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{server.config.port}/v1/predict"
        for f in files:
            reply = httpx.post(url, files={"files": (f.name, f.read_bytes())}, timeout=30)
            assert reply.status_code == 200, reply.text
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    served = torch.cat(recorder.seen)

    assert trained.shape == predicted.shape == served.shape == (len(files), 3, 32, 32)
    for i, name in enumerate(names):
        assert torch.equal(trained[i], predicted[i]), f"{name}: training and predict differ"
        assert torch.equal(trained[i], served[i]), f"{name}: training and serve differ"
    # ... and the input is what the decoder made of the file, through the evaluation transform.
    from resnetkit.data import eval_transform_from

    transform = eval_transform_from(PREPROCESS)
    for i, f in enumerate(files):
        assert torch.equal(trained[i], transform(decode_image(f))), f.name
