"""Shared fixtures. Tests that read the real data in ../shared/data skip when it is absent, and fail instead when
RESNETKIT_REQUIRE_DATA=1 (as in CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
torch.set_num_threads(min(2, os.cpu_count() or 1))


def _shared(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.exists():
        if os.environ.get("RESNETKIT_REQUIRE_DATA") == "1":
            pytest.fail(f"real data required (RESNETKIT_REQUIRE_DATA=1) but {path} does not exist")
        pytest.skip(f"real data not found at {path}")
    return path


@pytest.fixture(scope="session")
def cifar10_jpg() -> Path:
    """../shared/data/cifar10-jpg: train/<class>/NNNN.jpg and test/<class>/NNNN.jpg."""
    return _shared("cifar10-jpg")


@pytest.fixture(scope="session")
def cub_root() -> Path:
    """../shared/data/cub200-2011-subset/CUB_200_2011 (official layout, 10 classes)."""
    return _shared("cub200-2011-subset/CUB_200_2011")


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    """../shared/data/imagenet-sample: 200 photos and labels.tsv."""
    return _shared("imagenet-sample")
