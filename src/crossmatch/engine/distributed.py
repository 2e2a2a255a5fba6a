"""Distributed setup that returns a value instead of mutating globals, and its teardown. Works without a
process group. The collectives themselves live in `crossmatch.tensors`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", timeout_s: int = 300) -> DistInfo:
    """Read the torchrun/SLURM environment; start a process group only when world_size > 1.

    nccl on CUDA, gloo on CPU. `device`: auto | cpu | cuda.
    """
    world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )
    return DistInfo(rank, local_rank, world_size, dev)


def teardown() -> None:
    """Destroy the process group, if any (call in a `finally`, so a failed run leaves none behind)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
