"""Temperature scaling: `resnetkit calibrate` on an over-confident classifier trained on real CIFAR-10 JPEGs lowers
its validation ECE and keeps its top-1; the temperature travels in the checkpoint, the bundle, predict, an ONNX
export, eval and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from resnetkit.bundle import load_bundle, read_metadata
from resnetkit.checkpoint import load_checkpoint, save_checkpoint
from resnetkit.cli import main
from resnetkit.data import build_dataset, eval_transform_from
from resnetkit.data.image import decode_image
from resnetkit.deploy.predict import Predictor
from resnetkit.evaluation.calibrate import fit_temperature, nll

CLASSES = ["airplane", "automobile", "frog", "ship"]
SCALE = 6.0  # the head's weights and bias times this: every logit times 6, far more confident, the same argmax
# The classifier fixture's resnet20 (3 epochs on 240 images) is over-confident by itself: its own best temperature
# is about 9 here and was near 17 on a CI run, so its head is scaled by less, to keep the optimum well inside the
# search range (an optimum at the range's edge is not a minimum).
CLASSIFIER_SCALE = 3.0


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(cifar10_jpg, tmp_path_factory):
    """A resnet20 trained by the engine for 3 epochs on 240 real CIFAR-10 JPEGs (4 classes, no label smoothing),
    validated on 160 test JPEGs; its head then scaled by CLASSIFIER_SCALE. Returns the run folder, with the
    over-confident checkpoint saved as overconfident.pt and best.pt calibrated in place by `resnetkit calibrate`."""
    import resnetkit

    root = tmp_path_factory.mktemp("calibrate")
    data = root / "data"
    for split, n in (("train", 60), ("test", 40)):
        for name in CLASSES:
            (data / split / name).mkdir(parents=True)
            for i in range(n):
                (data / split / name / f"{i:04d}.jpg").symlink_to(cifar10_jpg / split / name / f"{i:04d}.jpg")
    torch.set_num_threads(1)
    result = resnetkit.train(
        {
            "name": "cal",
            "output_dir": str(root),
            "model": {"name": "resnet20"},
            "data": {"name": str(data), "val_split": "test", "batch_size": 32, "cache_dir": str(root / "cache")},
            "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            "train": {"epochs": 3, "threads": 1, "log_images": False, "log_every_s": 60},
        },
        quiet=True,
    )
    best = result.best_checkpoint
    bundle = load_bundle(best)
    head = bundle.module.get_classifier()
    with torch.no_grad():
        head.weight.mul_(CLASSIFIER_SCALE)
        head.bias.mul_(CLASSIFIER_SCALE)
    save_checkpoint(best, {**bundle.checkpoint, "model": bundle.module.state_dict()})
    save_checkpoint(root / "cal" / "overconfident.pt", {**bundle.checkpoint, "model": bundle.module.state_dict()})
    assert main(["calibrate", "--checkpoint", str(best), "--workers", "0", "--json"]) == 0
    return {"dir": root / "cal", "data": data, "best": best, "original": root / "cal" / "overconfident.pt"}


@pytest.fixture(scope="module")
def exported(run):
    """`resnetkit export` of the calibrated checkpoint to ONNX."""
    onnx = run["dir"].parent / "export" / "model.onnx"
    assert main(["export", "--checkpoint", str(run["best"]), "--format", "onnx", "--out", str(onnx)]) == 0
    return onnx


def _test_logits(checkpoint, data):
    """Logits of the test images computed here, image by image through the bundle's evaluation transform."""
    bundle = load_bundle(checkpoint)
    dataset = build_dataset(data, "test", transform=eval_transform_from(bundle.preprocess))
    with torch.no_grad():
        x = torch.stack([dataset[i][0] for i in range(len(dataset))])
        return bundle.model(x).double(), torch.tensor(dataset.targets), x


def _ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE by hand: 15 equal bins of the top probability, (lower, upper]."""
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            total += inside.sum() / len(labels) * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def test_calibrate_lowers_ece_and_keeps_top1(run):
    result = json.loads((run["dir"] / "calibration" / "calibration.json").read_text())
    before, after, t = result["before"], result["after"], result["temperature"]
    assert result["split"] == "test" and result["num_samples"] == 160 and result["in_place"]
    assert before["temperature"] == 1.0 and t > 2.0  # an over-confident model is cooled down
    assert not result["at_search_edge"], t
    assert after["top1"] == before["top1"] and 0.3 < before["top1"] < 1.0
    assert after["nll"] < before["nll"]
    assert after["ece"] < 0.6 * before["ece"], (before["ece"], after["ece"])
    # The fit, checked on logits computed here: T minimises the NLL, and the ECEs are what a hand count gives.
    logits, labels, _ = _test_logits(run["original"], run["data"])
    assert fit_temperature(logits, labels) == pytest.approx(t, rel=1e-4)
    assert nll(logits, labels, t) < min(nll(logits, labels, t * 0.95), nll(logits, labels, t * 1.05))
    for temperature, side in ((1.0, before), (t, after)):
        probs = (logits / temperature).softmax(1).numpy()
        assert side["nll"] == pytest.approx(nll(logits, labels, temperature), rel=1e-4)
        assert side["ece"] == pytest.approx(_ece(probs, labels.numpy()), abs=2e-3)
    for name in ("reliability_before.png", "reliability_after.png"):
        assert (run["dir"] / "calibration" / name).stat().st_size > 5000
    # The checkpoint: every key as it was, plus the temperature; still a loadable checkpoint.
    old, new = load_checkpoint(run["original"]), load_checkpoint(run["best"])
    assert set(new) == set(old) | {"temperature", "calibration"} and new["temperature"] == t
    assert all(torch.equal(new["model"][k], v) for k, v in old["model"].items())
    assert new["calibration"]["ece_after"] == after["ece"]
    assert load_bundle(run["best"]).temperature == t and load_bundle(run["original"]).temperature == 1.0


def test_calibrate_out_leaves_the_source_alone(run, tmp_path, capsys):
    source_bytes = run["original"].read_bytes()
    out = tmp_path / "calibrated.pt"
    assert main(["calibrate", "--checkpoint", str(run["original"]), "--out", str(out), "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote the calibrated checkpoint {out}" in printed and "ECE" in printed and "temperature" in printed
    assert run["original"].read_bytes() == source_bytes
    assert load_bundle(out).temperature == pytest.approx(load_bundle(run["best"]).temperature, rel=1e-6)
    assert (tmp_path / "calibration" / "calibration.json").is_file()


def test_predict_and_onnx_export_apply_the_temperature(run, exported, capsys):
    logits, _, x = _test_logits(run["original"], run["data"])
    calibrated = load_bundle(run["best"])
    t = calibrated.temperature
    probs = Predictor(calibrated).probabilities(x[:8])
    assert torch.allclose(probs, (logits[:8] / t).softmax(1).float(), atol=1e-5)
    raw = Predictor(load_bundle(run["original"])).probabilities(x[:8])
    assert (probs.max(1).values < raw.max(1).values - 0.01).any()  # less confident...
    assert torch.equal(probs.argmax(1), raw.argmax(1))  # ...about the same classes

    image = run["data"] / "test" / "frog" / "0000.jpg"
    assert main(["predict", "--checkpoint", str(run["best"]), str(image), "--format", "json", "--top-k", "4"]) == 0
    record = json.loads(capsys.readouterr().out)[0]
    bundle = load_bundle(run["original"])
    with torch.no_grad():
        expected = (bundle.model(bundle.transform(decode_image(image))[None]).double() / t).softmax(1)[0]
    for entry in record["top_k"]:
        assert entry["prob"] == pytest.approx(float(expected[entry["index"]]), abs=2e-6)

    assert read_metadata(exported)["temperature"] == t
    assert json.loads(exported.with_name("model.onnx.json").read_text())["temperature"] == t
    onnx_bundle = load_bundle(exported)
    assert onnx_bundle.temperature == t
    assert torch.allclose(Predictor(onnx_bundle).probabilities(x[:8]), probs, atol=1e-4)


def test_eval_and_report_show_the_calibration(run, capsys):
    from resnetkit.evaluation.report import write_report

    result = json.loads((run["dir"] / "calibration" / "calibration.json").read_text())
    assert main(["eval", "--checkpoint", str(run["best"]), "--workers", "0", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["temperature"] == result["temperature"] and evaluated["split"] == "test"
    # eval reads the same 160 images through its own dataset path: the same calibrated numbers.
    assert evaluated["top1"] == pytest.approx(result["after"]["top1"])
    assert evaluated["loss"] == pytest.approx(result["after"]["nll"], abs=1e-4)
    assert evaluated["ece"] == pytest.approx(result["after"]["ece"], abs=1e-3)
    html_path, md_path = write_report(run["dir"], device="cpu")
    html = html_path.read_text()
    assert "Before and after temperature scaling" in html
    assert f"{result['after']['temperature']:.4g}" in html
    assert html.count("data:image/png;base64,") >= 6  # curves, confusion, reliability, before, after, misclassified
    assert "reliability_after.png" in md_path.read_text()


def test_calibrate_bad_input(run, exported, tmp_path, capsys):
    assert main(["calibrate", "--checkpoint", str(run["best"]), "--split", "train"]) == 2
    assert "is the split" in capsys.readouterr().err
    assert main(["calibrate", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main(["calibrate", "--checkpoint", str(exported)]) == 2
    assert "exported file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- multi-label


@pytest.fixture(scope="module")
def multilabel_run(cifar10_jpg, tmp_path_factory):
    """A multi-label resnet9 trained 3 epochs on 2 x 2 mosaics of real CIFAR-10 JPEGs (task multilabel, thresholds
    chosen on the validation mosaics), its head then scaled by SCALE; saved as overconfident.pt and calibrated into
    calibrated.pt."""
    import resnetkit

    out = tmp_path_factory.mktemp("calibrate-multilabel")
    torch.set_num_threads(1)
    result = resnetkit.train(
        {
            "task": "multilabel",
            "name": "mosaic",
            "output_dir": str(out),
            "model": {"name": "resnet9", "options": {"width": 0.25}},
            "data": {
                "name": f"cifar10-mosaic:{cifar10_jpg}:320",
                "image_size": 32,
                "batch_size": 32,
                "workers": 0,
                "cache_dir": str(out / "cache"),
            },
            "optim": {"name": "adamw", "lr": 0.004, "weight_decay": 5e-4},
            "schedule": {"name": "onecycle", "per": "step"},
            "train": {"epochs": 3, "log_every_s": 60, "log_images": False},
        },
        quiet=True,
    )
    bundle = load_bundle(result.best_checkpoint)
    assert bundle.multilabel and bundle.thresholds is not None
    head = bundle.module.get_classifier()
    with torch.no_grad():
        head.weight.mul_(SCALE)
        if head.bias is not None:  # resnet9's head has none
            head.bias.mul_(SCALE)
    original = out / "mosaic" / "overconfident.pt"
    save_checkpoint(original, {**bundle.checkpoint, "model": bundle.module.state_dict()})
    calibrated = out / "mosaic" / "calibrated.pt"
    assert main(["calibrate", "--checkpoint", str(original), "--out", str(calibrated), "--workers", "0"]) == 0
    return {"dir": out / "mosaic", "original": original, "calibrated": calibrated}


def test_multilabel_calibration_shares_one_temperature_and_keeps_every_label(multilabel_run):
    result = json.loads((multilabel_run["dir"] / "calibration" / "calibration.json").read_text())
    before, after, t = result["before"], result["after"], result["temperature"]
    assert result["multilabel"] and result["split"] == "val" and t > 2.0
    assert after["ece"] < 0.6 * before["ece"] and after["nll"] < before["nll"]
    for key in ("map", "f1_macro", "exact_match"):  # rankings and decisions unchanged
        assert after[key] == pytest.approx(before[key], abs=1e-12), key
    old, new = load_bundle(multilabel_run["original"]), load_bundle(multilabel_run["calibrated"])
    assert new.multilabel and new.temperature == t and new.thresholds != old.thresholds
    # On the validation mosaics: sigmoid(logits / T), and exactly the same labels above the moved thresholds.
    from resnetkit.data import build_dataset

    dataset = build_dataset(old.checkpoint["config"]["data"]["name"], "val", image_size=32)
    x = torch.stack([old.transform(dataset[i][0]) for i in range(len(dataset))])
    with torch.no_grad():
        logits = old.model(x).double()
    probs = Predictor(new).probabilities(x)
    assert torch.allclose(probs, (logits / t).sigmoid().float(), atol=1e-5)
    old_labels = Predictor(old).label_indices(Predictor(old).probabilities(x))
    new_labels = Predictor(new).label_indices(probs)
    assert [sorted(i for i, _ in row) for row in old_labels] == [sorted(i for i, _ in row) for row in new_labels]
    assert any(row for row in new_labels)  # some labels predicted, so the comparison says something
