"""Lazy package attributes (Scientific Python SPEC 1, as `lazy_loader.attach` does): a package lists which module
each public name lives in, and the module is imported on the name's first use.

    __getattr__, __dir__, __all__ = attach(__name__, {"create_model": "resnetkit.models.registry_api", ...})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def attach(package: str, attributes: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]], list]:
    """(__getattr__, __dir__, __all__) for `package`, whose public names map to the modules that define them (a
    name mapped to the submodule of the same name is that submodule)."""

    def __getattr__(name: str) -> Any:
        if name not in attributes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(attributes[name])
        value = module if attributes[name] == f"{package}.{name}" else getattr(module, name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(attributes))

    return __getattr__, __dir__, sorted(attributes)
