"""resnetkit.evaluation.evaluate and the eval / report / explain commands, end to end on a tiny checkpoint and an image
folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from sklearn.metrics import accuracy_score, confusion_matrix, log_loss

from resnetkit import create_model, evaluate
from resnetkit.checkpoint import save_checkpoint
from resnetkit.cli import main
from resnetkit.data import build_dataset, eval_transform_from, preprocess_info
from resnetkit.evaluation.figures import DPI, confusion_figsize, misclassified_figsize

CLASSES = ["apple", "banana", "cherry", "date"]
PALETTE = np.array([[200, 40, 40], [230, 210, 50], [120, 20, 60], [90, 60, 30]], dtype=np.float64)


@pytest.fixture(autouse=True)
def one_thread():
    # On a machine shared with other test runs, two intra-op threads spin against each other: one is ~10x faster.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_folder(root: Path, per_class: dict[str, dict[str, int]], seed: int = 0) -> Path:
    """An ImageFolder (root/split/class/i.png) of 32 px noise images, each with one square in its class colour."""
    rng = np.random.default_rng(seed)
    for split, counts in per_class.items():
        for name, count in counts.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.normal(128, 30, (32, 32, 3))
                r, c = rng.integers(0, 24, 2)
                pixels[r : r + 8, c : c + 8] = PALETTE[CLASSES.index(name)]
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def make_run(run: Path, data: Path, steps: int = 12) -> Path:
    """A run folder as training leaves it: best.pt (design.md's keys), config.yaml, metrics.jsonl, curves.png."""
    from resnetkit.train.monitor import plot_curves

    preprocess = preprocess_info("cifar")
    dataset = build_dataset(data, "train", transform=eval_transform_from(preprocess))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor(dataset.targets)
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=len(CLASSES))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    config = {
        "name": run.name,
        "seed": 0,
        "model": {"name": "resnet20", "options": {}},
        "data": {"name": str(data), "preset": "cifar", "batch_size": 16},
        "optim": {"name": "adam", "lr": 3e-3},
        "schedule": {"name": "cosine"},
        "train": {"epochs": 2},
    }
    rows = []
    for epoch in range(2):
        for step in range(steps // 2):
            batch = torch.randint(0, len(labels), (16,), generator=torch.Generator().manual_seed(step))
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        rows.append(
            {
                "epoch": epoch + 1,
                "train_loss": loss.item(),
                "val_loss": loss.item() + 0.1,
                "train_acc": 0.5 + epoch / 4,
                "val_acc": 0.4 + epoch / 4,
                "lr": 3e-3 / (1 + epoch),
                "epoch_time_s": 1.25,
            }
        )
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    plot_curves(rows, run / "curves.png", title=run.name)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    save_checkpoint(
        run / "best.pt",
        {
            "model": model.state_dict(),
            "model_name": "resnet20",
            "model_kwargs": {"num_classes": len(CLASSES)},
            "classes": CLASSES,
            "preprocess": preprocess,
            "config": config,
            "epoch": 2,
            "step": 0,
            "metrics": {},
            "version": "test",
        },
    )
    return run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    torch.set_num_threads(1)
    # 23 test images (uneven per class, odd in all) so that two ranks get shards of different sizes.
    data = make_folder(root / "data", {"train": {c: 12 for c in CLASSES}, "test": dict(zip(CLASSES, [7, 5, 6, 5]))})
    run = make_run(root / "runs" / "tiny", data)
    return {"root": root, "data": data, "run": run, "checkpoint": run / "best.pt"}


def _shifted(x: torch.Tensor, by: int) -> torch.Tensor:
    """x moved by `by` pixels down and right (negative: up and left), its borders mirrored (reflect: -1 -> 1)."""
    size = x.shape[-1]
    index = [
        abs(i - by) if i - by < 0 else (2 * (size - 1) - (i - by) if i - by >= size else i - by) for i in range(size)
    ]
    return x[..., index, :][..., index]


def _reference(checkpoint: Path, data: Path, tta: str | None = None):
    """Probabilities computed by hand, image by image, for the test split."""
    from resnetkit.bundle import load_bundle

    bundle = load_bundle(checkpoint)
    model = bundle.model
    dataset = build_dataset(data, "test", transform=eval_transform_from(bundle.preprocess))
    with torch.no_grad():
        x = torch.stack([dataset[i][0] for i in range(len(dataset))])
        probs = model(x).softmax(1)
        if tta == "flip":
            probs = (probs + model(x.flip(-1)).softmax(1)) / 2
        if tta == "flip-translate":  # airbench's: 1/4 the image and its mirror, 1/8 each shifted one and mirrored
            probs = (probs + model(x.flip(-1)).softmax(1)) / 4
            for view in (_shifted(x, 1), _shifted(x, -1)):
                probs += (model(view).softmax(1) + model(view.flip(-1)).softmax(1)) / 8
    probs = probs.double()
    return (probs / probs.sum(1, keepdim=True)).numpy(), np.array(dataset.targets)


def assert_png(path: Path, size: tuple[int, int] | None = None, min_std: float = 10.0) -> None:
    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as image:
        if size is not None:
            assert image.size == size, f"{path.name}: {image.size} != {size}"
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.std() > min_std, f"{path.name} looks blank (pixel std {pixels.std():.1f})"


def _inches_to_px(size: tuple[float, float]) -> tuple[int, int]:
    return round(size[0] * DPI), round(size[1] * DPI)


@pytest.mark.parametrize("tta", [None, "flip", "flip-translate"])
def test_evaluate_matches_reference_predictions(tiny, tta, tmp_path):
    result = evaluate(tiny["checkpoint"], split="test", tta=tta, out_dir=tmp_path, workers=0, batch_size=5)
    probs, y = _reference(tiny["checkpoint"], tiny["data"], tta)
    pred = probs.argmax(1)
    labels = list(range(len(CLASSES)))
    assert result["num_samples"] == 23 and result["classes"] == CLASSES and result["tta"] == tta
    assert result["top1"] == pytest.approx(accuracy_score(y, pred))
    assert result["loss"] == pytest.approx(log_loss(y, probs, labels=labels), rel=1e-5)
    np.testing.assert_array_equal(result["confusion_matrix"], confusion_matrix(y, pred, labels=labels))
    assert json.loads((tmp_path / "eval.json").read_text())["top1"] == result["top1"]
    rows = (tmp_path / "confusion_matrix.csv").read_text().splitlines()
    assert rows[0].split(",")[1:] == CLASSES and len(rows) == 5


def test_eval_command_writes_every_output(tiny, capsys):
    out = tiny["root"] / "cli-eval"
    assert main(["eval", "--checkpoint", str(tiny["checkpoint"]), "--out", str(out), "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed and "banana" in printed and "ECE" in printed
    result = json.loads((out / "eval.json").read_text())
    for key in (
        "top1",
        "top5",
        "loss",
        "precision_macro",
        "recall_weighted",
        "f1_macro",
        "ece",
        "per_class",
        "confusion_matrix",
        "calibration",
        "misclassified",
        "top_confusions",
    ):
        assert key in result
    assert_png(out / "confusion_matrix.png", _inches_to_px(confusion_figsize(len(CLASSES))))
    assert_png(out / "reliability.png", (550, 600))
    wrong = len(result["misclassified"])
    assert wrong == round((1 - result["top1"]) * 23) or wrong == 25
    assert_png(out / "misclassified.png", _inches_to_px(misclassified_figsize(wrong)))


def test_bare_model_with_weights_matches_checkpoint(tiny, tmp_path, capsys):
    ckpt = torch.load(tiny["checkpoint"], weights_only=True)
    weights = tmp_path / "resnet20.pth"
    torch.save(ckpt["model"], weights)
    out = tmp_path / "bare"
    args = [
        "eval",
        "--model",
        "resnet20",
        "--weights",
        str(weights),
        "--data",
        str(tiny["data"]),
        "--out",
        str(out),
        "--workers",
        "0",
        "--json",
    ]
    assert main(args) == 0
    bare = json.loads(capsys.readouterr().out)
    reference = evaluate(tiny["checkpoint"], workers=0)
    assert bare["classes"] == CLASSES and bare["model"] == "resnet20" and bare["checkpoint"] is None
    assert bare["confusion_matrix"] == reference["confusion_matrix"]
    assert bare["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    assert (out / "misclassified.png").is_file()


def test_eval_and_predict_of_the_same_bare_weights_agree(tiny, tmp_path, capsys):
    """One rule for a bare model's preprocessing: `eval` and `predict` on the same weights and images give the same
    predictions (resnet20, a CIFAR-family model: the cifar preset at 32 px for both)."""
    weights = tmp_path / "w.pth"
    torch.save(torch.load(tiny["checkpoint"], weights_only=True)["model"], weights)
    bare = ["--model", "resnet20", "--weights", str(weights)]
    assert main(["eval", *bare, "--data", str(tiny["data"]), "--out", str(tmp_path / "e"), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["preprocess"]["preset"] == "cifar"
    test_dir = tiny["data"] / "test"
    assert main(["predict", *bare, str(test_dir), "--format", "json", "--top-k", "1"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    confusion = np.zeros((len(CLASSES), len(CLASSES)), dtype=int)
    for record in predicted:
        truth = CLASSES.index(Path(record["file"]).parent.name)
        confusion[truth, record["top_k"][0]["index"]] += 1
    assert len(predicted) == evaluated["num_samples"] == 23
    assert confusion.tolist() == evaluated["confusion_matrix"]


def test_subset_of_classes_is_matched_by_name(tiny, tmp_path):
    data = make_folder(tmp_path / "subset", {"test": {"cherry": 3, "banana": 2}}, seed=1)
    result = evaluate(tiny["checkpoint"], data, workers=0)
    assert result["num_samples"] == 5 and result["num_classes"] == 4
    support = {row["class"]: row["support"] for row in result["per_class"]}
    assert support == {"apple": 0, "banana": 2, "cherry": 3, "date": 0}


def test_bad_input_gives_one_line_errors(tiny, tmp_path, capsys):
    unknown = make_folder(tmp_path / "unknown", {"test": {"apple": 1}}, seed=2)
    (unknown / "test" / "apple").rename(unknown / "test" / "kiwi")
    cases = [
        (["eval", "--checkpoint", str(tmp_path / "missing.pt")], "checkpoint not found"),
        (["eval", "--checkpoint", str(tiny["checkpoint"]), "--data", str(unknown)], "'kiwi' are not among"),
        (["eval", "--model", "resnet20", "--data", str(tiny["data"])], "--model needs --weights"),
        (
            ["eval", "--model", "resnet20", "--weights", str(tmp_path / "none.pth"), "--data", str(tiny["data"])],
            "not found",
        ),
        (["explain", "--checkpoint", str(tiny["checkpoint"]), str(tmp_path / "nope.png")], "does not exist"),
        (
            [
                "explain",
                "--checkpoint",
                str(tiny["checkpoint"]),
                "--layer",
                "layer9",
                str(tiny["data"] / "test" / "apple" / "0.png"),
                "--out",
                str(tmp_path / "x"),
            ],
            "'layer9' not found",
        ),
        (["report", str(tmp_path / "no-run")], "run folder not found"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_explain_command_writes_labelled_overlays(tiny, capsys):
    out = tiny["root"] / "explain"
    images = [tiny["data"] / "test" / "apple" / "0.png", tiny["data"] / "test" / "date" / "1.png"]
    argv = ["explain", "--checkpoint", str(tiny["checkpoint"]), *map(str, images), "--top-k", "2", "--out", str(out)]
    assert main(argv) == 0
    records = json.loads((out / "explain.json").read_text())
    assert [Path(r["image"]).name for r in records] == ["0.png", "1.png"]
    for record in records:
        probs = [entry["probability"] for entry in record["top_k"]]
        assert len(probs) == 2 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert {entry["class"] for entry in record["top_k"]} <= set(CLASSES)
        assert_png(Path(record["output"]), (780, 300))  # 3 panels of 2.6 x 3.0 inches at 100 dpi
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and all("_gradcam.png" in line for line in printed)


def test_report_command_embeds_everything(tiny, capsys):
    assert main(["report", str(tiny["run"])]) == 0
    printed = capsys.readouterr().out
    html_path, md_path = tiny["run"] / "report.html", tiny["run"] / "report.md"
    assert str(html_path) in printed
    html = html_path.read_text()
    assert html.count("data:image/png;base64,") == 4  # curves, confusion matrix, reliability, misclassified
    md = md_path.read_text()
    for name in ("curves.png", "eval/confusion_matrix.png", "eval/reliability.png", "eval/misclassified.png"):
        assert f"]({name})" in md and (tiny["run"] / name).is_file()


def test_eval_command_is_exact_under_ddp(tiny, tmp_path):
    """`resnetkit eval` in two real processes with a real gloo process group, started as torchrun starts them (its
    environment variables; without the launcher process, one torch import less on a busy machine)."""
    out = tmp_path / "ddp"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
    }
    argv = [
        sys.executable,
        "-m",
        "resnetkit",
        "eval",
        "--checkpoint",
        str(tiny["checkpoint"]),
        "--out",
        str(out),
        "--workers",
        "0",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--json",
    ]
    procs = [
        subprocess.Popen(
            argv,
            env={**common, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr[-3000:]
    assert outputs[1][0] == "", "only rank 0 prints"
    result = json.loads(outputs[0][0])
    assert json.loads((out / "eval.json").read_text()) == result  # written once, by rank 0
    assert (out / "misclassified.png").is_file()

    single = evaluate(tiny["checkpoint"], split="test", workers=0)
    assert result["world_size"] == 2 and result["samples_per_rank"] == [12, 11]  # 23 = 12 + 11: no duplicates
    assert result["num_samples"] == single["num_samples"] == 23
    assert result["confusion_matrix"] == single["confusion_matrix"]
    for key in ("top1", "top5", "loss", "ece", "f1_macro", "precision_weighted", "recall_macro"):
        assert result[key] == pytest.approx(single[key], abs=1e-9), key
    assert [b["count"] for b in result["calibration"]] == [b["count"] for b in single["calibration"]]
    for key in ("confidence", "accuracy"):
        values = [(b[key], c[key]) for b, c in zip(result["calibration"], single["calibration"]) if b["count"]]
        assert [v for v, _ in values] == pytest.approx([v for _, v in values], abs=1e-9), key
    assert [m["confidence"] for m in result["misclassified"]] == pytest.approx(
        [m["confidence"] for m in single["misclassified"]], abs=1e-6
    )
