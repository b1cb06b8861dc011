"""The evaluation figures (10 and 200 classes) and the self-contained run report, built from real metric results
without a model: ClassificationMetrics on known logits, then the same writers `resnetkit eval` uses."""

from __future__ import annotations

import base64
import io
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from resnetkit.evaluation.evaluate import top_confusions, write_outputs
from resnetkit.evaluation.figures import DPI, confusion_figsize, misclassified_figsize, plot_confusion_matrix
from resnetkit.evaluation.metrics import ClassificationMetrics
from resnetkit.evaluation.report import write_report

PREPROCESS = {"preset": "cifar", "input_size": 16, "resize": 16, "mean": [0.5] * 3, "std": [0.25] * 3}


def _result(num_classes: int, n: int, seed: int = 0, keep_worst: int = 25):
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, num_classes, (n,), generator=generator)
    logits = torch.randn(n, num_classes, generator=generator) * 2
    logits[torch.arange(n), targets] += 3
    images = torch.randn(n, 3, 16, 16, generator=generator)
    metrics = ClassificationMetrics(num_classes, keep_worst=keep_worst)
    metrics.update(logits, targets, images)
    classes = [f"class {i:03d}" for i in range(num_classes)]
    result = {
        "checkpoint": "runs/x/best.pt",
        "model": "resnet20",
        "data": "synthetic",
        "split": "test",
        "tta": None,
        "num_classes": num_classes,
        "classes": classes,
        "preprocess": PREPROCESS,
        **metrics.compute(classes),
        "seconds": 1.5,
        "device": "cpu",
        "world_size": 1,
        "skipped": [],
    }
    result["top_confusions"] = top_confusions(result["confusion_matrix"], classes)
    worst = metrics.gathered_worst()
    result["misclassified"] = [{"true": classes[t], "predicted": classes[p], "confidence": c} for c, t, p, _ in worst]
    return result, worst


def _png(path_or_bytes) -> np.ndarray:
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64)


@pytest.mark.parametrize("num_classes", [10, 200])
def test_figures_have_expected_size_and_content(tmp_path, num_classes):
    result, worst = _result(num_classes, n=2000)
    write_outputs(result, worst, PREPROCESS, tmp_path)
    expected = {
        "confusion_matrix.png": confusion_figsize(num_classes),
        "reliability.png": (5.5, 6.0),
        "misclassified.png": misclassified_figsize(len(worst)),
    }
    for name, inches in expected.items():
        pixels = _png(tmp_path / name)
        assert pixels.shape[:2] == (round(inches[1] * DPI), round(inches[0] * DPI)), name
        assert pixels.std() > 10, f"{name} looks blank"
    assert len(worst) == 25
    rows = (tmp_path / "confusion_matrix.csv").read_text().splitlines()
    assert len(rows) == num_classes + 1
    assert [int(v) for v in rows[1].split(",")[1:]] == result["confusion_matrix"][0]
    assert json.loads((tmp_path / "eval.json").read_text())["num_classes"] == num_classes


def test_confusion_matrix_sorts_by_recall_and_shows_the_matrix(tmp_path):
    # class "c" is perfect, "a" is right half the time, "b" never: sorted by recall the diagonal reads c, a, b.
    confusion = [[5, 5, 0], [0, 0, 10], [0, 0, 10]]
    plot_confusion_matrix(confusion, ["a", "b", "c"], tmp_path / "cm.png")
    pixels = _png(tmp_path / "cm.png")
    assert pixels.std() > 10
    # Where the data is (the "Blues" cells), the darkest blue must exist: a cell at 100%.
    blue_dominant = (pixels[..., 2] - pixels[..., 0]) > 100
    assert blue_dominant.sum() > 1000


def test_no_mistakes_still_gives_a_readable_grid(tmp_path):
    result, worst = _result(3, n=30, keep_worst=25)
    perfect = torch.eye(3)[torch.arange(30) % 3] * 10
    metrics = ClassificationMetrics(3, keep_worst=25)
    metrics.update(perfect, torch.arange(30) % 3, torch.zeros(30, 3, 16, 16))
    assert metrics.gathered_worst() == []
    result.update(metrics.compute(result["classes"]))
    write_outputs(result, [], PREPROCESS, tmp_path)
    pixels = _png(tmp_path / "misclassified.png")  # the title and the "no misclassified images" note
    assert pixels.shape[:2] == (160, 500) and pixels.std() > 3


class _Resources(HTMLParser):
    """Collects every attribute that could load something: src, href, srcset, poster, data, and tags."""

    def __init__(self) -> None:
        super().__init__()
        self.references: list[tuple[str, str, str]] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "poster", "data", "action") and value is not None:
                self.references.append((tag, name, value))


def write_training_records(run: Path, rows: list[dict]) -> None:
    """metrics.jsonl and curves.png as training's RunLogger writes them (without its TensorBoard writer)."""
    from resnetkit.train.monitor import plot_curves

    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    plot_curves(rows, run / "curves.png", title=run.name)


def _make_run(run: Path) -> None:
    result, worst = _result(10, n=300)
    write_outputs(result, worst, PREPROCESS, run / "eval")
    rows = [
        {
            "epoch": e,
            "train_loss": 2.0 / e,
            "val_loss": 2.2 / e,
            "train_acc": 0.3 * e,
            "val_acc": 0.25 * e,
            "lr": 0.1 / e,
            "epoch_time_s": 60.0,
        }
        for e in (1, 2, 3)
    ]
    write_training_records(run, rows)
    config = {
        "name": run.name,
        "seed": 0,
        "model": {"name": "resnet20"},
        "data": {"name": "cifar10"},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "train": {"epochs": 3},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, Path]:
    run = tmp_path_factory.mktemp("report") / "runs" / "demo"
    _make_run(run)
    return write_report(run, evaluate_if_missing=False)


def test_report_is_self_contained(report):
    html_path, md_path = report
    html = html_path.read_text()
    parser = _Resources()
    parser.feed(html)
    assert not parser.tags & {"script", "link", "iframe", "object", "embed"}
    images = [value for tag, name, value in parser.references if tag == "img"]
    assert len(images) == 4 and len(parser.references) == 4  # curves, confusion, reliability, misclassified
    for uri in images:
        assert uri.startswith("data:image/png;base64,")
        assert _png(base64.b64decode(uri.split(",", 1)[1])).std() > 10
    assert not re.search(r"url\(|@import|https?://", html)
    # the content: recipe, per-class table, environment and wall time
    assert "sgd lr 0.1 momentum 0.9" in html and "class 009" in html and "torch" in html
    assert "3m 00s" in html  # three epochs of 60 s
    md = md_path.read_text()
    assert "| class 009 |" in md and "![confusion matrix](eval/confusion_matrix.png)" in md
    assert "3m 00s" in md


def test_report_without_evaluation_says_what_to_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match="neither eval/eval.json nor best.pt"):
        write_report(run)
    (run / "eval").mkdir()
    (run / "eval" / "eval.json").write_text("{not json")
    with pytest.raises(ValueError, match="eval.json: not valid JSON"):
        write_report(run)


def test_report_opens_in_a_browser_from_the_file_alone(report, tmp_path):
    """Headless Chromium loads report.html from disk with every network request refused: all images render."""
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        if os.environ.get("RESNETKIT_REQUIRE_DATA") == "1":
            pytest.fail("chromium is required in CI (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    html_path, _ = report
    requested: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})

            def only_the_file(route):
                if route.request.url == html_path.as_uri():
                    return route.continue_()
                requested.append(route.request.url)
                return route.abort()

            page.route("**/*", only_the_file)
            page.goto(html_path.as_uri(), wait_until="load")
            widths = page.locator("img").evaluate_all("els => els.map(e => e.complete ? e.naturalWidth : 0)")
            title = page.title()
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert title == "resnetkit report: demo"
    assert len(widths) == 4 and min(widths) > 100, widths
    assert requested == [], f"the report asked for {requested}"
