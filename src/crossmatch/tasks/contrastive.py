"""The contrastive objective of dual encoders (`loss.name: infonce | siglip`): CLIP's InfoNCE (Radford et al.,
ICML 2021) or SigLIP's pairwise sigmoid loss (Zhai et al., ICCV 2023) on the models' l2-normalised embeddings.

The learned temperature (and SigLIP's bias) are the objective's parameters, shared with the model: the task
owns them (they go to the optimiser with the task's parameters, no weight decay: scalars, and are saved in the
checkpoint's `loss` entry) and the model exposes the same tensors as open_clip's `logit_scale` / `logit_bias`,
so they are stored with its weights too (models/face.py). Initial values: CLIP log-scale log(1/0.07), SigLIP
t' = log 10 and b = -10; a pretrained open_clip model's own learned values when it has them
(`model.contrastive_init`); `loss.init_*` over both. The scale exp(t') is clamped to [1, loss.max_logit_scale]
(100, as CLIP) before every use.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from crossmatch.config import LossConfig
from crossmatch.losses.contrastive import InfoNCELoss, SigLipLoss
from crossmatch.models.dual_encoder import JointEmbedding
from crossmatch.models.face import ImageTextModel
from crossmatch.models.protocols import pretrained_temperature
from crossmatch.tasks.base import Task, register_task
from crossmatch.tasks.text_negatives import encode_negatives

DEFAULT_INIT = {
    "infonce": {"logit_scale": math.log(1 / 0.07)},
    "siglip": {"logit_scale": math.log(10.0), "logit_bias": -10.0},
}


@register_task(JointEmbedding.family, losses=tuple(DEFAULT_INIT))
class ContrastiveTask(Task):
    """Dual encoder + InfoNCE or SigLIP over the (gathered) batch; `encode` + `objective` for exact accumulation.
    Text negatives (`loss.text_negatives`): extra image -> caption columns of their own row."""

    uses_text_negatives = True
    needs = "a dual encoder (l2-normalised embeddings)"

    @classmethod
    def check_config(cls, model: nn.Module, cfg: LossConfig) -> None:
        """Nothing to refuse: InfoNCE and SigLIP read none of the hinge's settings (margin, caption_anchor_weight)."""

    def __init__(self, model: nn.Module, cfg: LossConfig, rank: int = 0, world_size: int = 1):
        super().__init__(model)
        self.name = cfg.name
        init = {**DEFAULT_INIT[cfg.name], **pretrained_temperature(model)}
        if cfg.init_logit_scale is not None:
            init["logit_scale"] = cfg.init_logit_scale
        if cfg.init_logit_bias is not None:
            init["logit_bias"] = cfg.init_logit_bias
        self.max_log_scale = math.log(cfg.max_logit_scale)
        self.logit_scale = nn.Parameter(torch.tensor(float(init["logit_scale"])))
        if cfg.name == "siglip":
            self.logit_bias = nn.Parameter(torch.tensor(float(init.get("logit_bias", -10.0))))
            self.loss = SigLipLoss(rank, world_size, cfg.local)
        else:
            self.logit_bias = None
            self.loss = InfoNCELoss(rank, world_size, cfg.local)
        if isinstance(model, ImageTextModel):  # the model stores and exposes them (open_clip's logit_scale)
            model.share_contrastive_params(self.logit_scale, self.logit_bias)

    def encode(self, batch: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        feats = {"image": self.model.encode_image_features(batch), "text": self.model.encode_text_features(batch)}
        neg = encode_negatives(self.model, batch)  # {"embed": (B, K, E)} or None
        return feats if neg is None else {**feats, "neg_text": neg}

    def objective(self, feats: dict[str, dict[str, Tensor]], batch: dict) -> tuple[dict[str, Tensor], dict[str, float]]:
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, self.max_log_scale)  # as CLIP: 1 <= scale <= 100
        scale = self.logit_scale.exp()
        img, txt, idx = feats["image"]["embed"], feats["text"]["embed"], batch["image_idx"]  # (B, E), (B, E), (B,)
        logs = {"logit_scale": float(scale.detach())}
        neg = {}
        if "neg_text" in feats:
            neg = {"neg_feat": feats["neg_text"]["embed"], "neg_valid": batch["neg_valid"]}  # (B, K, E), (B, K)
        if self.logit_bias is None:
            return {"infonce_loss": self.loss(img, txt, idx, scale, **neg)}, logs
        logs["logit_bias"] = float(self.logit_bias.detach())
        return {"siglip_loss": self.loss(img, txt, idx, scale, self.logit_bias, **neg)}, logs
