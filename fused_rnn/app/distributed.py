"""torchrun: joining the process group, and decisions every process must take together."""
from __future__ import annotations

import os
import time

import torch

from .devices import resolve_device


def setup(device_name: str):
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) joins the process group:
    NCCL with one GPU per process, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def agree(values, world, device) -> list:
    """The element-wise maximum of ``values`` (small ints) over every process. Under torchrun
    every process must stop at the same step, or the others would wait forever in the next
    gradient all-reduce."""
    if world == 1:
        return list(values)
    flags = torch.tensor(values, device=device)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    agreed = flags.tolist()
    _wait_until_released(flags)
    return agreed


def _wait_until_released(tensor, timeout=10.0):
    """Waits (bounded) until a finished collective holds no more references to ``tensor``. Gloo's
    worker thread drops its reference a moment after ``all_reduce`` returns, and freeing a tensor
    made in Python needs the GIL: had the interpreter begun shutting down by then (the last
    collective before exit), that thread would abort the process."""
    deadline = time.monotonic() + timeout
    while tensor._use_count() > 1 and time.monotonic() < deadline:
        time.sleep(1e-4)
