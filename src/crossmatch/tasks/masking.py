"""BERT's masked-token corruption (Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for
Language Understanding", NAACL 2019), shared by the masked-language-modelling terms of ALBEF (tasks/albef.py)
and IRRA's implicit relation reasoning (tasks/irra.py), and the loss on the predicted positions.

Each maskable token is chosen with probability `prob`; of the chosen, 80% become the mask id, 10% a random
token id drawn from [low, high), 10% stay as they were. Only chosen positions are predicted: the labels hold
the original id there and IGNORE (-100, cross-entropy's ignore index) everywhere else. Which tokens are
maskable is the caller's rule (real words only: never padding, never [CLS] / [SOT] / [EOT]).

Legend: B batch, L tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100  # the label of positions that are not predicted (F.cross_entropy's default ignore_index)


def bert_mask(
    ids: Tensor, maskable: Tensor, mask_id: int, random_ids: tuple[int, int], prob: float
) -> tuple[Tensor, Tensor]:
    """BERT's 80/10/10 corruption of the `maskable` tokens.

    Args:
        ids: (B, L) token ids.
        maskable: (B, L) bool, True where a token may be chosen.
        mask_id: the id that replaces 80% of the chosen tokens.
        random_ids: [low, high) of the random ids that replace 10% of them.
        prob: the chance of each maskable token to be chosen.

    Returns:
        masked ids (B, L) and labels (B, L): the original id at chosen positions, IGNORE elsewhere.
    """
    chosen = (torch.rand(ids.shape, device=ids.device) < prob) & maskable  # (B, L)
    labels = ids.masked_fill(~chosen, IGNORE)
    u = torch.rand(ids.shape, device=ids.device)  # one draw decides mask / random / keep
    out = ids.masked_fill(chosen & (u < 0.8), mask_id)
    rand_ids = torch.randint(random_ids[0], random_ids[1], ids.shape, device=ids.device)
    swap = chosen & (u >= 0.8) & (u < 0.9)
    return torch.where(swap, rand_ids, out), labels


def masked_token_loss(head: Callable[[Tensor], Tensor], feats: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of `head`'s predictions over the predicted positions only.

    Args:
        head: token features (n, D) -> logits (n, V); it runs on the predicted positions alone, so the
            (B, L, V) logits of every position are never built.
        feats: (B, L, D) token features.
        labels: (B, L) original ids at the predicted positions, IGNORE elsewhere.

    Returns:
        A scalar; zero (still reaching the head's parameters) when no position is predicted (short captions can
        draw none).
    """
    chosen = labels != IGNORE  # (B, L)
    if not chosen.any():
        return head(feats[:, 0]).sum() * 0.0
    return F.cross_entropy(head(feats[chosen]), labels[chosen])  # (n, V) against (n,)
