"""Gradient accumulation that equals the big batch for in-batch-negative losses: GradCache (Gao et al.,
"Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", RepL4NLP 2021; open_clip's
`--accum-freq` does the same).

With a loss L(f_1, ..., f_N) over the features of N micro-batches, chain rule on each micro-batch's features:
    dL/dθ = sum_k (dL/df_k) · (df_k/dθ)
so the step runs three passes:
  1. encode every micro-batch without a graph and keep only its features f_k (and the RNG state it began with);
  2. compute the loss on the concatenated features, with gradient w.r.t. the features (and w.r.t. the
     objective's own parameters: temperature, fusion layers, ...);
  3. for each micro-batch, restore its RNG state, encode it again with a graph and backpropagate
     sum(f_k * dL/df_k): the tower gradients of its slice. The objective's parameter gradients ride on
     the last backward, so under DDP (gradients synced on the last micro-batch) every parameter is reduced once.
Pass 3 replays pass 1 exactly (same inputs, same dropout masks; augmentation happened in the loader), so the
sum equals the gradient of the whole batch as one, up to float summation order; the cost is a second forward
of the towers, and the memory that of one micro-batch's graph plus all features. Layers that use batch
statistics (BatchNorm in train mode) see micro-batch statistics: that part is not the big batch's. Buffers
(running statistics, queues) are restored after pass 1, so pass 3 updates them once, as plain accumulation does.

Legend: B rows of a micro-batch, N_total rows of the step, L tokens, D width.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

Feats = dict[str, dict[str, Tensor]]


def cat_padded(parts: list[Tensor]) -> Tensor:
    """Concatenate along dim 0, dims >= 1 zero-padded (False for masks) to the largest: (B_k, L_k, ..) -> (N, L, ..)."""
    shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].ndim)]
    if all(list(p.shape[1:]) == shape for p in parts):
        return torch.cat(parts)
    out = parts[0].new_zeros((sum(len(p) for p in parts), *shape))
    row = 0
    for p in parts:
        out[(slice(row, row + len(p)), *(slice(0, s) for s in p.shape[1:]))] = p
        row += len(p)
    return out


def merge_batches(batches: list[dict]) -> dict:
    """What the objective reads of the concatenated batch: every tensor but the images, concatenated (padded);
    scalars (epoch_progress) from the first micro-batch."""
    out = {}
    for key, value in batches[0].items():
        if key == "image":
            continue
        out[key] = cat_padded([b[key] for b in batches]) if torch.is_tensor(value) else value
    return out


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def replay_rng(state: tuple[Tensor, Tensor | None], device: torch.device):
    """Run the block from a saved RNG state, then put the global RNG back where it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def grad_cache_step(
    task,
    batches: list[dict[str, Tensor]],
    module: Callable,
    scale: Callable[[Tensor], Tensor] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """One optimizer step's forward and backward over `batches` (see the module docstring). Gradients are
    accumulated into `.grad` (scaled by `scale`, the fp16 GradScaler's, when given); returns the
    objective's (losses detached, logs)."""
    scale = scale or (lambda t: t)
    autocast = autocast or contextlib.nullcontext
    device = batches[0]["image_idx"].device
    saved_buffers = [b.detach().clone() for b in task.buffers()]
    states, chunks = [], []
    with torch.no_grad():  # 1. features of every micro-batch, no graph
        for batch in batches:
            states.append(_rng_state(device))
            with autocast():
                chunks.append(module(batch, encode_only=True))
    for buf, saved in zip(task.buffers(), saved_buffers, strict=True):
        buf.copy_(saved)
    feats: Feats = {
        group: {key: cat_padded([c[group][key] for c in chunks]) for key in chunks[0][group]} for group in chunks[0]
    }
    leaves = [(g, k) for g in feats for k, v in feats[g].items() if v.is_floating_point()]
    for g, k in leaves:
        feats[g][k].requires_grad_(True)
    with autocast():  # 2. the loss of the whole step on those features
        losses, logs = task.objective(feats, merge_batches(batches))
    params = [p for p in task.parameters() if p.requires_grad]
    grads = torch.autograd.grad(
        scale(sum(losses.values())), [feats[g][k] for g, k in leaves] + params, allow_unused=True
    )
    feat_grads, param_grads = dict(zip(leaves, grads[: len(leaves)], strict=True)), grads[len(leaves) :]
    row = 0
    for i, (batch, state) in enumerate(zip(batches, states, strict=True)):  # 3. replay with a graph, chain rule
        last, n = i == len(batches) - 1, len(batch["image_idx"])
        sync = contextlib.nullcontext() if last or not hasattr(module, "no_sync") else module.no_sync()
        with sync:
            with replay_rng(state, device), autocast():
                out = module(batch, encode_only=True)
            surrogate = sum(
                (out[g][k] * feat_grads[g, k][(slice(row, row + n), *(slice(0, s) for s in out[g][k].shape[1:]))]).sum()
                for g, k in leaves
                if feat_grads[g, k] is not None
            ) + torch.zeros((), device=device)
            if last:  # the objective's own parameters, once
                pairs = zip(params, param_grads, strict=True)
                surrogate = surrogate + sum((p * g).sum() for p, g in pairs if g is not None)
            surrogate.backward()
        row += n
    return {k: v.detach() for k, v in losses.items()}, logs
