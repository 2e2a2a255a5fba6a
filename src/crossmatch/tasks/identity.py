"""The person-search objective of TIPCB-style part models: an identity-matching loss (CMPM, Zhang & Lu,
ECCV 2018, or IRRA's SDM, Jiang & Ye, CVPR 2023) on the global features plus the mean over the K parts,
relevance by person identity (batch["pid"], else batch["image_idx"]).

Legend: B batch, K parts, E embedding.
"""

from __future__ import annotations

import torch

from crossmatch.config import LossConfig
from crossmatch.errors import ConfigError
from crossmatch.losses.identity import CmpmLoss, SdmLoss
from crossmatch.models.tipcb import Tipcb
from crossmatch.tasks.base import Task, register_task

LOSSES = ("sdm", "cmpm")


@register_task(Tipcb.family)
class TipcbTask(Task):
    """CMPM or SDM (`loss.identity.name`) on the global features plus the mean over the K part features."""

    def __init__(self, model: Tipcb, cfg: LossConfig, rank: int = 0, world_size: int = 1):
        super().__init__(model)
        name = cfg.identity.name
        if name not in LOSSES:
            raise ConfigError(f"loss.identity.name {name!r} is not one of {', '.join(LOSSES)}")
        self.loss_name = f"{name}_loss"
        if name == "sdm":
            self.loss = SdmLoss(cfg.identity.temperature, rank=rank, world_size=world_size)
        else:
            self.loss = CmpmLoss(rank=rank, world_size=world_size)

    def encode(self, batch):
        img_g, img_p = self.model.image_features(batch)  # (B, E), (B, K, E)
        txt_g, txt_p = self.model.text_features(batch)
        return {"image": {"embed": img_g, "parts": img_p}, "text": {"embed": txt_g, "parts": txt_p}}

    def objective(self, feats, batch):
        ids = batch["pid"] if "pid" in batch else batch["image_idx"]  # (B,) relevance by identity
        img_g, img_p = feats["image"]["embed"], feats["image"]["parts"]  # (B, E), (B, K, E)
        txt_g, txt_p = feats["text"]["embed"], feats["text"]["parts"]
        glob = self.loss(img_g, txt_g, ids)
        parts = torch.stack([self.loss(img_p[:, k], txt_p[:, k], ids) for k in range(img_p.shape[1])]).mean()
        return {self.loss_name: glob + parts}, {"global_loss": glob.item(), "part_loss": parts.item()}
