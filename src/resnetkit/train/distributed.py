"""torchrun and DistributedDataParallel: process-group setup, the device, and the small collectives training needs.

    torchrun --nproc_per_node 2 -m resnetkit train --config configs/demo.yaml

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything here is a single-process no-op.
The backend is NCCL on GPUs and gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but no CUDA device is available; use cpu or auto")
    return device


def setup(device_name: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            device_id=device if device.type == "cuda" else None,
            **_restart_store(rank, world_size),
        )
    return DistInfo(rank, world_size, local_rank, device)


def _restart_store(rank: int, world_size: int) -> dict:
    """After torchrun restarted a failed group (--max-restarts), a store whose keys are this attempt's own.

    The workers of a restarted group meet in the agent's store, which still holds the keys of the attempt before:
    a new worker could read a dead peer's address before its successor overwrote it, and its connection is refused
    (seen here about every other restart: "Gloo connectFullMesh failed ... Connection refused"). Prefixing every key
    with the attempt number keeps the attempts apart. The first attempt uses torchrun's defaults unchanged.
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    from datetime import timedelta

    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, False, timeout=timedelta(minutes=10)
    )
    return {"store": dist.PrefixStore(f"resnetkit/attempt_{attempt}", store), "rank": rank, "world_size": world_size}


@contextlib.contextmanager
def process_group(device_name: str = "auto") -> Iterator[DistInfo]:
    """`setup` for the length of a `with` block: under torchrun, join the process group and leave it at the end.

    After a normal end, every rank waits for the others first: a rank that tears its gloo group down while a peer is
    still busy with its last results (rank 0 writing plots) could abort at exit with "terminate called without an
    active exception" (seen in CI). After an error it leaves at once: the peers may be inside another collective,
    and a barrier would wait for them until the timeout."""
    info = setup(device_name)
    finished = False
    try:
        yield info
        finished = True
    finally:
        if info.enabled and dist.is_initialized():
            if finished:
                barrier()
            dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP and torch.compile wrappers (whose state-dict keys have no prefixes)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank. DDP keeps the parameters equal, but each
    rank's last forward of an epoch updates its own running statistics: without this, ranks would evaluate and hold
    different models."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj):
    """rank 0's `obj` on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
