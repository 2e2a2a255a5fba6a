"""The training interface between models and the engine.

A Task owns the model and its losses. The Trainer calls `training_step(batch)` and sums the returned
losses (every key ends in `_loss`); it never branches on the model family. Each objective lives in its own
module of this package and is registered for the model class it trains (`register_task`); its settings
are a typed section of the run's `loss` config. Evaluation goes through
the model's retrieval interface (`encode_image_features`, `encode_text_features`, `similarity`, optional `score_pairs`).

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
from crossmatch.errors import CheckpointError, ConfigError
from crossmatch.models.protocols import is_dual_encoder

LOSS_NAMES = ("hinge", "infonce", "siglip")


class Task(nn.Module):
    """Model + loss. Subclasses implement `training_step`, or `encode` and `objective`."""

    uses_text_negatives = False  # True: the objective reads the batch's text negatives (loss.text_negatives)

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

    def on_step(self, progress: float) -> None:
        """Hook called before every training step with the fraction of the epoch done, in [0, 1)."""

    def validation_step(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
        """The same loss terms on held-out pairs, without changing any training state (the Trainer calls it
        in eval mode under no_grad). Tasks whose step updates state (queues, EMA copies) override it."""
        return self.training_step(batch)

    def forward(self, batch: dict[str, Tensor], encode_only: bool = False):
        # The training step is the forward pass, so DistributedDataParallel(task) syncs its gradients.
        return self.encode(batch) if encode_only else self.training_step(batch)


_TASKS: dict[type, type[Task]] = {}  # model class -> the task it trains with


def register_task(model_cls: type):
    """Class decorator: `@register_task(ALBEF)` makes `build_task` train ALBEF models with this task."""

    def wrap(task_cls: type[Task]) -> type[Task]:
        if model_cls in _TASKS:
            raise ValueError(f"{model_cls.__name__} already trains with {_TASKS[model_cls].__name__}")
        _TASKS[model_cls] = task_cls
        return task_cls

    return wrap


def task_class(model: nn.Module) -> type[Task] | None:
    """The task registered for the model's class (or a base class of it); None for models without one."""
    import crossmatch.tasks  # noqa: F401  (registers every task)

    for cls in type(model).__mro__:
        if cls in _TASKS:
            return _TASKS[cls]
    return None


def build_task(model: nn.Module, cfg: LossConfig, rank: int = 0, world_size: int = 1) -> Task:
    """The task a model trains with: the one registered for its family (ALBEF, ViLT, TIPCB); else, for dual
    encoders, the objective named by `loss.name` (hinge | infonce | siglip); else the hinge (triplet) task.

    Raises:
        ConfigError: an unknown loss.name, or a contrastive loss or loss.caption_anchor_weight for a model that
            is not a dual encoder.
    """
    from crossmatch.tasks.contrastive import ContrastiveTask
    from crossmatch.tasks.triplet import TripletTask

    if cfg.name not in LOSS_NAMES:
        raise ConfigError(f"unknown loss.name {cfg.name!r}; known: {', '.join(LOSS_NAMES)}")
    own = task_class(model)
    if cfg.name != "hinge" and (own is not None or not is_dual_encoder(model)):
        raise ConfigError(
            f"loss.name={cfg.name} needs a dual encoder (l2-normalised embeddings); "
            f"{type(model).__name__} trains with {'its own objective' if own else 'the hinge loss'}"
        )
    if cfg.name != "hinge":
        return ContrastiveTask(model, cfg, rank=rank, world_size=world_size)
    if cfg.caption_anchor_weight > 0 and (own is not None or not is_dual_encoder(model)):
        raise ConfigError(
            f"loss.caption_anchor_weight={cfg.caption_anchor_weight} needs a dual encoder trained with the hinge "
            f"loss (the cosine of two caption embeddings), not {type(model).__name__}"
        )
    if cfg.caption_anchor_weight > 0 and cfg.text_negatives == 0:
        raise ConfigError(
            f"loss.caption_anchor_weight={cfg.caption_anchor_weight} needs text negatives (loss.text_negatives >= 1)"
        )
    return (own or TripletTask)(model, cfg, rank=rank, world_size=world_size)
