"""Feature dicts and collectives: the low-level helpers that data loading, losses, the engine and
retrieval share. Every function works without a process group (world size 1 is a no-op).

A *feature dict* maps names to tensors whose dim 0 indexes items (images or captions): e.g. `embed`
(N, E), `tokens` (N, L, D), `mask` (N, L). Token dims may differ between batches; concatenation zero-pads
them (padding is masked out by every model).

Collectives: `gather(x, world_size)` is the one all-gather of equal-length batches (gradients flow back
to every rank's rows for floating tensors, as contrastive losses need); `all_gather_varlen` gathers
tensors whose lengths differ by rank (evaluation shards), without gradient.

Legend: N items, B batch of one rank, W world size, L tokens, D width.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

FeatureDict = dict[str, Tensor]


# ---- feature dicts --------------------------------------------------------------------------------
def to_device(batch: dict, device: torch.device) -> dict:
    """Move every tensor of a batch or feature dict to `device` (other values are kept)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def cat_features(chunks: list[FeatureDict]) -> FeatureDict:
    """Concatenate per-batch feature dicts along dim 0, zero-padding dim 1 of token features."""
    out = {}
    for key in chunks[0]:
        parts = [c[key] for c in chunks]
        if parts[0].ndim >= 2 and len({p.shape[1] for p in parts}) > 1:
            width = max(p.shape[1] for p in parts)
            parts = [nn.functional.pad(p, [0, 0] * (p.ndim - 2) + [0, width - p.shape[1]]) for p in parts]
        out[key] = torch.cat(parts)
    return out


def slice_features(feats: FeatureDict, index: slice | Tensor) -> FeatureDict:
    """The rows `index` of every tensor: (N, ...) -> (n, ...)."""
    return {k: v[index] for k, v in feats.items()}


# ---- ranks -----------------------------------------------------------------------------------------
def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank_range(n: int) -> range:
    """This rank's contiguous share of n work items (all of them when not distributed)."""
    ws, r = get_world_size(), get_rank()
    per = -(-n // ws)
    return range(min(n, r * per), min(n, (r + 1) * per))


def _comm_device() -> torch.device:
    # nccl moves CUDA tensors only; gloo CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# ---- collectives -----------------------------------------------------------------------------------
def barrier() -> None:
    """Wait for every rank (a no-op when not distributed)."""
    if get_world_size() > 1:
        dist.barrier()


def all_gather_objects(obj: object) -> list:
    """Every rank's picklable `obj`, in rank order ([obj] when not distributed)."""
    if get_world_size() == 1:
        return [obj]
    out: list = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_max(x: Tensor) -> float:
    """Max of a scalar over ranks (the value itself when not distributed)."""
    if get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return float(x)


def gather(x: Tensor, world_size: int) -> Tensor:
    """Every rank's `x` (B, ...) concatenated in rank order -> (W * B, ...). Floating tensors keep their
    gradient: each rank's rows backpropagate to that rank. A no-op when world_size == 1."""
    if world_size == 1:
        return x
    if x.is_floating_point():
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x.contiguous()))
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gather_rows(scores: Tensor, valid: Tensor, world_size: int) -> tuple[Tensor, Tensor]:
    """(B_rank, K) scores (with gradient) and their (B_rank, K) bool mask -> every rank's, in rank order (the
    batch rows' order). A no-op when world_size == 1."""
    if world_size == 1:
        return scores, valid
    return gather(scores, world_size), gather(valid.to(torch.uint8), world_size).bool()


def all_gather_varlen(x: Tensor) -> list[Tensor]:
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


def gather_features(feats: FeatureDict, world_size: int) -> FeatureDict:
    """All ranks' feature dicts concatenated along dim 0 (rank order), gradients flowing back to each
    rank's own rows; token dims (dim 1 of 3-D float tensors) are padded to the longest over ranks first."""
    if world_size == 1:
        return feats
    out = {}
    for key, x in feats.items():
        if not x.is_floating_point():  # ids, masks, lengths: no gradient, dims padded by all_gather_varlen
            out[key] = torch.cat(all_gather_varlen(x))
            continue
        if x.ndim == 3:  # (B, L, D) token features: pad L to the longest over ranks
            width = int(all_reduce_max(torch.tensor(float(x.shape[1]), device=_comm_device())))
            x = torch.nn.functional.pad(x, [0, 0, 0, width - x.shape[1]])
        out[key] = gather(x, world_size)
    return out
