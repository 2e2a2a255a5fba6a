"""IRRA's training objective (Jiang & Ye, CVPR 2023): similarity distribution matching (SDM) on the dual
encoder's embeddings, plus implicit relation reasoning (IRR): masked-token prediction of each caption from its
cross-modal features (models/irra.py). Relevance is by person identity (batch["pid"], else batch["image_idx"]).

    sdm_loss = SDM(image embed, text embed, ids; tau = loss.identity.temperature)   (losses/identity.py)
    id_loss  = loss.identity.id_weight * IRRA's ID loss (one identity classifier shared by both sides)
    mlm_loss = loss.identity.mlm_weight * CE at the masked positions only

Masking (`mask_caption`): BERT's 80/10/10 (tasks/masking.py) on `loss.identity.mlm_prob` of the real tokens,
never padding, [SOT] (first) or [EOT] (last real token); random replacements are ids in [1, mask_id), as
IRRA draws them. Where IRRA forces one masked token into a caption that drew none, a caption without a draw
predicts nothing here (and a batch without any gives a zero mlm_loss).

The IRR pass runs whenever the model has its cross-modal encoder (model.mlm), also at mlm_weight 0, so every
parameter gets a gradient (DDP needs that); its weight scales it. `encode` runs the image tower (embedding and
tokens) and the text tower; `objective` draws the masks for the whole step and runs the masked captions through
the text tower and the cross-modal encoder, so accumulated micro-batches (GradCache) give the big batch's step.

Legend: B batch, L tokens, R image tokens, E embedding, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from crossmatch.config import LossConfig
from crossmatch.errors import ConfigError
from crossmatch.losses.identity import SdmLoss
from crossmatch.models.irra import IrraModel
from crossmatch.tasks.base import register_task
from crossmatch.tasks.identity import IdentityTask, embedding_width
from crossmatch.tasks.masking import bert_mask, masked_token_loss


def maskable_tokens(mask: Tensor) -> Tensor:
    """(B, L) right-padded attention mask -> (B, L) True on the real tokens between [SOT] and [EOT]."""
    B, L = mask.shape
    last = mask.long().sum(1, keepdim=True) - 1  # (B, 1) the [EOT] position
    pos = torch.arange(L, device=mask.device)[None]  # (1, L)
    return mask.bool() & (pos > 0) & (pos < last)


def mask_caption(ids: Tensor, mask: Tensor, mask_id: int, prob: float) -> tuple[Tensor, Tensor]:
    """IRRA's masking of open_clip captions: ids, mask (B, L) -> masked ids (B, L), labels (B, L) (IGNORE where
    not predicted). Random replacements are ids in [1, mask_id): ordinary BPE tokens, no special one."""
    return bert_mask(ids, maskable_tokens(mask), mask_id, (1, mask_id), prob)


@register_task(IrraModel.family, losses=("hinge", "sdm"))
class IrraTask(IdentityTask):
    """sdm_loss + id_loss + mlm_loss (IRRA); settings in `loss.identity` (temperature, id_weight, mlm_weight,
    mlm_prob)."""

    needs = "an IRRA model (open_clip towers and a cross-modal encoder)"

    @classmethod
    def check_config(cls, model: nn.Module, cfg: LossConfig) -> None:
        super().check_config(model, cfg)
        if cfg.identity.name != "sdm":
            raise ConfigError(f"loss.identity.name={cfg.identity.name}: irra trains with sdm")
        if cfg.identity.mlm_weight > 0 and not model.config.mlm:
            raise ConfigError("loss.identity.mlm_weight > 0 needs the cross-modal encoder: model.mlm=true")

    def __init__(self, model: IrraModel, cfg: LossConfig, rank: int = 0, world_size: int = 1):
        super().__init__(model, cfg, embedding_width(model))
        self.cfg = cfg.identity
        self.sdm = SdmLoss(cfg.identity.temperature, rank=rank, world_size=world_size)

    def encode(self, batch: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        img = self.model.image_tokens(batch["image"])  # embed (B, E), tokens (B, R, E)
        return {"image": img, "text": self.model.encode_text_features(batch)}  # text embed (B, E)

    def objective(self, feats: dict[str, dict[str, Tensor]], batch: dict) -> tuple[dict[str, Tensor], dict[str, float]]:
        m = self.model
        ids = batch["pid"] if "pid" in batch else batch["image_idx"]  # (B,) relevance by identity
        img, txt = feats["image"]["embed"], feats["text"]["embed"]  # (B, E)
        losses = {"sdm_loss": self.sdm(img, txt, ids), **self.id_terms(img, txt, batch)}
        logs = {"temperature": self.cfg.temperature}
        if m.config.mlm:
            # masks drawn once for the whole step, so accumulated micro-batches mask as the big batch does
            masked, labels = mask_caption(
                batch["input_ids"], batch["attention_mask"], m.config.mask_id, self.cfg.mlm_prob
            )
            relation = m.relation_features(feats["image"]["tokens"], masked, batch["attention_mask"])  # (B, L, E)
            mlm = masked_token_loss(m.mlm_head, relation, labels)
            losses["mlm_loss"] = self.cfg.mlm_weight * mlm
            logs["mlm_ce"] = float(mlm.detach())
        return losses, logs
