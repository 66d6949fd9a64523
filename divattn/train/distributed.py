"""One process or many (``torchrun``): rank, device and the few collectives the trainer needs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={name!r} was asked for but torch sees no CUDA device")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def init(device_name: str) -> Dist:
    """Join the process group ``torchrun`` describes in the environment (NCCL on GPUs,
    gloo on CPU), or run alone when ``WORLD_SIZE`` is unset or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, device)


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(d: Dist, values) -> torch.Tensor:
    """Sum a list of numbers (or a tensor) over all ranks; float64 on the rank's device."""
    t = torch.as_tensor(values, dtype=torch.float64)
    if d.enabled:
        t = t.to(d.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
