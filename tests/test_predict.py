"""`resnetkit predict` and the Predictor: checkpoints, weights files, folders, unreadable files, output formats."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from resnetkit.bundle import load_bundle
from resnetkit.checkpoint import save_checkpoint
from resnetkit.cli import main
from resnetkit.data import eval_transform_from, preprocess_info
from resnetkit.data.datasets import imagenet_classes
from resnetkit.data.image import BadImageError, ImageTooLarge, decode_image
from resnetkit.deploy.predict import Predictor
from resnetkit.models import create_model

CLASSES = ["red", "green", "blue"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: two per process on a 2-core machine shared with other test runs wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A randomly initialised resnet20 (CIFAR preset, 32 px) saved the way `resnetkit train` saves one."""
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=len(CLASSES))
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "model_name": "resnet20",
            "model_kwargs": {"num_classes": len(CLASSES)},
            "classes": CLASSES,
            "preprocess": preprocess_info("cifar"),
            "version": "test",
        },
    )
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Five small photos-like images (different sizes and modes) in a tree, plus one broken file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    for i, (size, mode) in enumerate(
        [((40, 30), "RGB"), ((32, 32), "L"), ((50, 64), "RGBA"), ((33, 47), "P"), ((64, 64), "RGB")]
    ):
        array = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(array).convert(mode)
        folder = root / "sub" if i % 2 else root
        image.save(folder / f"img{i}.png")
    (root / "broken.jpg").write_bytes(b"this is not a jpeg")
    (root / "notes.txt").write_text("ignored: not an image suffix")
    return root


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["predict", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_folder_json_reports_broken_file_and_continues(checkpoint, image_folder, capsys):
    code, out, err = run_cli(
        capsys, "--checkpoint", checkpoint, image_folder, "--top-k", "2", "--format", "json", "--batch-size", "2"
    )
    assert code == 1  # one file could not be read
    results = json.loads(out)
    files = sorted(str(p) for p in image_folder.rglob("*") if p.suffix in (".png", ".jpg"))
    assert sorted(r["file"] for r in results) == files
    broken = [r for r in results if r["file"].endswith("broken.jpg")]
    assert len(broken) == 1 and "not an image" in broken[0]["error"]
    assert "broken.jpg" in err
    for r in results:
        if "error" in r:
            continue
        probs = [p["prob"] for p in r["top_k"]]
        assert len(probs) == 2 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5
        assert all(p["class"] == CLASSES[p["index"]] for p in r["top_k"])


def test_predict_matches_model_and_batch_size_does_not_matter(checkpoint, image_folder, capsys):
    paths = sorted(image_folder.rglob("*.png"))
    outs = []
    for batch in ("1", "4"):
        code, out, _ = run_cli(
            capsys, "--checkpoint", checkpoint, *paths, "--top-k", "3", "--format", "json", "--batch-size", batch
        )
        assert code == 0
        outs.append({r["file"]: r["top_k"] for r in json.loads(out)})
    assert outs[0].keys() == outs[1].keys()
    for f in outs[0]:
        for a, b in zip(outs[0][f], outs[1][f]):
            assert a["index"] == b["index"] and a["prob"] == pytest.approx(b["prob"], abs=1e-5)
    # The same numbers by hand: the checkpoint's model on the checkpoint's evaluation transform.
    ckpt = torch.load(checkpoint, weights_only=True)
    model = create_model("resnet20", num_classes=3)
    model.load_state_dict(ckpt["model"])
    transform = eval_transform_from(ckpt["preprocess"])
    with torch.no_grad():
        probs = model.eval()(torch.stack([transform(decode_image(p)) for p in paths])).softmax(1)
    for p, row in zip(paths, probs):
        top = outs[0][str(p)][0]
        assert top["index"] == int(row.argmax()) and top["prob"] == pytest.approx(float(row.max()), abs=1e-5)


def test_predict_csv_and_table(checkpoint, image_folder, capsys):
    code, out, _ = run_cli(
        capsys,
        "--checkpoint",
        checkpoint,
        image_folder / "img0.png",
        image_folder / "broken.jpg",
        "--format",
        "csv",
        "--top-k",
        "3",
    )
    assert code == 1
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["rank"] for r in rows if r["file"].endswith("img0.png")] == ["1", "2", "3"]
    assert [r["error"] != "" for r in rows if r["file"].endswith("broken.jpg")] == [True]
    code, out, _ = run_cli(capsys, "--checkpoint", checkpoint, image_folder / "img0.png")
    assert code == 0 and "img0.png" in out and any(c in out for c in CLASSES)


def test_predict_model_with_weights_file(checkpoint, image_folder, tmp_path, capsys):
    """--model NAME --weights FILE: a bare state dict and a .safetensors file give the checkpoint's numbers."""
    from safetensors.torch import save_file

    state = torch.load(checkpoint, weights_only=True)["model"]
    torch.save(state, tmp_path / "bare.pt")
    save_file(state, str(tmp_path / "w.safetensors"))
    image = image_folder / "img0.png"
    _, ref, _ = run_cli(capsys, "--checkpoint", checkpoint, image, "--format", "json")
    for weights in ("bare.pt", "w.safetensors", "../" + checkpoint.parent.name + "/model.pt"):
        code, out, _ = run_cli(
            capsys, "--model", "resnet20", "--weights", tmp_path / weights, image, "--format", "json"
        )
        assert code == 0
        got, want = json.loads(out)[0]["top_k"], json.loads(ref)[0]["top_k"]
        assert [p["index"] for p in got] == [p["index"] for p in want]
    # A bare state dict has no class names or preprocessing: numbered classes and its family's preset (cifar, 32 px).
    predictor = Predictor(load_bundle(model="resnet20", weights=str(tmp_path / "bare.pt")))
    assert predictor.classes == ["0", "1", "2"] and predictor.input_size == 32
    assert predictor.preprocess["preset"] == "cifar"


def test_thousand_class_weights_get_imagenet_names(tmp_path, image_folder):
    torch.save(create_model("resnet20", num_classes=1000).state_dict(), tmp_path / "w.pt")
    predictor = Predictor(load_bundle(model="resnet20", weights=str(tmp_path / "w.pt")))
    assert predictor.classes == imagenet_classes()
    (top,) = predictor.predict([decode_image(image_folder / "img0.png")], top_k=3)
    assert len(top) == 3 and all(name in predictor.classes for name, _ in top)


def test_predict_bad_arguments_give_one_line(checkpoint, tmp_path, capsys):
    code, _, err = run_cli(capsys, "--model", "resnet20", tmp_path)
    assert code == 2 and "--weights" in err
    code, _, err = run_cli(capsys, "--checkpoint", checkpoint, tmp_path / "missing.jpg")
    assert code == 2 and "missing.jpg" in err and "Traceback" not in err
    (tmp_path / "a.png").write_bytes(b"")
    code, _, err = run_cli(capsys, "--checkpoint", tmp_path / "nope.pt", tmp_path)
    assert code == 2 and "nope.pt" in err
    code, _, err = run_cli(capsys, "--checkpoint", checkpoint, tmp_path / "a.png")
    assert code == 1 and "a.png" in err


class _Payload:
    """Unpickling this runs code: it creates the file named in its state."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoints_are_never_unpickled(checkpoint, tmp_path, capsys):
    """A checkpoint carrying a pickled object is refused by weights_only loading, and its code does not run."""
    state = torch.load(checkpoint, weights_only=True)
    state["config"] = _Payload(tmp_path / "pwned")
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt"):
        load_bundle(tmp_path / "evil.pt")
    code, _, err = run_cli(capsys, "--checkpoint", tmp_path / "evil.pt", checkpoint)  # any existing file as input
    assert code == 2 and "evil.pt" in err and "refusing to read" in err
    assert "weights_only" not in err and len(err.strip().splitlines()) == 1  # resnetkit's own one-line refusal
    assert not (tmp_path / "pwned").exists()


def test_open_image_refuses_bombs_before_decoding(tmp_path):
    big = Image.new("L", (3000, 2000))
    big.save(tmp_path / "big.png")
    with pytest.raises(ImageTooLarge, match="6,000,000 pixels"):
        decode_image(tmp_path / "big.png", max_pixels=1_000_000)
    assert decode_image(tmp_path / "big.png").shape == (3, 2000, 3000)  # under the default limit
    with pytest.raises(BadImageError, match="upload"):
        decode_image(b"\x89PNG\r\n\x1a\n garbage")


def test_imagenet_class_names_match_the_sample_labels(imagenet_sample):
    names = imagenet_classes()
    assert len(names) == 1000 and names[0] == "tench"
    with open(imagenet_sample / "labels.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for row in rows:
        from_file = row["file"].split("_", 1)[1].rsplit(".", 1)[0].replace("_", " ")
        assert names[int(row["class_index"])].lower() == from_file.lower()
