"""torch.distributed plumbing for a run launched by torchrun (one process per GPU).

Without torchrun (no WORLD_SIZE in the environment) everything is a no-op for one
process, so the single-process path needs no special cases.
"""
from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist


def init_from_env() -> tuple[int, int]:
    """(rank, world size); starts the process group when torchrun launched us.

    NCCL with one GPU per local rank on CUDA, gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or is_initialized():
        return rank(), world_size()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return rank(), world_size()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place sum or max over ranks of a CPU tensor (identity for one process)."""
    if world_size() > 1:
        device = x.device
        if dist.get_backend() == "nccl":
            x_dev = x.cuda()
            dist.all_reduce(x_dev, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
            x.copy_(x_dev.to(device))
        else:
            dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return x


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list for one process)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()
