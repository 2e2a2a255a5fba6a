"""Text negatives in the training objectives (`loss.text_negatives`): encoding the K perturbed captions of
each pair and scoring them against that pair's image (NegCLIP, Yuksekgonul et al., ICLR 2023).

The batch carries them as neg_input_ids / neg_attention_mask (B, K, L) and neg_valid (B, K) (see
data/loaders.py `collate`). Their features keep the (B, K, ...) layout, rows aligned with the batch, so
GradCache accumulation (tasks/grad_cache.py) slices and replays them like the captions' own features.

Legend: B pairs, K text negatives per pair, L tokens, E embedding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from crossmatch.models.protocols import is_dual_encoder
from crossmatch.tensors import slice_features


def encode_negatives(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """The text tower on the batch's negatives -> each feature (B, K, ...); None when the batch has none."""
    if "neg_input_ids" not in batch:
        return None
    B, K, L = batch["neg_input_ids"].shape
    flat = {
        "input_ids": batch["neg_input_ids"].reshape(B * K, L),
        "attention_mask": batch["neg_attention_mask"].reshape(B * K, L),
    }
    return {
        k: v.reshape(B, K, *v.shape[1:]) for k, v in model.encode_text_features(flat).items()
    }  # (B*K, ...) -> (B, K, ...)


def flat(neg: dict[str, Tensor]) -> dict[str, Tensor]:
    """(B, K, ...) negative features -> (B*K, ...), row b*K + k being negative k of pair b."""
    return {k: v.flatten(0, 1) for k, v in neg.items()}


def paired_scores(model: nn.Module, img: dict[str, Tensor], neg: dict[str, Tensor]) -> Tensor:
    """s(image b, negative k of pair b) with the model's own `similarity`: (B, ...) and (B, K, ...) -> (B, K).

    Dual encoders: the cosine of the embeddings. Others (SCAN): `similarity` of each image with its own K
    negatives, one image at a time (the full (B, B*K) matrix would cost B times more)."""
    if is_dual_encoder(model):
        return torch.einsum("be,bke->bk", img["embed"], neg["embed"])  # (B, K)
    rows = [
        model.similarity(slice_features(img, slice(b, b + 1)), {k: v[b] for k, v in neg.items()})  # (1, K)
        for b in range(len(next(iter(neg.values()))))
    ]
    return torch.cat(rows, 0)  # (B, K)
