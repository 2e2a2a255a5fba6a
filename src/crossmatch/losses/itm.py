"""Image-text contrastive (ITC) and image-text matching (ITM) losses of ALBEF (Li et al., NeurIPS 2021),
with hard negatives for ITM drawn from the ITC similarities, and ViLT's (Kim et al., ICML 2021) random
negatives for its ranking loss (or a hard set of them, drawn by the first stage's similarities).

Positives are defined by `image_idx`: every caption of the same image is a positive of that image, so
the ITC target of a row is the normalised positive mask, never the identity.

Distributed: `ItcLoss` gathers the features of all ranks (with gradient) and scores its local rows
against every rank's columns. Negative sampling for ITM stays local to each rank's batch.

Legend: B batch (rows of this rank), N columns (all ranks' batches, plus a queue), E embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossmatch.tensors import gather


def positive_targets(row_idx: Tensor, col_idx: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Soft targets from image ids: row_idx (B,), col_idx (N,) -> (B, N), each row's positives share 1.

    A row without any positive column (cannot happen when the batch itself is among the columns) is all 0.
    """
    pos = (row_idx[:, None] == col_idx[None, :]).to(dtype)  # (B, N)
    return pos / pos.sum(1, keepdim=True).clamp(min=1)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of -sum_j targets[i, j] * log_softmax(logits)[i, j]: (B, N), (B, N) -> scalar."""
    return -(F.log_softmax(logits, dim=1) * targets).sum(1).mean()


def with_negative_columns(logits: Tensor, targets: Tensor, neg: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Logits (B, N) and soft targets (B, N) with K more columns of text negatives (B, K), target 0; an
    empty slot (valid False) gets the lowest finite logit, so it takes no probability and no gradient (-inf
    would make 0 * log 0 = nan in the cross-entropy)."""
    neg = neg.to(logits.dtype).masked_fill(~valid, torch.finfo(logits.dtype).min)  # (B, K)
    return torch.cat([logits, neg], 1), torch.cat([targets, targets.new_zeros(neg.shape)], 1)  # (B, N + K)


@dataclass
class MomentumBank:
    """What momentum distillation adds to ITC: the momentum features of this batch and the queues."""

    image_feat: Tensor  # (B, E) momentum image features of this rank's batch, l2-normalised
    text_feat: Tensor  # (B, E) momentum text features of this rank's batch, l2-normalised
    image_queue: Tensor  # (Q, E) momentum image features of earlier batches
    text_queue: Tensor  # (Q, E) momentum text features of earlier batches
    idx_queue: Tensor  # (Q,) image_idx of the queued items (-1 for never-filled slots)


class ItcLoss(nn.Module):
    """ALBEF's image-text contrastive loss, (i2t + t2i) / 2, with several positives per row.

    Without a bank: rows are this rank's features, columns every rank's features, targets the normalised
    positive mask. With a `MomentumBank`: columns are the momentum features of every rank plus the queue,
    and targets are alpha * softmax(momentum sims) + (1 - alpha) * positive mask (momentum distillation).
    """

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.rank, self.world_size = rank, world_size

    def forward(
        self,
        image_feat: Tensor,
        text_feat: Tensor,
        image_idx: Tensor,
        temp: Tensor,
        bank: MomentumBank | None = None,
        alpha: float = 0.0,
        neg_feat: Tensor | None = None,
        neg_valid: Tensor | None = None,
    ) -> Tensor:
        """image_feat, text_feat (B, E) l2-normalised, image_idx (B,), temp scalar -> scalar loss.

        Text negatives neg_feat (B, K, E) l2-normalised with neg_valid (B, K) are K extra i2t columns of
        their own row (target 0, empty slots left out; with distillation the momentum target puts no mass
        on them either: it is a distribution over the other columns)."""
        idx_all = gather(image_idx, self.world_size)  # (N,)
        if bank is None:
            img_cols, txt_cols = gather(image_feat, self.world_size), gather(text_feat, self.world_size)  # (N, E)
        else:
            with torch.no_grad():
                img_cols = torch.cat([gather(bank.image_feat, self.world_size), bank.image_queue], 0)  # (N+Q, E)
                txt_cols = torch.cat([gather(bank.text_feat, self.world_size), bank.text_queue], 0)  # (N+Q, E)
                idx_all = torch.cat([idx_all, bank.idx_queue], 0)  # (N+Q,)
        hard = positive_targets(image_idx, idx_all)  # (B, N[+Q]); the relation is symmetric in i2t and t2i
        t_i2t, t_t2i = hard, hard
        if bank is not None and alpha > 0:
            with torch.no_grad():
                t_i2t = alpha * F.softmax(bank.image_feat @ txt_cols.t() / temp, 1) + (1 - alpha) * hard
                t_t2i = alpha * F.softmax(bank.text_feat @ img_cols.t() / temp, 1) + (1 - alpha) * hard
        sim_i2t = image_feat @ txt_cols.t() / temp  # (B, N[+Q])
        sim_t2i = text_feat @ img_cols.t() / temp  # (B, N[+Q])
        if neg_feat is not None:
            neg = torch.einsum("be,bke->bk", image_feat, neg_feat) / temp  # (B, K) row b's own negatives
            sim_i2t, t_i2t = with_negative_columns(sim_i2t, t_i2t, neg, neg_valid)  # (B, N[+Q] + K)
        return (soft_cross_entropy(sim_i2t, t_i2t) + soft_cross_entropy(sim_t2i, t_t2i)) / 2


def _draw(sim: Tensor, positive: Tensor, generator: torch.Generator | None) -> Tensor:
    """One column per row with probability softmax(sim) restricted to the non-positive columns; -1 where a
    row has no negative. sim, positive (B, N) -> (B,) long."""
    has_neg = (~positive).any(1, keepdim=True)  # (B, 1)
    # Masking before the softmax (instead of zeroing after it) keeps every row with a negative non-zero even
    # when exp() would underflow; a row without negatives draws uniformly and is then discarded.
    logits = sim.float().masked_fill(positive, float("-inf")).masked_fill(~has_neg, 0.0)  # (B, N)
    weights = F.softmax(logits, dim=1)  # (B, N)
    draw = torch.multinomial(weights, 1, generator=generator).squeeze(1)  # (B,)
    return draw.masked_fill(~has_neg.squeeze(1), -1)


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: Tensor, sim_t2i: Tensor, image_idx: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """ALBEF's hard negatives: for each image a caption of another image, for each caption an image of
    another caption, drawn with probability softmax(ITC similarity) over the negatives.

    Args:
        sim_i2t: (B, B) ITC logits of image row i against caption column t (the batch's own pairs).
        sim_t2i: (B, B) ITC logits of caption row t against image column i.
        image_idx: (B,) image id of each pair; columns with the row's image id are positives, never drawn.
        generator: optional torch.Generator for reproducible draws.
    Returns:
        neg_txt_for_img (B,): index of the negative caption of each image; neg_img_for_txt (B,): index of
        the negative image of each caption. -1 where a row has no negative (every pair of the batch shows
        the same image); callers drop those rows.
    """
    positive = image_idx[:, None] == image_idx[None, :]  # (B, B)
    return _draw(sim_i2t, positive, generator), _draw(sim_t2i, positive, generator)


@torch.no_grad()
def sample_random_negatives(
    image_idx: Tensor, n: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """ViLT's negatives: for each pair, n distinct captions of other images, uniformly without replacement.

    Args:
        image_idx: (B,) image id of each pair.
        n: negatives per row; at most B - 1 are drawn.
        generator: optional torch.Generator for reproducible draws.
    Returns:
        neg (B, k) caption indices with k = min(n, B - 1), and valid (B, k) bool: False where the row had
        fewer than k negatives (the index there is a positive and must be ignored).
    """
    B = image_idx.shape[0]
    keys = torch.rand(B, B, generator=generator, device=image_idx.device)  # (B, B) random keys in [0, 1)
    return _top_negatives(keys, image_idx, n)  # the k largest random keys = a uniform k-subset


@torch.no_grad()
def sample_hard_negative_set(
    sim: Tensor, image_idx: Tensor, n: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """n distinct captions of other images per row, drawn one after another without replacement with
    probability softmax(sim) over the columns still left (ALBEF's hard-negative draw, n times per row).

    Gumbel top-k: the n largest of sim + Gumbel noise are such a sequential draw, in one topk.

    Args:
        sim: (B, B) first-stage logits of image row b against caption column t (detached).
        image_idx: (B,) image id of each pair; columns with the row's image id are positives, never drawn.
        n: negatives per row; at most B - 1 are drawn.
        generator: optional torch.Generator for reproducible draws.
    Returns:
        neg (B, k), valid (B, k) as `sample_random_negatives`; neg[:, 0] is one ALBEF hard negative per row.
    """
    u = torch.rand(sim.shape, generator=generator, device=sim.device).clamp_(min=1e-12)  # (B, B) in (0, 1)
    return _top_negatives(sim.float() - torch.log(-torch.log(u)), image_idx, n)  # (B, B) sim + Gumbel(0, 1)


def _top_negatives(keys: Tensor, image_idx: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The k = min(n, B - 1) columns of largest key per row among the non-positives: keys (B, B) ->
    neg (B, k) in decreasing key order, valid (B, k) False where a row ran out of negatives."""
    positive = image_idx[:, None] == image_idx[None, :]  # (B, B)
    top, neg = keys.masked_fill(positive, float("-inf")).topk(min(n, len(image_idx) - 1), dim=1)  # (B, k)
    return neg, top > float("-inf")


class ItmLoss(nn.Module):
    """Two-way image-text matching: cross-entropy of positive pairs (label 1) and negative pairs (label 0).

    Purely local (no communication), so it needs no rank or world size.
    """

    def forward(self, pos_logits: Tensor, neg_logits: Tensor) -> Tensor:
        """pos_logits (P, 2), neg_logits (N, 2) -> scalar mean cross-entropy over the P + N pairs."""
        logits = torch.cat([pos_logits, neg_logits], 0)  # (P+N, 2)
        labels = torch.cat([pos_logits.new_ones(len(pos_logits)), neg_logits.new_zeros(len(neg_logits))]).long()
        return F.cross_entropy(logits, labels)
