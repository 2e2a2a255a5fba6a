"""The person-search objectives: an identity-matching loss (CMPM, Zhang & Lu, ECCV 2018, or IRRA's SDM, Jiang &
Ye, CVPR 2023) with relevance by person identity (batch["pid"], else batch["image_idx"]), plus IRRA's optional
ID loss (`loss.identity.id_weight` > 0: a shared identity classifier on both modalities' embeddings).

- TIPCB-style part models (family tipcb): `loss.identity.name` on the global features plus the mean over the K
  parts; the ID loss on the raw global features.
- Dual encoders (family dual_encoder: vse_cnn, tiny_vse, vse_pretrained, clip, ...): `loss.name=sdm | cmpm`
  picks the loss (`loss.identity.name` is TIPCB's choice) on the (B, E) embeddings, which these models
  l2-normalise; the ID loss on the same embeddings.

The ID loss's classes are the train split's identities, sorted; the run hands them to the task before the
optimiser is built (`IdentityTask.use_identities`), and they stay with the classifier in the task's loss state
(last.pt's `loss` entry), never in the model's weights: the classifier is training-only.

Legend: B batch, K parts, E embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from crossmatch.config import LossConfig
from crossmatch.errors import CheckpointError, ConfigError
from crossmatch.losses.identity import CmpmLoss, IdentityClassifierLoss, SdmLoss
from crossmatch.models.dual_encoder import JointEmbedding
from crossmatch.models.protocols import config_of
from crossmatch.models.tipcb import Tipcb
from crossmatch.tasks.base import Task, register_task

LOSSES = ("sdm", "cmpm")
ID_CLASSES = "id_loss.classes"  # the key of the identity -> class map in the task's loss state


def matching_loss(name: str, cfg: LossConfig, rank: int, world_size: int) -> nn.Module:
    """SdmLoss (temperature loss.identity.temperature) or CmpmLoss."""
    if name not in LOSSES:
        raise ConfigError(f"loss.identity.name {name!r} is not one of {', '.join(LOSSES)}")
    if name == "sdm":
        return SdmLoss(cfg.identity.temperature, rank=rank, world_size=world_size)
    return CmpmLoss(rank=rank, world_size=world_size)


class IdentityTask(Task):
    """Base of the person-search tasks: the optional ID loss. A subclass passes its embedding width E, calls
    `id_terms(img, txt, batch)` in its objective and adds what it returns to its losses."""

    def __init__(self, model: nn.Module, cfg: LossConfig, dim: int):
        super().__init__(model)
        self.id_weight, self.id_dim = cfg.identity.id_weight, dim
        self.id_loss: IdentityClassifierLoss | None = None  # built by use_identities when id_weight > 0

    def use_identities(self, pids: Sequence[int]) -> None:
        """The ID loss's classes: the train split's person identities (any order, repeats allowed; class k is
        the k-th smallest). Nothing to do when loss.identity.id_weight is 0."""
        if self.id_weight > 0:
            device = next(self.model.parameters()).device
            self.id_loss = IdentityClassifierLoss(pids, self.id_dim).to(device)

    def id_terms(self, image: Tensor, text: Tensor, batch: dict) -> dict[str, Tensor]:
        """image, text (B, E) -> {"id_loss": id_weight x the ID loss}, or {} without one (id_weight 0, or a
        validation batch of identities the classifier never saw)."""
        if self.id_loss is None:
            return {}
        loss = self.id_loss(image, text, batch["pid"])
        return {} if loss is None else {"id_loss": self.id_weight * loss}

    def load_loss_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.id_loss is not None and ID_CLASSES in state:
            saved, here = state[ID_CLASSES].cpu(), self.id_loss.classes.cpu()
            if not torch.equal(saved, here):
                raise CheckpointError(
                    f"the checkpoint's ID classifier knows {len(saved)} identities, not the {len(here)} of this "
                    "train split: resume on the data it was trained on"
                )
        super().load_loss_state_dict(state)


@register_task(Tipcb.family)
class TipcbTask(IdentityTask):
    """CMPM or SDM (`loss.identity.name`) on the global features plus the mean over the K part features (none
    when K = 0); the ID loss on the raw global features."""

    def __init__(self, model: Tipcb, cfg: LossConfig, rank: int = 0, world_size: int = 1):
        super().__init__(model, cfg, model.config.embed_dim)
        name = cfg.identity.name
        self.loss = matching_loss(name, cfg, rank, world_size)
        self.loss_name = f"{name}_loss"

    def encode(self, batch):
        img_g, img_p = self.model.image_features(batch)  # (B, E), (B, K, E)
        txt_g, txt_p = self.model.text_features(batch)
        return {"image": {"embed": img_g, "parts": img_p}, "text": {"embed": txt_g, "parts": txt_p}}

    def objective(self, feats, batch):
        ids = batch["pid"] if "pid" in batch else batch["image_idx"]  # (B,) relevance by identity
        img_g, img_p = feats["image"]["embed"], feats["image"]["parts"]  # (B, E), (B, K, E)
        txt_g, txt_p = feats["text"]["embed"], feats["text"]["parts"]
        glob = self.loss(img_g, txt_g, ids)
        per_part = [self.loss(img_p[:, k], txt_p[:, k], ids) for k in range(img_p.shape[1])]  # none when K = 0
        parts = torch.stack(per_part).mean() if per_part else torch.zeros_like(glob)
        losses = {self.loss_name: glob + parts, **self.id_terms(img_g, txt_g, batch)}
        return losses, {"global_loss": glob.item(), "part_loss": parts.item()}


@register_task(JointEmbedding.family, losses=LOSSES)
class DualIdentityTask(IdentityTask):
    """A dual encoder trained for person search: SDM or CMPM (`loss.name`) on its (B, E) embeddings, relevance
    by identity; `encode` + `objective`, so accumulation is exact (the ID loss is per row)."""

    needs = "a dual encoder ((B, E) embeddings)"

    def __init__(self, model: nn.Module, cfg: LossConfig, rank: int = 0, world_size: int = 1):
        super().__init__(model, cfg, embedding_width(model))
        self.loss = matching_loss(cfg.name, cfg, rank, world_size)
        self.loss_name = f"{cfg.name}_loss"

    def encode(self, batch):
        return {"image": self.model.encode_image_features(batch), "text": self.model.encode_text_features(batch)}

    def objective(self, feats, batch):
        ids = batch["pid"] if "pid" in batch else batch["image_idx"]  # (B,) relevance by identity
        img, txt = feats["image"]["embed"], feats["text"]["embed"]  # (B, E), (B, E)
        return {self.loss_name: self.loss(img, txt, ids), **self.id_terms(img, txt, batch)}, {}


def embedding_width(model: nn.Module) -> int:
    """E of a dual encoder: its config's embed_dim, else (an open_clip model) measured on one two-token caption."""
    width = getattr(config_of(model), "embed_dim", None)  # a field of the config dataclass, where it has one
    if isinstance(width, int):
        return width
    device = next(model.parameters()).device
    ids = torch.ones(1, 2, dtype=torch.long, device=device)  # (1, 2)
    # the probe leaves the seeded RNG streams as they were (dropout draws in train mode)
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return int(model.encode_text_features({"input_ids": ids, "attention_mask": ids.bool()})["embed"].shape[-1])
