"""The training interface between models and the engine.

A Task owns the model and its losses. The Trainer calls `training_step(batch)` and sums the returned
losses (every key ends in `_loss`); it never branches on the model family. Evaluation goes through
the model's retrieval interface (`encode_image`, `encode_text`, `similarity`, optional `score_pairs`).

Tasks whose loss compares pairs across the batch (in-batch negatives) split `training_step` into
`encode(batch) -> features` (the towers, per micro-batch) and `objective(features, batch) -> (losses, logs)`
(the loss on the features of the whole batch). Such a task accumulates micro-batches exactly
(`accumulated_step`, GradCache: see tasks/grad_cache.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from torch import Tensor, nn

from crossmatch.config import LossConfig
from crossmatch.engine.distributed import gather_batch_with_grad
from crossmatch.errors import CheckpointError, ConfigError
from crossmatch.losses.triplet import TripletLoss

LOSS_NAMES = ("hinge", "infonce", "siglip")


class Task(nn.Module):
    """Model + loss. Subclasses implement `training_step`, or `encode` and `objective`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def training_step(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
        """One batch -> (losses: {name_loss: scalar}, logs: {name: float})."""
        if type(self).objective is Task.objective:
            raise NotImplementedError
        return self.objective(self.encode(batch), batch)

    def encode(self, batch: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        """The towers on one (micro-)batch -> {"image": feats, "text": feats}, rows aligned with the batch."""
        raise NotImplementedError

    def objective(self, feats: dict[str, dict[str, Tensor]], batch: dict) -> tuple[dict[str, Tensor], dict[str, float]]:
        """The loss on the features of a whole batch; `batch` holds its id tensors (and scalars such as
        epoch_progress), but no images when called by `accumulated_step`."""
        raise NotImplementedError

    @property
    def exact_accumulation(self) -> bool:
        """True when the task is `encode` + `objective`, so accumulation can give the big-batch gradient."""
        return type(self).objective is not Task.objective

    def accumulated_step(
        self,
        batches: list[dict[str, Tensor]],
        module: Callable | None = None,
        scale: Callable[[Tensor], Tensor] | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Forward and backward of one optimizer step over micro-batches, with the gradient of their
        concatenation (GradCache). `module(batch, encode_only=True)` runs `encode` (the Task or its DDP
        wrapper), `scale` the loss scaling (fp16 GradScaler), `autocast` the precision context."""
        from crossmatch.tasks.grad_cache import grad_cache_step

        return grad_cache_step(self, batches, module or self, scale, autocast)

    def loss_state_dict(self) -> dict[str, Tensor]:
        """Parameters and buffers of the objective outside the model (learned temperatures), for checkpoints."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("model.")}

    def load_loss_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = sorted(set(self.loss_state_dict()) - set(state))
        result = self.load_state_dict(state, strict=False)
        if missing or result.unexpected_keys:
            raise CheckpointError(
                f"the checkpoint's loss state does not fit this objective: missing {missing}, "
                f"unexpected {result.unexpected_keys}"
            )

    def on_epoch_start(self, epoch: int) -> None:
        """Hook for schedules that change with the epoch (e.g. hardest-negative warm-up)."""

    def forward(self, batch: dict[str, Tensor], encode_only: bool = False):
        # The training step is the forward pass, so DistributedDataParallel(task) syncs its gradients.
        return self.encode(batch) if encode_only else self.training_step(batch)


class TripletTask(Task):
    """VSE++ / SCAN: hinge triplet loss on the batch score matrix `model.similarity(img, txt)`."""

    def __init__(self, model: nn.Module, cfg: LossConfig, rank: int = 0, world_size: int = 1):
        super().__init__(model)
        self.cfg, self.world_size = cfg, world_size
        self.loss = TripletLoss(cfg.margin, cfg.max_violation)

    def on_epoch_start(self, epoch: int) -> None:
        # VSE-infinity style warm-up: sum over all negatives first, hardest negatives afterwards.
        self.loss.max_violation = self.cfg.max_violation and epoch >= self.cfg.warmup_epochs

    def encode(self, batch):
        return {"image": self.model.encode_image(batch), "text": self.model.encode_text(batch)}

    def objective(self, feats, batch):
        img, txt = feats["image"], feats["text"]
        if self.world_size > 1:
            # Every rank scores the global batch, so hardest negatives come from all ranks and the
            # DDP-averaged gradient equals the single-process gradient of the same global batch.
            img, txt = gather_batch_with_grad(img), gather_batch_with_grad(txt)
        image_idx = gather_batch_with_grad({"i": batch["image_idx"]})["i"]  # (B_global,)
        scores = self.model.similarity(img, txt)  # (B_global, B_global)
        loss = self.loss(scores, image_idx)
        return {"triplet_loss": loss}, {"hardest": float(self.loss.max_violation)}


def build_task(model: nn.Module, cfg: LossConfig, rank: int = 0, world_size: int = 1) -> Task:
    """The task a model trains with: its `task_class` attribute if it has one; else, for dual encoders,
    the objective named by `loss.name` (hinge | infonce | siglip); else the hinge (triplet) task.

    Raises:
        ConfigError: an unknown loss.name, or a contrastive loss for a model that is not a dual encoder.
    """
    if cfg.name not in LOSS_NAMES:
        raise ConfigError(f"unknown loss.name {cfg.name!r}; known: {', '.join(LOSS_NAMES)}")
    task_class = getattr(model, "task_class", None)
    if cfg.name != "hinge" and (task_class is not None or not getattr(model, "is_dual_encoder", False)):
        raise ConfigError(
            f"loss.name={cfg.name} needs a dual encoder (l2-normalised embeddings); "
            f"{type(model).__name__} trains with {'its own objective' if task_class else 'the hinge loss'}"
        )
    if cfg.name != "hinge":
        from crossmatch.tasks.contrastive import ContrastiveTask

        return ContrastiveTask(model, cfg, rank=rank, world_size=world_size)
    return (task_class or TripletTask)(model, cfg, rank=rank, world_size=world_size)
