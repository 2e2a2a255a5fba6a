"""Distributed setup that returns a value instead of mutating globals. Works without a process group."""

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


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_max(x: torch.Tensor) -> float:
    """Max of a scalar over ranks (the value itself when not distributed)."""
    if get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return float(x)


def all_gather_objects(obj: object) -> list:
    """Every rank's picklable `obj`, in rank order ([obj] when not distributed)."""
    if get_world_size() == 1:
        return [obj]
    out: list = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (same shape on every rank) from all ranks along dim 0, without gradient."""
    if get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Like all_gather_cat, but gradients flow back to every rank's input (contrastive losses)."""
    if get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()))


def _comm_device() -> torch.device:
    # nccl moves CUDA tensors only; gloo CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather_varlen(x: torch.Tensor) -> list[torch.Tensor]:
    """Gather tensors of equal ndim whose shapes differ across ranks. Dims >= 1 are zero-padded to the
    largest over ranks; dim 0 keeps each rank's own length. Returns one tensor per rank, on x's device."""
    if get_world_size() == 1:
        return [x]
    dev, ws = _comm_device(), get_world_size()
    shape = torch.tensor(x.shape, device=dev)
    shapes = [torch.empty_like(shape) for _ in range(ws)]
    dist.all_gather(shapes, shape)
    top = torch.stack(shapes).max(0).values.tolist()
    pad = []
    for d in reversed(range(x.ndim)):  # F.pad lists the last dim first
        pad += [0, top[d] - x.shape[d]]
    is_bool = x.dtype == torch.bool
    xp = torch.nn.functional.pad(x.to(dev, torch.uint8 if is_bool else x.dtype), pad)
    out = [torch.empty_like(xp) for _ in range(ws)]
    dist.all_gather(out, xp)
    return [o[: int(sh[0])].to(x.device, torch.bool if is_bool else x.dtype) for o, sh in zip(out, shapes, strict=True)]


def rank_range(n: int) -> range:
    """This rank's contiguous share of n work items (all of them when not distributed)."""
    ws, r = get_world_size(), get_rank()
    per = -(-n // ws)
    return range(min(n, r * per), min(n, (r + 1) * per))


def gather_batch_with_grad(feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """All ranks' feature dicts concatenated along dim 0 (rank order), gradients flowing back to each
    rank's own rows; token dims (dim 1 of 3-D tensors) are padded to the longest over ranks first."""
    if get_world_size() == 1:
        return feats
    out = {}
    for key, x in feats.items():
        if not x.is_floating_point():  # ids, masks, lengths: no gradient, dims padded by all_gather_varlen
            out[key] = torch.cat(all_gather_varlen(x))
            continue
        if x.ndim == 3:  # (B, L, D) token features: pad L to the longest over ranks
            width = int(all_reduce_max(torch.tensor(float(x.shape[1]), device=_comm_device())))
            x = torch.nn.functional.pad(x, [0, 0, 0, width - x.shape[1]])
        out[key] = all_gather_with_grad(x)
    return out


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
