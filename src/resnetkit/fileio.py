"""Atomic file writes: every file resnetkit writes that a crash, a viewer or a second process must never see half
of (checkpoints, caches, recipes, study tables) goes through `write_atomic`; figures through
`resnetkit.evaluation.figures.save_figure`. Torch-free, so the config and the study's report can use it."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def write_atomic(path: str | Path, content: str | bytes | Callable[[BinaryIO], Any]) -> Path:
    """Write `content` (text, bytes, or a function writing into a binary file) to `path` atomically: a temporary
    file in the same folder, fsync, then rename over `path`. A crash at any moment leaves either the old file or the
    new one in place, never a truncated one, and two processes writing the same file leave one whole copy.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its files are private (0600), and a report or recipe should keep the umask's mode.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
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
