"""onnxruntime behind a torch-like call: an exported ONNX file (fp32 or int8) as a model.

>>> ort_model = OnnxRuntimeModel("model.onnx")  # from `resnetkit export --format onnx`
>>> logits = ort_model(images)                # a float NCHW batch in, a torch tensor of logits out
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import onnxruntime as ort


def session_options(threads: int | None = None) -> ort.SessionOptions:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # ORT_ENABLE_ALL adds the layout optimisations (NCHWc blocked convolutions) on top of the constant folding and
    # Conv+BN / Conv+Relu / Conv+Add fusions of the basic and extended levels.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return options


class OnnxRuntimeModel:
    """An ONNX file behind an onnxruntime CPU session with every graph optimisation on.

    Callable like a torch model: a float NCHW batch (torch tensor or numpy array) in, logits (torch tensor) out.
    `preprocess` and `classes` come from the metadata `resnetkit export` embeds (None when the file has none).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        try:
            self.session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ValueError(f"onnxruntime cannot load {path}: {e}") from e
        self.path = path
        self.input_name = self.session.get_inputs()[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
        info = json.loads(meta["resnetkit"]) if "resnetkit" in meta else {}
        self.metadata: dict = info
        self.preprocess: dict | None = info.get("preprocess")
        self.classes: list[str] | None = info.get("classes")

    def __call__(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().float().contiguous().numpy()
        x = np.ascontiguousarray(x, dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input_name: x})[0])

    def __repr__(self) -> str:
        return f"OnnxRuntimeModel({str(self.path)!r})"
