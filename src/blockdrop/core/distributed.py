"""PyTorch's own distributed stack, used the same way in one CPU process or under torchrun.

`torchrun --nproc-per-node N -m blockdrop train ...` sets RANK/WORLD_SIZE; ``init_from_env``
then starts a process group (NCCL on CUDA, gloo on CPU). Without those variables every
helper here is a no-op, so the single-process path needs no special casing.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as tdist
from torch import nn


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def main_result(fn):
    """``fn()`` computed on rank 0 only and its (picklable) result handed to every rank, so
    that decisions taken from it (which block to drop, whether to stop) are the same on all
    ranks. An exception on rank 0 is raised on every rank (no rank waits forever for a result
    that never comes). In one process it is just ``fn()``."""
    if not is_initialized():
        return fn()
    box = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except Exception as err:  # noqa: BLE001  (re-raised below, on every rank)
            box[0] = ("error", err)
    tdist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def init_from_env(backend: str | None = None) -> torch.device:
    """Join the process group that torchrun describes; return this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        tdist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def wrap_ddp(model: nn.Module) -> nn.Module:
    """DistributedDataParallel when a process group is up, the model itself otherwise."""
    if not is_initialized():
        return model
    device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
