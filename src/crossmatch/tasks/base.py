"""The training interface between models and the engine.

A Task owns the model and its losses. The Trainer calls `training_step(batch)` and sums the returned
losses (every key ends in `_loss`); it never branches on the model family. Evaluation goes through
the model's retrieval interface (`encode_image`, `encode_text`, `similarity`, optional `score_pairs`).
"""

from __future__ import annotations

from torch import Tensor, nn

from crossmatch.config import LossConfig
from crossmatch.losses.triplet import TripletLoss
from crossmatch.tensors import gather_features


class Task(nn.Module):
    """Model + loss. Subclasses implement `training_step`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def training_step(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
        """One batch -> (losses: {name_loss: scalar}, logs: {name: float})."""
        raise NotImplementedError

    def on_epoch_start(self, epoch: int) -> None:
        """Hook for schedules that change with the epoch (e.g. hardest-negative warm-up)."""

    def on_step(self, progress: float) -> None:
        """Hook called before every training step with the fraction of the epoch done, in [0, 1)."""

    def validation_step(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
        """The same loss terms on held-out pairs, without changing any training state (the Trainer calls it
        in eval mode under no_grad). Tasks whose step updates state (queues, EMA copies) override it."""
        return self.training_step(batch)

    def forward(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
        # The training step is the forward pass, so DistributedDataParallel(task) syncs its gradients.
        return self.training_step(batch)


class TripletTask(Task):
    """VSE++ / SCAN: hinge triplet loss on the batch score matrix `model.similarity(img, txt)`."""

    def __init__(self, model: nn.Module, cfg: LossConfig, rank: int = 0, world_size: int = 1):
        super().__init__(model)
        self.cfg, self.world_size = cfg, world_size
        self.loss = TripletLoss(cfg.margin, cfg.max_violation)

    def on_epoch_start(self, epoch: int) -> None:
        # VSE-infinity style warm-up: sum over all negatives first, hardest negatives afterwards.
        self.loss.max_violation = self.cfg.max_violation and epoch >= self.cfg.warmup_epochs

    def training_step(self, batch):
        img, txt = self.model.encode_image(batch), self.model.encode_text(batch)
        if self.world_size > 1:
            # Every rank scores the global batch, so hardest negatives come from all ranks and the
            # DDP-averaged gradient equals the single-process gradient of the same global batch.
            img, txt = gather_features(img, self.world_size), gather_features(txt, self.world_size)
        image_idx = gather_features({"i": batch["image_idx"]}, self.world_size)["i"]  # (B_global,)
        scores = self.model.similarity(img, txt)  # (B_global, B_global)
        loss = self.loss(scores, image_idx)
        return {"triplet_loss": loss}, {"hardest": float(self.loss.max_violation)}


def build_task(model: nn.Module, cfg: LossConfig, rank: int = 0, world_size: int = 1) -> Task:
    """The task a model trains with: its `task_class` attribute if it has one, else the triplet task."""
    task_class = getattr(model, "task_class", TripletTask)
    return task_class(model, cfg, rank=rank, world_size=world_size)
