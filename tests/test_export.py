"""`export_model` and `resnetkit export`: parity for each format, onnx.checker, metadata, dynamic batch, bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from resnetkit.bundle import read_metadata
from resnetkit.checkpoint import save_checkpoint
from resnetkit.cli import main
from resnetkit.deploy.export import ExportError, export_model
from resnetkit.models import create_model

CLASSES = ["cat", "dog", "ship"]
PREPROCESS = {"preset": "cifar", "input_size": 32, "resize": 32, "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}


def trained_looking(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so that BN really matters to the outputs."""
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=generator) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=generator) * 0.4 - 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return trained_looking(create_model("resnet20", num_classes=3))


def run_exported(path, fmt: str, x: torch.Tensor) -> torch.Tensor:
    """Read the file back with the plain library of its format, not through resnetkit."""
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    if fmt == "torchscript":
        return torch.jit.load(str(path))(x)
    from safetensors.torch import load_file

    rebuilt = create_model("resnet20", num_classes=3)
    rebuilt.load_state_dict(load_file(str(path)))
    return rebuilt.eval()(x)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "safetensors"])
def test_export_parity_metadata_and_dynamic_batch(tmp_path, model, fmt):
    path = tmp_path / f"model{SUFFIX[fmt]}"
    report = export_model(model, path, fmt, PREPROCESS, CLASSES, model_name="resnet20", model_kwargs={"num_classes": 3})
    assert report.passed and report.max_abs_diff <= 1e-4 and path.is_file()

    x = torch.randn(5, 3, 32, 32)  # traced at batch 2, run at batch 5
    with torch.no_grad():
        got, expected = run_exported(path, fmt, x), model(x)
    assert got.shape == (5, 3)
    assert (got - expected).abs().max().item() <= 1e-4

    embedded = read_metadata(path)
    beside = json.loads((tmp_path / f"model{SUFFIX[fmt]}.json").read_text())
    for meta in (embedded, beside):
        assert meta["classes"] == CLASSES
        assert meta["input_size"] == 32
        assert meta["mean"] == PREPROCESS["mean"] and meta["std"] == PREPROCESS["std"]
        assert meta["preprocess"] == PREPROCESS
        assert meta["model_name"] == "resnet20" and meta["format"] == fmt
    assert beside["max_abs_diff"] == report.max_abs_diff


def test_onnx_passes_checker_and_declares_dynamic_batch(tmp_path, model):
    path = tmp_path / "m.onnx"
    export_model(model, path, "onnx", PREPROCESS, CLASSES)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch" and not batch_dim.HasField("dim_value")
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["classes"]) == CLASSES and props["input_size"] == "32"


class BatchDependent(nn.Module):
    """A model that tracing gets wrong: the Python branch on the batch size is frozen at the traced batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean((2, 3))
        return y * 2 if x.shape[0] == 2 else y


def test_export_that_does_not_reproduce_the_model_fails_and_leaves_no_file(tmp_path):
    path = tmp_path / "bad.pt"
    with pytest.raises(ExportError, match="differs from the eager model"):
        export_model(BatchDependent().eval(), path, "torchscript", PREPROCESS)
    assert not path.exists() and not (tmp_path / "bad.pt.json").exists()


def test_export_cli_from_checkpoint(tmp_path, model, capsys):
    ckpt = tmp_path / "best.pt"
    save_checkpoint(
        ckpt,
        {
            "model": model.state_dict(),
            "model_name": "resnet20",
            "model_kwargs": {"num_classes": 3},
            "classes": CLASSES,
            "preprocess": PREPROCESS,
        },
    )
    out = tmp_path / "exported" / "model.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max |exported - eager|" in printed and str(out) in printed

    from resnetkit.deploy.runtime import OnnxRuntimeModel

    engine = OnnxRuntimeModel(out)
    assert engine.classes == CLASSES and engine.preprocess == PREPROCESS
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        assert (engine(x) - model(torch.from_numpy(x))).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "resnet20", "--weights", "W", "--format", "tflite"], "--format 'tflite' is not one of onnx"),
        (["--checkpoint", "missing.pt", "--format", "onnx"], "checkpoint not found: missing.pt"),
        (["--model", "resnet20", "--format", "onnx"], "--model needs --weights"),
        (["--model", "resnet20", "--weights", "nothere.pt", "--format", "onnx"], "weights file not found: nothere.pt"),
    ],
)
def test_export_cli_bad_input_gives_one_clear_line(tmp_path, capsys, argv, message):
    assert main(["export", *argv, "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("resnetkit export: error:") and "\n" not in err


def test_unknown_format_in_python_api(tmp_path, model):
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export_model(model, tmp_path / "m.tflite", "tflite", PREPROCESS)


def test_export_cli_from_bare_weights_with_new_input_size(tmp_path, model, capsys):
    weights = tmp_path / "resnet20.pth"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "m.safetensors"
    argv = ["export", "--model", "resnet20", "--weights", str(weights), "--format", "safetensors", "--out", str(out)]
    assert main([*argv, "--input-size", "48"]) == 0
    meta = read_metadata(out)
    assert meta["model_kwargs"] == {"num_classes": 3} and meta["input_size"] == 48
    # The bare weights get resnet20's family preset (cifar: no resize margin), at the new size.
    assert meta["preprocess"]["preset"] == "cifar" and meta["preprocess"]["resize"] == 48
    assert "at 48px" in capsys.readouterr().out
