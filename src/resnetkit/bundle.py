"""One way to load a model with how it is fed: (model, preprocessing, class names) from anything resnetkit reads.

    >>> from resnetkit.bundle import load_bundle
    >>> bundle = load_bundle("runs/demo/best.pt")                   # a training checkpoint, of any task
    >>> bundle = load_bundle("model.onnx")                          # an export: ONNX (fp32 or int8), TorchScript,
    >>> bundle = load_bundle("model.safetensors")                   #   or safetensors, with its metadata
    >>> bundle = load_bundle(model="resnet50", weights="imagenet")  # a zoo model with weights
    >>> logits = bundle.model(torch.stack([bundle.transform(decode_image("cat.jpg"))]))

Every command that runs a model (eval, predict, explain, export, quantize, serve, bench) loads it here, so they
all accept the same sources and feed a model the same way. The one rule for a bare model's preprocessing (a zoo
name with a weights file that does not say how it was trained): its family's default input size and preset, the
`cifar` preset (32 px) for the CIFAR family and the `imagenet` one (resize 256/224, centre crop) for the rest.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from resnetkit.checkpoint import CheckpointError, load_checkpoint

TORCHSCRIPT_EXTRA = "resnetkit.json"  # the extra file of a TorchScript export that holds its metadata


@dataclass
class Bundle:
    """A model with its preprocessing and class names.

    model: an nn.Module in eval mode, or (for an ONNX file) an onnxruntime session with the same call: a float NCHW
        batch in, logits out. Detectors and segmenters are their task's nn.Module.
    named_classes: False when the class names are made-up indices ("0", "1", ...) for a head nothing names.
    multilabel: a multi-label classifier (task "classification" still): one sigmoid per class, and every class
        whose probability reaches its `thresholds` entry (0.5 where there are none) is predicted.
    kind: "checkpoint" (a training checkpoint), "export" (an exported file) or "weights" (a zoo name with weights).
    checkpoint: the training checkpoint it came from (None for exports and bare weights).
    temperature: the classifier's temperature (`resnetkit calibrate`): probabilities are softmax(logits / T).
    """

    model: nn.Module | Callable
    preprocess: dict[str, Any]
    classes: list[str]
    name: str
    task: str = "classification"
    source: str = ""
    named_classes: bool = True
    kind: str = "checkpoint"
    checkpoint: dict[str, Any] | None = field(default=None, repr=False)
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)
    model_kwargs: dict[str, Any] = field(default_factory=dict, repr=False)
    multilabel: bool = False
    thresholds: list[float] | None = None
    temperature: float = 1.0

    @property
    def module(self) -> nn.Module:
        """The model as an nn.Module (what Grad-CAM and export need); an ONNX file has none."""
        if not isinstance(self.model, nn.Module):
            raise ValueError(
                f"{self.source} is an ONNX file, not a PyTorch model: use the .pt checkpoint (or a TorchScript or "
                "safetensors export) for this"
            )
        return self.model

    @property
    def input_size(self) -> int:
        return int(self.preprocess["input_size"])

    @property
    def transform(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """decode_image's uint8 (3, H, W) -> the model's input (3, S, S), as in evaluation."""
        from resnetkit.data import eval_transform_from

        return eval_transform_from(self.preprocess)

    def to(self, device: str | torch.device) -> Bundle:
        if isinstance(self.model, nn.Module):
            self.model = self.model.to(device)
        return self


def load_bundle(
    source: str | Path | None = None,
    *,
    model: str | None = None,
    weights: str | None = None,
    use_ema: bool = False,
    preset: str | None = None,
    device: str | torch.device = "cpu",
    threads: int | None = None,
) -> Bundle:
    """The bundle of a checkpoint or exported file (`source`), or of a zoo `model` with `weights` ("imagenet",
    "imagenet-v2", or a state dict / checkpoint / safetensors file; None: random weights).

    use_ema: a checkpoint's EMA weights. preset: how a bare model's images are prepared, instead of its family's
    default (a checkpoint or export always says so itself). threads: onnxruntime's intra-op threads (ONNX files).
    """
    if (source is None) == (model is None):
        raise ValueError("load a model from a checkpoint or exported file, or from a model name with weights")
    if source is not None:
        if weights is not None or preset is not None:
            raise ValueError("weights and preset go with a model name; a checkpoint or export carries its own")
        bundle = _from_file(Path(source), use_ema, threads)
    else:
        bundle = _from_weights(model, weights, preset)
    return bundle.to(device)


def _from_file(path: Path, use_ema: bool, threads: int | None) -> Bundle:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return _from_onnx(path, threads)
    if suffix == ".safetensors":
        return _from_safetensors(path)
    if suffix in (".ts", ".torchscript") or _is_torchscript(path):
        return _from_torchscript(path)
    return _from_checkpoint(path, use_ema)


def _from_checkpoint(path: Path, use_ema: bool) -> Bundle:
    from resnetkit.tasks import get_task, task_of

    ckpt = load_checkpoint(path)
    for key in ("model_name", "model_kwargs"):
        if key not in ckpt:
            raise CheckpointError(f"{path} lacks {key!r}: it was not written by resnetkit train")
    task = task_of(ckpt)
    multilabel = task == "multilabel"
    task = "classification" if multilabel else task  # a multi-label classifier is a classifier
    net = get_task(task).rebuild(ckpt["model_name"], ckpt["model_kwargs"])
    state = ckpt.get("model_ema") if use_ema and ckpt.get("model_ema") else ckpt["model"]
    if use_ema and not ckpt.get("model_ema"):
        raise CheckpointError(f"{path} holds no EMA weights (trained without train.ema)")
    if task == "classification":
        from resnetkit.models import load_weights

        load_weights(net, state)  # strict, with a message that lists what does not fit
    else:
        net.load_state_dict(state)
    net.eval()
    preprocess = ckpt.get("preprocess") or default_preprocess(ckpt["model_name"])
    classes = list(ckpt.get("classes") or [])
    named = bool(classes)
    if not classes:
        classes = [str(i) for i in range(_outputs(net))]
    return Bundle(
        net,
        dict(preprocess),
        classes,
        ckpt["model_name"],
        task=task,
        source=str(path),
        named_classes=named,
        kind="checkpoint",
        checkpoint=ckpt,
        model_kwargs=ckpt["model_kwargs"],
        multilabel=multilabel,
        thresholds=ckpt.get("thresholds_ema" if use_ema else "thresholds") if multilabel else None,
        temperature=float(ckpt.get("temperature", 1.0)),
    )


def _from_weights(name: str, weights: str | None, preset: str | None) -> Bundle:
    from resnetkit.models import create_model, load_weights, read_state_dict

    ckpt: dict[str, Any] = {}
    if weights in (None, "imagenet", "imagenet-v2"):
        net = create_model(name, weights=weights)
    else:
        state = read_state_dict(weights)
        if Path(weights).suffix != ".safetensors":
            try:
                ckpt = load_checkpoint(weights)
            except CheckpointError:
                ckpt = {}  # a bare state dict
        net = create_model(name, num_classes=_head_size(state))
        load_weights(net, state)
    net.eval()
    num_classes = _outputs(net)
    classes = list(ckpt.get("classes") or [])
    named = bool(classes) or num_classes == 1000
    if not classes:
        from resnetkit.data.datasets import imagenet_classes

        classes = imagenet_classes() if num_classes == 1000 else [str(i) for i in range(num_classes)]
    if preset is not None:
        from resnetkit.data import preprocess_info
        from resnetkit.registry import default_input_size

        preprocess = preprocess_info(preset, input_size=None if preset != "imagenet" else default_input_size(name))
    else:
        preprocess = ckpt.get("preprocess") or default_preprocess(name)
    return Bundle(
        net,
        dict(preprocess),
        classes,
        name,
        source=str(weights),
        named_classes=named,
        kind="weights",
        model_kwargs={"num_classes": num_classes},
        temperature=float(ckpt.get("temperature", 1.0)),
    )


def default_preprocess(model_name: str) -> dict[str, Any]:
    """The evaluation preprocessing a bare model gets: the `cifar` preset for the CIFAR family (32 px), the
    ImageNet one (resize 256, centre crop 224) at the model's default input size for the rest."""
    from resnetkit.data import preprocess_info
    from resnetkit.registry import default_input_size, model_family

    if model_family(model_name) == "cifar":
        return preprocess_info("cifar")
    return preprocess_info("imagenet", input_size=default_input_size(model_name))


def _head_size(state: dict[str, torch.Tensor]) -> int:
    """Number of classes of a state dict: rows of its last 2-D weight (the classifier of every zoo model but one
    layout), or of `head.fc.weight`, the 1x1-convolution classifier of the pre-activation ResNets (timm's ResNetV2)."""
    matrices = [v for k, v in state.items() if (k.endswith("weight") and v.ndim == 2) or k == "head.fc.weight"]
    if not matrices:
        raise ValueError("the weights hold no classifier (no 2-D weight matrix)")
    return int(matrices[-1].shape[0])


def _outputs(net: nn.Module) -> int:
    if hasattr(net, "get_classifier"):
        head = net.get_classifier()
        if hasattr(head, "out_features"):
            return int(head.out_features)
        if isinstance(head, nn.Conv2d):
            return int(head.out_channels)
    return int(getattr(net, "num_classes", 0) or 0)


# ---- exported files: the metadata `resnetkit export` embeds says how to feed them


def _metadata_bundle(model, meta: dict[str, Any], path: Path) -> Bundle:
    preprocess, classes = meta.get("preprocess"), meta.get("classes")
    if not preprocess or not classes:
        raise ValueError(f"{path} lacks resnetkit metadata (preprocess, classes): write it with `resnetkit export`")
    name = meta.get("model_name") or path.stem
    return Bundle(
        model,
        dict(preprocess),
        list(classes),
        name,
        task=meta.get("task", "classification"),
        source=str(path),
        kind="export",
        metadata=meta,
        model_kwargs=meta.get("model_kwargs") or {},
        multilabel=bool(meta.get("multilabel", False)),
        thresholds=meta.get("thresholds"),
        temperature=float(meta.get("temperature", 1.0)),
    )


def _from_onnx(path: Path, threads: int | None) -> Bundle:
    from resnetkit.deploy.runtime import OnnxRuntimeModel

    engine = OnnxRuntimeModel(path, threads=threads)
    return _metadata_bundle(engine, engine.metadata, path)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The resnetkit metadata embedded in an exported file (ONNX, safetensors or TorchScript)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props["resnetkit"]) if "resnetkit" in props else {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("resnetkit", "{}"))
    return load_torchscript(path)[1]


def load_safetensors_model(path: str | Path, fallback: nn.Module | None = None) -> nn.Module:
    """The model a safetensors export holds, in eval mode: rebuilt from its metadata's model name, or the weights
    loaded (strictly) into `fallback` when the file names no registered model."""
    from safetensors.torch import load_file

    from resnetkit.models import create_model

    meta = read_metadata(path)
    if meta.get("model_name"):
        net = create_model(meta["model_name"], **(meta.get("model_kwargs") or {}))
    elif fallback is not None:
        net = fallback
    else:
        raise ValueError(f"{path} names no model (metadata model_name): write it with `resnetkit export`")
    net.load_state_dict(load_file(str(path)), strict=True)
    return net.eval()


def load_torchscript(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A TorchScript export and its metadata."""
    import warnings

    extra = {TORCHSCRIPT_EXTRA: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        net = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return net.eval(), json.loads(extra[TORCHSCRIPT_EXTRA] or "{}")


def _from_safetensors(path: Path) -> Bundle:
    return _metadata_bundle(load_safetensors_model(path), read_metadata(path), path)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold compiled code (code/, constants.pkl); torch.save checkpoints do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in n or n.endswith("/constants.pkl") for n in archive.namelist())


def _from_torchscript(path: Path) -> Bundle:
    return _metadata_bundle(*load_torchscript(path), path)


__all__ = ["Bundle", "default_preprocess", "load_bundle", "load_safetensors_model", "load_torchscript", "read_metadata"]
