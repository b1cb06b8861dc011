"""Export a model to ONNX, TorchScript or safetensors, with its preprocessing, and verify it against eager PyTorch.

    resnetkit export --checkpoint runs/cifar/best.pt --format onnx --out model.onnx

Every format gets a dynamic batch size and carries its metadata (model name, input size, mean, std, class names;
for a multi-label classifier `multilabel` and its per-class `thresholds`; the temperature of a calibrated classifier)
inside the file (ONNX metadata_props, a TorchScript extra file, the safetensors header) and beside it as
`PATH.json`; `resnetkit.bundle.load_bundle` reads any of them back (and `read_metadata` the metadata alone). An
export is declared done only after the exported file, read back, reproduces the eager model's logits on a batch of
another size than the one traced, within `tolerance` (1e-4 by default).
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from resnetkit.bundle import TORCHSCRIPT_EXTRA, load_safetensors_model, load_torchscript

FORMATS = ("onnx", "torchscript", "safetensors")
INPUT_NAME, OUTPUT_NAME = "input", "logits"
# Traced at one batch size, checked at another: proves the batch dimension really is dynamic.
TRACE_BATCH, CHECK_BATCH = 2, 3


class ExportError(ValueError):
    """An export that could not be written or did not reproduce the eager model; the message says which and why."""


@dataclass
class ExportReport:
    path: Path
    format: str
    metadata_path: Path
    max_abs_diff: float
    tolerance: float
    check_batch: int
    input_size: int
    metadata: dict[str, Any] = field(repr=False)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def summary(self) -> str:
        return (
            f"exported {self.format} to {self.path} (metadata: {self.metadata_path}); max |exported - eager| on "
            f"a batch of {self.check_batch} at {self.input_size}px: {self.max_abs_diff:.2e} "
            f"(tolerance {self.tolerance:.0e})"
        )


def export_model(
    model: nn.Module,
    path: str | Path,
    format: str,
    preprocess: dict[str, Any],
    classes: list[str] | None = None,
    *,
    model_name: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    temperature: float = 1.0,
    tolerance: float = 1e-4,
    multilabel: bool = False,
    thresholds: list[float] | None = None,
) -> ExportReport:
    """Write `model` to `path` in `format`, embed the metadata, write `PATH.json`, and verify the file.

    `preprocess` is the checkpoint's dict (`input_size`, `mean`, `std`, ...); `model_name`/`model_kwargs` let a
    safetensors file be rebuilt with `create_model`; `multilabel` and `thresholds` (a multi-label classifier's
    per-class decision thresholds) travel in the metadata for predict and serve, and so does `temperature`
    (`resnetkit calibrate`'s T): the file still outputs logits, and whoever turns them into probabilities (the
    Predictor of its bundle) divides them by T first. Raises ExportError (and removes the files) when the exported
    model's logits differ from the eager model's by more than `tolerance`.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if not isinstance(preprocess, dict) or "input_size" not in preprocess:
        raise ExportError(
            f"preprocess must be a dict with at least 'input_size' (as in a checkpoint), got {preprocess!r}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).float().eval()
    size = int(preprocess["input_size"])
    in_chans = _in_channels(model)
    metadata = {
        "format": format,
        "model_name": model_name,
        "model_kwargs": model_kwargs or {},
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_shape": ["batch", in_chans, size, size],
        "input_size": size,
        "mean": preprocess.get("mean"),
        "std": preprocess.get("std"),
        "classes": list(classes) if classes is not None else None,
        "preprocess": preprocess,
        "multilabel": multilabel,
        "thresholds": list(thresholds) if thresholds is not None else None,
        "temperature": float(temperature),
        "resnetkit_version": _version(),
    }
    generator = torch.Generator().manual_seed(0)
    trace_input = torch.randn(TRACE_BATCH, in_chans, size, size, generator=generator)
    check_input = torch.randn(CHECK_BATCH, in_chans, size, size, generator=generator)
    with torch.no_grad():
        expected = model(check_input)

    writer, reader = {
        "onnx": (_write_onnx, _run_onnx),
        "torchscript": (_write_torchscript, _run_torchscript),
        "safetensors": (_write_safetensors, _run_safetensors),
    }[format]
    metadata_path = path.with_name(path.name + ".json")
    try:
        writer(model, trace_input, path, metadata)
        got = reader(path, check_input, model)
        if got.shape != expected.shape:
            raise ExportError(
                f"{path}: exported model returned shape {tuple(got.shape)} for a batch of "
                f"{CHECK_BATCH}, eager returned {tuple(expected.shape)}"
            )
        diff = (got.float() - expected).abs().max().item()
        if not diff <= tolerance:  # also catches NaN
            scale = expected.abs().max().item()
            raise ExportError(
                f"{path}: exported {format} model differs from the eager model by {diff:.3g} "
                f"(max abs over a batch of {CHECK_BATCH}, logits up to {scale:.3g}), above the tolerance "
                f"{tolerance:g}; float rounding grows with the logits' size, so an untrained model with large "
                "logits may need a looser --tolerance"
            )
    except BaseException:
        path.unlink(missing_ok=True)
        metadata_path.unlink(missing_ok=True)
        raise
    metadata["max_abs_diff"] = diff
    metadata_path.write_text(json.dumps(metadata, indent=2) + "\n")
    return ExportReport(path, format, metadata_path, diff, tolerance, CHECK_BATCH, size, metadata)


# --- ONNX ---------------------------------------------------------------------------------------------------------


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path, metadata: dict) -> None:
    import onnx

    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of dynamo=True, which takes ~6x longer on ResNets
        # and gives the same graph after onnxruntime's optimisations; this one is kept while torch ships it.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=17,
            do_constant_folding=True,
        )
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in _string_metadata(metadata).items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "resnetkit"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ExportError(f"{path}: onnx.checker rejected the exported graph: {e}") from e
    onnx.save(proto, str(path))


def _run_onnx(path: Path, x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    from resnetkit.deploy.runtime import OnnxRuntimeModel

    return OnnxRuntimeModel(path)(x)


# --- TorchScript --------------------------------------------------------------------------------------------------


def _write_torchscript(model: nn.Module, example: torch.Tensor, path: Path, metadata: dict) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice; tracing is what this format is
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_EXTRA: json.dumps(metadata)})


def _run_torchscript(path: Path, x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    scripted, _ = load_torchscript(path)
    with torch.no_grad():
        return scripted(x)


# --- safetensors --------------------------------------------------------------------------------------------------


def _write_safetensors(model: nn.Module, example: torch.Tensor, path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    # safetensors refuses tensors that share memory; clone so tied or viewed parameters are stored separately.
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=_string_metadata(metadata))


def _run_safetensors(path: Path, x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Rebuild the model from the file alone when it names a registered model (as `load_bundle` does), else load
    the file into a copy of the model."""
    rebuilt = load_safetensors_model(path, fallback=copy.deepcopy(model))
    with torch.no_grad():
        return rebuilt(x)


# --- helpers ------------------------------------------------------------------------------------------------------


def _string_metadata(metadata: dict) -> dict[str, str]:
    """Both ONNX and safetensors keep str -> str maps: the whole record as JSON, plus the common keys alone."""
    flat = {"resnetkit": json.dumps(metadata)}
    for key in ("model_name", "input_size", "mean", "std", "classes", "temperature"):
        if metadata.get(key) is not None:
            value = metadata[key]
            flat[key] = value if isinstance(value, str) else json.dumps(value)
    return flat


def _in_channels(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return 3


def _version() -> str:
    from resnetkit._version import __version__

    return __version__
