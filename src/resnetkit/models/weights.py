"""Loading weights: state dicts, training checkpoints and safetensors files, and torchvision's published sets.

Files are read with `torch.load(weights_only=True)` or safetensors: loading a checkpoint never runs its code.
"""

from __future__ import annotations

import urllib.error
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

_TV_WEIGHT_SETS = {"imagenet": "IMAGENET1K_V1", "imagenet-v2": "IMAGENET1K_V2"}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


class WeightsError(ValueError):
    """A weights file or state dict that does not fit the model; the message lists what is wrong."""


def read_state_dict(source: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict inside a file: a bare state dict, a training checkpoint, or .safetensors."""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from resnetkit.checkpoint import CheckpointError, torch_load

    try:
        obj = torch_load(path, "weights file")
    except CheckpointError as e:
        raise WeightsError(str(e)) from None
    return extract_state_dict(obj, str(path))


def extract_state_dict(obj, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):  # a training checkpoint, or a bare {"state_dict": ...} file
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{where} holds no state dict (expected a dict of tensors, or one under 'model')")
    state = dict(obj)
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _head_keys(model: nn.Module) -> set[str]:
    head = model.get_classifier()
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in head.parameters() if id(p) in names}


def load_weights(
    model: nn.Module, source: str | Path | Mapping[str, torch.Tensor], replace_head: bool = False
) -> nn.Module:
    """Load `source` (a path or a state dict) into `model`, strictly.

    replace_head: when the classifier's shape differs (a 1000-class checkpoint into a 10-class model), keep the
    model's own freshly initialised head instead of failing.
    """
    where = str(source) if isinstance(source, (str, Path)) else "state dict"
    state = read_state_dict(source) if isinstance(source, (str, Path)) else extract_state_dict(source)
    own = model.state_dict()
    if replace_head:
        for key in _head_keys(model):
            if key in state and state[key].shape != own[key].shape:
                state[key] = own[key]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"weights from {where} do not fit {type(model).__name__}:"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch", mismatched),
        ):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                lines.append(f"  {title}: {shown}")
        if mismatched and not replace_head:
            lines.append("  (a different number of classes? pass replace_head=True to fine-tune with a new head)")
        raise WeightsError("\n".join(lines))
    model.load_state_dict(state)
    return model


def pretrained_state_dict(name: str, weights: str = "imagenet") -> dict[str, torch.Tensor]:
    """torchvision's published weights for `name`, through the torch.hub cache, with the file's hash checked."""
    import torchvision.models as tvm

    if weights not in _TV_WEIGHT_SETS:
        raise ValueError(f"unknown weight set {weights!r}; choose from {sorted(_TV_WEIGHT_SETS)} or give a file")
    try:
        enum = tvm.get_model_weights(name)
    except ValueError:
        raise ValueError(f"torchvision publishes no weights for {name!r}; pass a file instead") from None
    member = _TV_WEIGHT_SETS[weights]
    if member not in enum.__members__:
        raise ValueError(f"torchvision has no {member} weights for {name}; available: {list(enum.__members__)}")
    url = enum[member].url
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, weights_only=True)
    except (urllib.error.URLError, OSError) as e:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        raise RuntimeError(
            f"could not download {name} {weights} weights from {url} ({e}).\n"
            f"Offline? Fetch that file elsewhere and either place it at {cache} or pass its path: "
            f"weights='/path/to/{Path(url).name}'"
        ) from e
