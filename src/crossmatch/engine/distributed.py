"""Distributed setup that returns a value instead of mutating globals, and its teardown. Works without a
process group. The collectives themselves live in `crossmatch.tensors`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from crossmatch.errors import ConfigError


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

    nccl on CUDA, gloo on CPU. `device`: auto (cuda when available) | cpu | cuda | cuda:N; under torchrun
    `cuda` means this process's local rank.

    Raises:
        ConfigError: an unknown device string, or CUDA asked for where none is available.
    """
    world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, local_rank, world_size, dev)


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a torch.device (cuda for 'auto' when CUDA is available)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise ConfigError(f"device {device!r}: choose auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: no CUDA device is available here (use --device cpu)")
    index = int(device.split(":")[1]) if ":" in device else local_rank
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device("cuda", index)


def teardown() -> None:
    """Destroy the process group, if any (call in a `finally`, so a failed run leaves none behind)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
