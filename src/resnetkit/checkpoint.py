"""Checkpoints: one dict of every state plus the config, written atomically, read without unpickling code.

Keys a training checkpoint holds (other writers fill what they have):
    model         state dict of the bare model (no DDP/compile prefixes)
    model_name    registry name, e.g. "resnet18"
    model_kwargs  create_model options, e.g. {"num_classes": 10, "stem": "cifar"}
    classes       class names, index = label
    preprocess    {"preset": "cifar", "input_size": 32, "resize": 32, "mean": [...], "std": [...]}
    config        the fully resolved config as plain dicts/lists/scalars
    epoch, step   where training stands (step = batches done within `epoch`)
    optimizer, scheduler, scaler, model_ema, rng, metrics, version
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, or lacks a needed key; the message names the file."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` to `path` atomically: a temporary file in the same folder, fsync, then rename over `path`.

    A crash at any moment leaves either the old file or the new one in place, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True`: tensors and plain containers only, never code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(
            f"{path} is not a resnetkit checkpoint (no 'model' key); for a bare state dict use "
            "--model NAME --weights FILE"
        )
    return ckpt


def model_from_checkpoint(path: str | Path, use_ema: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint was trained with and load its weights (or its EMA weights)."""
    from resnetkit.models import create_model, load_weights

    ckpt = load_checkpoint(path)
    for key in ("model_name", "model_kwargs"):
        if key not in ckpt:
            raise CheckpointError(f"{path} lacks {key!r}: it was not written by resnetkit train")
    model = create_model(ckpt["model_name"], **ckpt["model_kwargs"])
    weights = ckpt.get("model_ema") if use_ema and ckpt.get("model_ema") else ckpt["model"]
    load_weights(model, weights)
    model.eval()
    return model, ckpt
