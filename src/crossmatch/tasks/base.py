"""The training interface between models and the engine.

A Task owns the model and its losses. The Trainer calls `training_step(batch)` and sums the returned
losses (every key ends in `_loss`); it never branches on the model family. Each objective lives in its own
module of this package and is registered for the model class it trains (`register_task`); its settings
are a typed section of the run's `loss` config. Evaluation goes through
the model's retrieval interface (`encode_image`, `encode_text`, `similarity`, optional `score_pairs`).
"""

from __future__ import annotations

from torch import Tensor, nn

from crossmatch.config import LossConfig


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


_TASKS: dict[type, type[Task]] = {}  # model class -> the task it trains with


def register_task(model_cls: type):
    """Class decorator: `@register_task(ALBEF)` makes `build_task` train ALBEF models with this task."""

    def wrap(task_cls: type[Task]) -> type[Task]:
        if model_cls in _TASKS:
            raise ValueError(f"{model_cls.__name__} already trains with {_TASKS[model_cls].__name__}")
        _TASKS[model_cls] = task_cls
        return task_cls

    return wrap


def task_class(model: nn.Module) -> type[Task]:
    """The task registered for the model's class (or a base class of it); the hinge triplet task otherwise."""
    import crossmatch.tasks  # noqa: F401  (registers every task)
    from crossmatch.tasks.triplet import TripletTask

    for cls in type(model).__mro__:
        if cls in _TASKS:
            return _TASKS[cls]
    return TripletTask


def build_task(model: nn.Module, cfg: LossConfig, rank: int = 0, world_size: int = 1) -> Task:
    """The model's task (see `task_class`) with the run's loss config."""
    return task_class(model)(model, cfg, rank=rank, world_size=world_size)
