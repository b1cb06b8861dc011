"""PyTorch Hub entry points: one per registered resnetkit model.

    model = torch.hub.load("/path/to/resnetkit", "resnet50", source="local", weights=None)
    model = torch.hub.load("/path/to/resnetkit", "resnet18", source="local", num_classes=10, stem="cifar")

Each entry takes the same arguments as `resnetkit.create_model(name, weights=None, **options)`: weights is None,
"imagenet", "imagenet-v2" or a file path; options are the model family's (num_classes, in_chans, ...).
"""

import sys
from pathlib import Path as _Path

dependencies = ["torch", "torchvision"]

# The checkout's own sources, so that the hub loads this repository's models even where resnetkit is not installed.
_SRC = str(_Path(__file__).resolve().parent / "src")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)

from resnetkit.models import create_model as _create_model  # noqa: E402
from resnetkit.models import list_models as _list_models  # noqa: E402


def _entry(name: str):
    def entry(weights=None, **options):
        return _create_model(name, weights=weights, **options)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"resnetkit {name}: create_model({name!r}, weights=weights, **options)."
    return entry


for _name in _list_models():
    globals()[_name] = _entry(_name)
