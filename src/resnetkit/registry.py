"""The model registry: `register_model`, `create_model`, `list_models`.

>>> from resnetkit import create_model
>>> model = create_model("resnet50", num_classes=10)
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_DEFAULT_INPUT_SIZE: dict[str, int] = {}
_FAMILY: dict[str, str] = {}
_OPTIONS: dict[str, tuple[str, ...]] = {}


def register_model(family: str, options: tuple[str, ...], input_size: int = 224) -> Callable:
    """Register a builder under its function name; a second builder with the same name is refused.

    options: the keyword arguments users may pass (the architecture itself is fixed by the builder).
    """

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = builder.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = builder
        _DEFAULT_INPUT_SIZE[name] = input_size
        _FAMILY[name] = family
        _OPTIONS[name] = tuple(options)
        return builder

    return wrap


def _load_zoo() -> None:
    """Import the zoo modules (their builders register themselves), once."""
    from resnetkit.models import ZOO_MODULES

    for module in ZOO_MODULES:
        importlib.import_module(module)


def list_models(family: str | None = None) -> list[str]:
    """Registered model names, in registration order; `family` is one of imagenet, cifar, densenet."""
    _load_zoo()
    return [name for name in _MODELS if family is None or _FAMILY[name] == family]


def model_family(name: str) -> str:
    return _FAMILY[_check_name(name)]


def default_input_size(name: str) -> int:
    return _DEFAULT_INPUT_SIZE[_check_name(name)]


def _closest(word: str, choices, n: int = 3) -> str:
    choices = list(choices)
    close = [c for c in choices if c.startswith(word)][:n]  # "resnext50" -> "resnext50_32x4d"
    close += [c for c in difflib.get_close_matches(word, choices, n=n, cutoff=0.5) if c not in close]
    close = close[:n]
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _check_name(name: str) -> str:
    _load_zoo()
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}{_closest(name, _MODELS)} (see `resnetkit models`)")
    return name


def accepted_kwargs(name: str) -> list[str]:
    """The keyword arguments `create_model(name, ...)` accepts."""
    return [*_OPTIONS[_check_name(name)], "weights"]


def create_model(name: str, weights: str | None = None, **kwargs) -> nn.Module:
    """Build a registered model.

    weights: None (random init), "imagenet" / "imagenet-v2" (torchvision's published sets, downloaded through the
    torch.hub cache with their hash checked), or a path to a state dict, training checkpoint or .safetensors file.
    When `num_classes` differs from the weights' head, the head is replaced by a freshly initialised one.
    """
    _check_name(name)
    allowed = accepted_kwargs(name)
    for key in kwargs:
        if key not in allowed:
            raise TypeError(f"{name}() got an unknown option {key!r}{_closest(key, allowed)}; accepted: {allowed}")
    model = _MODELS[name](**kwargs)
    if weights is not None:
        from resnetkit.models.weights import load_weights, pretrained_state_dict

        if weights in ("imagenet", "imagenet-v2"):
            load_weights(model, pretrained_state_dict(name, weights), replace_head=True)
        else:
            load_weights(model, weights, replace_head=True)
    return model
