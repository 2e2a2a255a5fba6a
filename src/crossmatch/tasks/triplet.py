"""The hinge triplet objective of VSE++ (Faghri et al., BMVC 2018) and SCAN (Lee et al., ECCV 2018) on the
batch score matrix, with hardest negatives (optionally after a VSE-infinity style warm-up).

With text negatives (`loss.text_negatives` K > 0), each image also meets the K perturbed captions of its
own pair as further negatives (image -> caption side of the hinge; see losses/triplet.py); with
`loss.caption_anchor_weight` > 0 (dual encoders) also of the caption itself, its image the positive.

Legend: B batch (all ranks' pairs when distributed), K text negatives per pair.
"""

from __future__ import annotations

import torch
from torch import nn

from crossmatch.config import LossConfig
from crossmatch.errors import ConfigError
from crossmatch.losses.triplet import TripletLoss
from crossmatch.models.protocols import is_dual_encoder
from crossmatch.tasks.base import ANY_FAMILY, Task, register_task
from crossmatch.tasks.text_negatives import encode_negatives, paired_scores
from crossmatch.tensors import gather_features, gather_rows


@register_task(ANY_FAMILY)
class TripletTask(Task):
    """VSE++ / SCAN: hinge triplet loss on the batch score matrix `model.similarity(img, txt)`; the objective of
    every family that registers none of its own for loss.name=hinge."""

    uses_text_negatives = True
    needs = "a model with a similarity"

    @classmethod
    def check_config(cls, model: nn.Module, cfg: LossConfig) -> None:
        """The caption-anchored term (loss.caption_anchor_weight) compares two caption embeddings by their dot
        product (dual encoders only) and anchors on text negatives."""
        if not is_dual_encoder(model):
            super().check_config(model, cfg)
        elif cfg.caption_anchor_weight > 0 and cfg.text_negatives == 0:
            weight = cfg.caption_anchor_weight
            raise ConfigError(f"loss.caption_anchor_weight={weight} needs text negatives (loss.text_negatives >= 1)")

    def __init__(self, model: nn.Module, cfg: LossConfig, rank: int = 0, world_size: int = 1):
        super().__init__(model)
        self.cfg, self.world_size = cfg, world_size
        self.loss = TripletLoss(cfg.margin, cfg.max_violation, cfg.text_negative_term, cfg.caption_anchor_weight)

    def on_epoch_start(self, epoch: int) -> None:
        # VSE-infinity style warm-up: sum over all negatives first, hardest negatives afterwards.
        self.loss.max_violation = self.cfg.max_violation and epoch >= self.cfg.warmup_epochs

    def encode(self, batch):
        feats = {"image": self.model.encode_image_features(batch), "text": self.model.encode_text_features(batch)}
        neg = encode_negatives(self.model, batch)  # each (B, K, ...), or None
        return feats if neg is None else {**feats, "neg_text": neg}

    def objective(self, feats, batch):
        img, txt = feats["image"], feats["text"]
        neg_scores = neg_valid = cap_scores = None
        if "neg_text" in feats:  # this rank's images against their own negatives, before any gather
            neg_scores, neg_valid = gather_rows(
                paired_scores(self.model, img, feats["neg_text"]), batch["neg_valid"], self.world_size
            )  # (B_global, K) each
            if self.loss.caption_anchor_weight > 0:  # dual encoders (check_config): caption b . its negative k
                cap = torch.einsum("be,bke->bk", txt["embed"], feats["neg_text"]["embed"])  # (B, K)
                cap_scores, _ = gather_rows(cap, batch["neg_valid"], self.world_size)  # (B_global, K)
        if self.world_size > 1:
            # Every rank scores the global batch, so hardest negatives come from all ranks and the
            # DDP-averaged gradient equals the single-process gradient of the same global batch.
            img, txt = gather_features(img, self.world_size), gather_features(txt, self.world_size)
        image_idx = gather_features({"i": batch["image_idx"]}, self.world_size)["i"]  # (B_global,)
        scores = self.model.similarity(img, txt)  # (B_global, B_global)
        loss = (
            self.loss(scores, image_idx)
            if neg_scores is None
            else self.loss(scores, image_idx, neg_scores, neg_valid, cap_scores)
        )
        return {"triplet_loss": loss}, {"hardest": float(self.loss.max_violation)}
