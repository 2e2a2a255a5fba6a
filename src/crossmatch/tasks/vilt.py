"""ViLT's retrieval fine-tuning objective (Kim et al., ICML 2021): a ranking loss over one positive and
K random captions of other images scored by the ITM head, an ITM loss, and an ITC loss for the cheap
first-stage embedding head.

Legend: B batch, K negatives, E embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from crossmatch.config import LossConfig
from crossmatch.losses.itm import ItcLoss, ItmLoss, sample_random_negatives
from crossmatch.models.vilt import ViLT
from crossmatch.tasks.base import Task, register_task
from crossmatch.tensors import slice_features


@register_task(ViLT)
class ViltTask(Task):
    """rank_loss + itm_loss + itc_loss; settings in `loss.vilt` (ViltLossConfig).

    rank_loss: for each pair b, cross-entropy over the ITM positive logits of [caption b; K random captions
    of other images] with caption b as the target. itm_loss: 2-way cross-entropy over the B positives and,
    to keep the classes balanced, the first random negative of each row.
    """

    def __init__(self, model: ViLT, cfg: LossConfig, rank: int = 0, world_size: int = 1):
        super().__init__(model)
        self.cfg = cfg.vilt
        self.itc, self.itm = ItcLoss(rank, world_size), ItmLoss()

    def training_step(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
        m, cfg, idx = self.model, self.cfg, batch["image_idx"]
        with torch.no_grad():
            m.temp.clamp_(0.001, 0.5)
        img, txt = m.encode_image(batch), m.encode_text(batch)
        B = len(idx)
        neg, valid = sample_random_negatives(idx, cfg.n_negatives)  # (B, K), (B, K)
        K = neg.shape[1]
        txt_rows = torch.cat([torch.arange(B, device=idx.device)[:, None], neg], 1)  # (B, 1+K): positive first
        img_rows = torch.arange(B, device=idx.device)[:, None].expand(B, 1 + K)  # (B, 1+K)
        logits = m.itm_logits(slice_features(img, img_rows.flatten()), slice_features(txt, txt_rows.flatten())).view(
            B, 1 + K, 2
        )
        ok = torch.cat([valid.new_ones(B, 1), valid], 1)  # (B, 1+K): a row short of negatives masks its rest
        scores = logits[..., 1].masked_fill(~ok, float("-inf"))  # (B, 1+K)
        rank = F.cross_entropy(scores, scores.new_zeros(B, dtype=torch.long))
        itm = self.itm(logits[:, 0], logits[:, 1:2][valid[:, :1]])  # (B, 2) positives, (<=B, 2) negatives
        losses = {
            "rank_loss": cfg.rank_weight * rank,
            "itm_loss": cfg.itm_weight * itm,
            "itc_loss": cfg.itc_weight * self.itc(img["embed"], txt["embed"], idx, m.temp),
        }
        return losses, {"temp": m.temp.item()}
