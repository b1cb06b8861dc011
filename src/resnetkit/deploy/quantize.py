"""int8 post-training static quantisation with onnxruntime: QDQ format, per-channel int8 weights, uint8 activations.

    >>> int8 = quantize_model(model, calibration_batches, "model.int8.onnx", preprocess, classes)
    >>> logits = int8(images)                          # an OnnxRuntimeModel
    >>> top1_agreement(model(images), logits)          # fraction of images whose top-1 class is unchanged

Why this recipe: on the 2-core AVX-512 VNNI machine this project is benchmarked on, ResNet-50 at batch 32 ran
10.0 images/s with QDQ uint8 activations x int8 per-channel weights, 6.0 with int8 activations (onnxruntime's u8s8
VNNI kernels are its fast path) and about the same 10.2 with the older QOperator format; torch.ao's FX x86 backend
was measured too (see BENCHMARKS.md). Per-channel weight scales keep the per-filter ranges of a BN-folded network,
which per-tensor scales crush for filters with small weights.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from resnetkit.deploy.engine import OnnxRuntimeModel
from resnetkit.deploy.export import INPUT_NAME, export_model


def quantize_onnx(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration: Iterable[torch.Tensor | np.ndarray],
    *,
    per_channel: bool = True,
    method: str = "minmax",
    fp32_ends: bool = False,
    op_types: list[str] | None = None,
) -> Path:
    """Quantise an fp32 ONNX file to int8 (QDQ), calibrating activation ranges on `calibration` batches.

    method: "minmax" (the per-batch ranges averaged), "percentile" (99.999th percentile of |x|) or "entropy".
    fp32_ends: keep the first convolution and the classifier in fp32 (the usual fix when int8 costs agreement:
    the stem sees raw pixels and the head's logits decide the class; both are a small share of the FLOPs).
    op_types: quantise only these ONNX op types (e.g. ["Conv", "Gemm"] leaves the residual Adds in fp32).
    The resnetkit metadata of the fp32 file is copied into the int8 one, so OnnxRuntimeModel finds the classes.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if not fp32_path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {fp32_path}")
    batches = [
        np.ascontiguousarray(b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else b, dtype=np.float32)
        for b in calibration
    ]
    if not batches:
        raise ValueError("int8 calibration needs at least one batch of images")
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    if method not in methods:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(methods)}")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    with tempfile.TemporaryDirectory() as tmp:
        # Shape inference and graph optimisation first (Conv+BN folded): the quantiser then sees the fused graph.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        exclude = []
        if fp32_ends:
            nodes = onnx.load(str(prepared)).graph.node
            convs = [n.name for n in nodes if n.op_type == "Conv"]
            heads = [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")]
            exclude = convs[:1] + heads[-1:]
        quantize_static(
            str(prepared),
            str(out_path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            nodes_to_exclude=exclude,
            op_types_to_quantize=op_types,
            extra_options={"CalibMovingAverage": True, "CalibPercentile": 99.999},
        )
    proto = onnx.load(str(out_path))
    del proto.metadata_props[:]
    for prop in onnx.load(str(fp32_path), load_external_data=False).metadata_props:
        proto.metadata_props.add(key=prop.key, value=prop.value)
    onnx.save(proto, str(out_path))
    return out_path


def quantize_model(
    model: nn.Module,
    calibration: Iterable[torch.Tensor],
    out_path: str | Path,
    preprocess: dict[str, Any],
    classes: list[str] | None = None,
    *,
    threads: int | None = None,
    **export_options: Any,
) -> OnnxRuntimeModel:
    """Export `model` to fp32 ONNX (verified), quantise it to int8 at `out_path`, and load it in onnxruntime."""
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_model(model, fp32, "onnx", preprocess, classes, **export_options)
        quantize_onnx(fp32, out_path, calibration)
    return OnnxRuntimeModel(out_path, threads=threads)


def top1_agreement(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Fraction of rows whose arg-max class is the same in both."""
    if reference_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(reference_logits.shape)} vs {tuple(logits.shape)}")
    return (reference_logits.argmax(1) == logits.argmax(1)).float().mean().item()
