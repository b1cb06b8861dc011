"""torch.hub on this checkout: hubconf.py exposes one entry per registered model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from resnetkit import list_models

REPO = Path(__file__).resolve().parents[1]


def test_hub_load_resnet50_from_local_repo():
    model = torch.hub.load(str(REPO), "resnet50", source="local", weights=None)
    assert type(model).__name__ == "ResNet"
    assert model.get_classifier().out_features == 1000
    assert [f["channels"] for f in model.feature_info][-1] == 2048


def test_hub_passes_options_through():
    model = torch.hub.load(str(REPO), "resnet20", source="local", num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_hub_has_one_entry_per_registered_model():
    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO / "hubconf.py")
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    entries = {n for n in dir(hub) if callable(getattr(hub, n)) and not n.startswith("_")}
    assert entries == set(list_models())
    assert hub.dependencies == ["torch", "torchvision"]
