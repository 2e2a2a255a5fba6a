"""Contrastive losses of dual encoders: InfoNCE as CLIP trains it (Radford et al., "Learning Transferable
Visual Models From Natural Language Supervision", ICML 2021) and the pairwise sigmoid loss of SigLIP (Zhai
et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023).

Both score image row i against caption column j with s * <x_i, y_j> (l2-normalised features, s the learned
scale; SigLIP adds a learned bias b). Pair b of a batch is (image b, caption b); `image_idx` says which
image a pair shows, and every caption of the same image is a positive (several captions of one image often
share a batch), never a negative:
    InfoNCE: (CE_i2t + CE_t2i) / 2, each row's target the normalised positive mask (as ALBEF's ITC), mean
             over rows;
    SigLIP:  -1/B sum_ij log sigmoid(z_ij (s <x_i, y_j> + b)), z_ij = +1 for positives and -1 otherwise.

Distributed (explicit `rank` / `world_size`): every rank gathers all ranks' features with gradient. By
default it scores the whole global matrix; with `local` (open_clip's `--local-loss`) only its own rows
against all columns, normalised by its own row count. Either way the DDP-averaged gradient equals the
single-process gradient on the global batch: the all-gather's backward sums the rows' gradients over ranks.

Text negatives (NegCLIP, Yuksekgonul et al., ICLR 2023; `loss.text_negatives`): K perturbed captions per
pair b are extra columns of row b of the image -> caption logits only (target 0; never rows: they have no
image), `neg_valid` False marking empty slots, which are left out of the softmax. SigLIP scores them as
further negative pairs (z = -1). Under DDP they follow their row (gathered with it unless `local`).

Legend: B rows scored here (this rank's batch with `local`, else all ranks'), N columns (all ranks'), E embedding,
K text negatives per pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossmatch.losses.itm import positive_targets, soft_cross_entropy, with_negative_columns
from crossmatch.tensors import gather, gather_rows


class _GatheredLoss(nn.Module):
    """The rows and columns a rank scores: its own rows (`local`) or all, against every rank's columns."""

    def __init__(self, rank: int = 0, world_size: int = 1, local: bool = False):
        super().__init__()
        self.rank, self.world_size, self.local = rank, world_size, local

    def negative_logits(self, image_feat: Tensor, neg_feat: Tensor, neg_valid: Tensor, scale: Tensor):
        """Row b's logits against its own K text negatives: (B_rank, E), (B_rank, K, E), (B_rank, K) -> (B, K)
        and the (B, K) valid mask, gathered over ranks unless `local` (so they follow their rows)."""
        logits = scale * torch.einsum("be,bke->bk", image_feat, neg_feat)  # (B_rank, K)
        return (logits, neg_valid) if self.local else gather_rows(logits, neg_valid, self.world_size)  # (B, K)

    def rows_and_columns(self, image_feat: Tensor, text_feat: Tensor, image_idx: Tensor):
        """(B_rank, E), (B_rank, E), (B_rank,) -> rows (img, txt, idx) and columns (img, txt, idx), all gathered."""
        cols = tuple(gather(t, self.world_size) for t in (image_feat, text_feat, image_idx))
        rows = (image_feat, text_feat, image_idx) if self.local else cols
        return rows, cols


class InfoNCELoss(_GatheredLoss):
    """CLIP's symmetric cross-entropy over the scaled cosine matrix, every caption of the same image a positive."""

    def forward(
        self,
        image_feat: Tensor,
        text_feat: Tensor,
        image_idx: Tensor,
        scale: Tensor,
        neg_feat: Tensor | None = None,
        neg_valid: Tensor | None = None,
    ) -> Tensor:
        """image_feat, text_feat (B_rank, E) l2-normalised, image_idx (B_rank,), scale: the scalar s; optional
        text negatives neg_feat (B_rank, K, E) l2-normalised with neg_valid (B_rank, K) -> scalar."""
        (img, txt, idx), (img_all, txt_all, idx_all) = self.rows_and_columns(image_feat, text_feat, image_idx)
        # (B, N), float32 at least (bf16 targets would round 1/3); the same-image relation is symmetric
        targets = positive_targets(idx, idx_all, torch.promote_types(img.dtype, torch.float32))
        logits_i2t = scale * img @ txt_all.t()  # (B, N) image rows over all captions
        logits_t2i = scale * txt @ img_all.t()  # (B, N) caption rows over all images
        if neg_feat is None:
            return (soft_cross_entropy(logits_i2t, targets) + soft_cross_entropy(logits_t2i, targets)) / 2
        neg, valid = self.negative_logits(image_feat, neg_feat, neg_valid, scale)  # (B, K)
        i2t, i2t_targets = with_negative_columns(logits_i2t, targets, neg, valid)  # (B, N + K)
        return (soft_cross_entropy(i2t, i2t_targets) + soft_cross_entropy(logits_t2i, targets)) / 2


class SigLipLoss(_GatheredLoss):
    """SigLIP: an independent binary problem per (image, caption) pair, normalised by the rows' batch size.

    Gathering every rank's captions stands in for the paper's rank-to-rank chunk exchange (same value, more
    memory on very large batches)."""

    def forward(
        self,
        image_feat: Tensor,
        text_feat: Tensor,
        image_idx: Tensor,
        scale: Tensor,
        bias: Tensor,
        neg_feat: Tensor | None = None,
        neg_valid: Tensor | None = None,
    ) -> Tensor:
        """image_feat, text_feat (B_rank, E) l2-normalised, image_idx (B_rank,), scale s and bias b; optional
        text negatives neg_feat (B_rank, K, E) with neg_valid (B_rank, K), each a pair with z = -1 -> scalar."""
        (img, _, idx), (_, txt_all, idx_all) = self.rows_and_columns(image_feat, text_feat, image_idx)
        logits = scale * img @ txt_all.t() + bias  # (B, N)
        sign = 2.0 * (idx[:, None] == idx_all[None, :]).to(logits.dtype) - 1.0  # (B, N) z: +1 positive, -1 negative
        loss = -F.logsigmoid(sign * logits).sum()
        if neg_feat is not None:
            neg, valid = self.negative_logits(image_feat, neg_feat, neg_valid, scale)  # (B, K)
            loss = loss - F.logsigmoid(-(neg + bias))[valid].sum()
        return loss / img.shape[0]
