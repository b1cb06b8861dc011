"""Checkpoints: one dict of every state plus the config, written atomically, read without unpickling code.

Keys a training checkpoint holds (every task; other writers fill what they have):
    task          classification, detection or segmentation (absent: classification)
    model         state dict of the bare model (no DDP/compile prefixes)
    model_name    registry name, e.g. "resnet18" (the task's builder name for detectors and segmenters)
    model_kwargs  the builder's options, e.g. {"num_classes": 10, "stem": "cifar"}
    classes       class names, index = label
    preprocess    {"preset": "cifar", "input_size": 32, "resize": 32, "mean": [...], "std": [...]}
    config        the fully resolved config as plain dicts/lists/scalars
    epoch, step   where training stands: epochs completed, and batches done within the next epoch
    global_step, optimizer, scheduler, scaler, model_ema, rng, loader, metrics, best, best_epoch, version
`resnetkit.bundle.load_bundle` turns one back into (model, preprocessing, class names).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from resnetkit.fileio import write_atomic


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, or lacks a needed key; the message names the file."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` to `path` atomically with `torch.save` (see `write_atomic`)."""
    return write_atomic(path, lambda f: torch.save(state, f))


def torch_load(path: str | Path, what: str = "checkpoint") -> Any:
    """`torch.load(path, weights_only=True)`: tensors and plain containers only, never code.

    A file that holds pickled Python objects is refused with one line of resnetkit's own, without torch's advice
    to pass weights_only=False: unpickling an untrusted file runs whatever code it carries.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        message = str(e)
        if "Unsupported global: GLOBAL " in message:
            found = message.split("Unsupported global: GLOBAL ", 1)[1].split(" was not", 1)[0]
            raise CheckpointError(
                f"refusing to read {path}: it holds pickled Python objects ({found}), not only tensors and plain "
                "data, and unpickling runs code. resnetkit reads only tensors, numbers, strings, lists and dicts: "
                "save a state dict (model.state_dict()) or a safetensors file instead"
            ) from None
        raise CheckpointError(f"cannot read {what} {path}: not a file torch.save wrote, or a damaged one") from None
    except Exception as e:  # a truncated zip, ...
        raise CheckpointError(f"cannot read {what} {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a resnetkit checkpoint with `torch_load` (never code); the message names the file."""
    ckpt = torch_load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(
            f"{path} is not a resnetkit checkpoint (no 'model' key); for a bare state dict use "
            "--model NAME --weights FILE"
        )
    return ckpt
