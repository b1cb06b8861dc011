"""int8 post-training static quantisation with onnxruntime: QDQ format, per-channel int8 weights, uint8 activations.

    >>> int8 = quantize_model(model, calibration_batches, "model.int8.onnx", preprocess, classes)
    >>> logits = int8(images)                          # an OnnxRuntimeModel
    >>> top1_agreement(model(images), logits)          # fraction of images whose top-1 class is unchanged
    >>> report = quantize_from_images(model, preprocess, classes, image_files, "model.int8.onnx")
    >>> print(report.summary())                        # calibrated on 512 files, agreement on up to 1000 others

`resnetkit quantize` is the command line of `quantize_from_images`.

Why this recipe: on the 2-core AVX-512 VNNI machine this project is benchmarked on, ResNet-50 at batch 32 ran
10.0 images/s with QDQ uint8 activations x int8 per-channel weights, 6.0 with int8 activations (onnxruntime's u8s8
VNNI kernels are its fast path) and about the same 10.2 with the older QOperator format; torch.ao's FX x86 backend
was measured too (see BENCHMARKS.md). Per-channel weight scales keep the per-filter ranges of a BN-folded network,
which per-tensor scales crush for filters with small weights.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from resnetkit.deploy.export import INPUT_NAME, export_model
from resnetkit.deploy.runtime import OnnxRuntimeModel


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


@dataclass
class QuantizeReport:
    """What `quantize_from_images` wrote and measured."""

    path: Path
    method: str
    calibration_images: int
    check_images: int
    agreement: float  # int8 vs fp32 (eager) top-1 agreement on the check images, disjoint from the calibration
    fp32_images_per_s: float  # onnxruntime fp32 on the check images, same session settings as int8
    int8_images_per_s: float
    skipped: list[str] = field(default_factory=list)  # unreadable files, one message each

    @property
    def differ(self) -> int:
        return round((1 - self.agreement) * self.check_images)

    def summary(self) -> str:
        lines = [
            f"wrote {self.path} (int8 QDQ, {self.method} calibration on {self.calibration_images} images)",
            f"int8 vs fp32 top-1 agreement: {100 * self.agreement:.2f}% on {self.check_images} held-out images "
            f"({self.differ} differ)",
            f"onnxruntime on those images: fp32 {self.fp32_images_per_s:.1f} images/s, int8 "
            f"{self.int8_images_per_s:.1f} images/s ({self.int8_images_per_s / self.fp32_images_per_s:.2f}x)",
        ]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable file(s), e.g. {self.skipped[0]}")
        return "\n".join(lines)


def calibration_split(
    images: Sequence[str | Path], calib: int, check: int, seed: int = 0
) -> tuple[list[Path], list[Path]]:
    """`calib` calibration files and up to `check` others, disjoint, after a shuffle with a fixed seed (so that a
    class-sorted folder tree gives every class to both)."""
    if calib < 1 or check < 1:
        raise ValueError(f"calib and check must be >= 1, got {calib} and {check}")
    files = [Path(f) for f in images]
    if len(files) <= calib:
        raise ValueError(
            f"found {len(files)} images; int8 needs more than the {calib} calibration images, so that some are left "
            "to check the agreement on (lower --calib or add images)"
        )
    random.Random(seed).shuffle(files)
    return files[:calib], files[calib : calib + check]


def quantize_from_images(
    model: nn.Module,
    preprocess: dict[str, Any],
    classes: Sequence[str] | None,
    images: Sequence[str | Path],
    out_path: str | Path,
    *,
    calib: int = 512,
    check: int = 1000,
    method: str = "minmax",
    fp32_ends: bool = False,
    batch_size: int = 64,
    model_name: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    temperature: float = 1.0,
    threads: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    multilabel: bool = False,
    thresholds: list[float] | None = None,
) -> QuantizeReport:
    """int8 from real images: calibrate on `calib` of them, then measure the top-1 agreement with the fp32 model on
    up to `check` others (never seen by the calibration).

    The two sets come from `calibration_split` (a shuffle with a fixed seed). Images are prepared with the model's
    own evaluation preprocessing; unreadable files are skipped and listed in the report. Writes `out_path`
    (metadata embedded, as `resnetkit export` does) and `out_path.json`. `progress(stage, done, total)` is called
    after each batch. `multilabel` and `thresholds` travel in the metadata, as for `export_model`.
    """
    from resnetkit.data import eval_transform_from
    from resnetkit.deploy.predict import read_batches

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    calib_files, check_files = calibration_split(images, calib, check)
    transform = eval_transform_from(preprocess)
    skipped: list[str] = []
    say = progress or (lambda stage, done, total: None)

    def batches(paths: list[Path], stage: str) -> Iterator[torch.Tensor]:
        done = 0
        for good, tensors, errors in read_batches(paths, batch_size, transform):
            skipped.extend(message for _, message in errors)
            done += len(good) + len(errors)
            say(stage, done, len(paths))
            if tensors:
                yield torch.stack(tensors)

    calibration = list(batches(calib_files, "calibration images"))
    if not calibration:
        raise ValueError(f"none of the {calib} calibration images could be read, e.g. {skipped[0]}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        export = export_model(
            model,
            fp32_path,
            "onnx",
            preprocess,
            classes,
            model_name=model_name,
            model_kwargs=model_kwargs,
            temperature=temperature,
            multilabel=multilabel,
            thresholds=thresholds,
        )
        quantize_onnx(fp32_path, out_path, calibration, method=method, fp32_ends=fp32_ends)
        fp32_ort = OnnxRuntimeModel(fp32_path, threads=threads)
        int8_ort = OnnxRuntimeModel(out_path, threads=threads)
        references, quantized = [], []
        fp32_s = int8_s = 0.0
        model = model.eval()
        for batch in batches(check_files, "check images"):
            with torch.inference_mode():
                references.append(model(batch))
            start = time.perf_counter()
            fp32_ort(batch)
            fp32_s += time.perf_counter() - start
            start = time.perf_counter()
            quantized.append(int8_ort(batch))
            int8_s += time.perf_counter() - start
    if not references:
        raise ValueError(f"none of the check images could be read, e.g. {skipped[-1]}")
    total = sum(len(r) for r in references)
    agreement = top1_agreement(torch.cat(references), torch.cat(quantized))
    report = QuantizeReport(
        out_path, method, sum(len(b) for b in calibration), total, agreement, total / fp32_s, total / int8_s, skipped
    )
    metadata = {
        **export.metadata,
        "format": "onnx-int8",
        "int8": {
            "scheme": "onnxruntime QDQ, per-channel int8 weights, uint8 activations",
            "method": method,
            "fp32_ends": fp32_ends,
            "calibration_images": report.calibration_images,
            "check_images": report.check_images,
            "top1_agreement_with_fp32": report.agreement,
        },
    }
    metadata.pop("max_abs_diff", None)
    out_path.with_name(out_path.name + ".json").write_text(json.dumps(metadata, indent=2) + "\n")
    return report
