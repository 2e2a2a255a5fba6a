"""ViLT's retrieval fine-tuning objective (Kim et al., ICML 2021): a ranking loss over one positive and
K captions of other images (random, or hard ones by the cheap head) scored by the ITM head, an ITM loss,
and an ITC loss for the cheap first-stage embedding head.

Text negatives (`loss.text_negatives` N > 0): the N perturbed captions of each pair join the ranking
candidates of its row, are ITM negative pairs (image b, negative of pair b) -> label 0, and extra i2t ITC
columns of the cheap head.

Legend: B batch, K negatives of the ranking loss, N text negatives per pair, E embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from crossmatch.config import LossConfig
from crossmatch.losses.itm import ItcLoss, ItmLoss, sample_hard_negative_set, sample_random_negatives
from crossmatch.models.vilt import ViLT
from crossmatch.tasks.base import Task, register_task
from crossmatch.tasks.text_negatives import encode_negatives, flat
from crossmatch.tensors import slice_features


@register_task(ViLT.family)
class ViltTask(Task):
    """rank_loss + itm_loss + itc_loss; settings in `loss.vilt` (ViltLossConfig).

    rank_loss: for each pair b, cross-entropy over the ITM positive logits of [caption b; K captions of other
    images] with caption b as the target; the K are random (`negatives: random`, ViLT) or drawn without
    replacement by softmax of the cheap head's ITC logits (`hard`, ALBEF's draw). itm_loss: 2-way
    cross-entropy over the B positives and, to keep the classes balanced, the first negative of each row.
    """

    uses_text_negatives = True

    def __init__(self, model: ViLT, cfg: LossConfig, rank: int = 0, world_size: int = 1):
        super().__init__(model)
        self.cfg = cfg.vilt
        self.itc, self.itm = ItcLoss(rank, world_size), ItmLoss()

    def training_step(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
        m, cfg, idx = self.model, self.cfg, batch["image_idx"]
        with torch.no_grad():
            m.temp.clamp_(0.001, 0.5)
        img, txt = m.encode_image_features(batch), m.encode_text_features(batch)
        B = len(idx)
        if cfg.negatives == "hard":  # the candidates the cheap head will hand the re-ranker at test time
            sim = (m.similarity(img, txt) / m.temp).detach()  # (B, B) cheap-head ITC logits, image row, caption column
            neg, valid = sample_hard_negative_set(sim, idx, cfg.n_negatives)  # (B, K), (B, K)
        else:
            neg, valid = sample_random_negatives(idx, cfg.n_negatives)  # (B, K), (B, K)
        K = neg.shape[1]
        txt_rows = torch.cat([torch.arange(B, device=idx.device)[:, None], neg], 1)  # (B, 1+K): positive first
        img_rows = torch.arange(B, device=idx.device)[:, None].expand(B, 1 + K)  # (B, 1+K)
        logits = m.itm_logits(slice_features(img, img_rows.flatten()), slice_features(txt, txt_rows.flatten())).view(
            B, 1 + K, 2
        )
        ok = torch.cat([valid.new_ones(B, 1), valid], 1)  # (B, 1+K): a row short of negatives masks its rest
        negatives = logits[:, 1:2][valid[:, :1]]  # (<=B, 2): the first random negative of each row
        text_neg, neg_itc = encode_negatives(m, batch), {}  # (B, N, ...) text negatives, or None
        if text_neg is not None:
            N, neg_valid = batch["neg_valid"].shape[1], batch["neg_valid"]  # (B, N)
            rows = torch.arange(B, device=idx.device).repeat_interleave(N)  # (B*N,) image of each negative
            neg_logits = m.itm_logits(slice_features(img, rows), flat(text_neg)).view(B, N, 2)  # (B, N, 2)
            logits, ok = torch.cat([logits, neg_logits], 1), torch.cat([ok, neg_valid], 1)  # (B, 1+K+N, ...)
            negatives = torch.cat([negatives, neg_logits[neg_valid]])  # (<=B + n_neg, 2)
            neg_itc = {"neg_feat": text_neg["embed"], "neg_valid": neg_valid}
        scores = logits[..., 1].masked_fill(~ok, float("-inf"))  # (B, 1+K[+N])
        rank = F.cross_entropy(scores, scores.new_zeros(B, dtype=torch.long))
        itm = self.itm(logits[:, 0], negatives)  # (B, 2) positives
        losses = {
            "rank_loss": cfg.rank_weight * rank,
            "itm_loss": cfg.itm_weight * itm,
            "itc_loss": cfg.itc_weight * self.itc(img["embed"], txt["embed"], idx, m.temp, **neg_itc),
        }
        return losses, {"temp": m.temp.item()}
