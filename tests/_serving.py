"""A real `resnetkit serve` in a subprocess on a loopback port, for the tests that talk to it over HTTP."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(args: Sequence[object], log_path: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """`resnetkit serve ARGS --port P`: waits up to 120 s for /health, yields the base URL, stops the server after.
    Its output goes to log_path, printed if it exits before answering."""
    port = free_port()
    argv = [sys.executable, "-m", "resnetkit", "serve", *map(str, args), "--port", str(port)]
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"server exited with {proc.returncode}:\n{log.read()}")
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail("server did not answer /health within 120 s")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
