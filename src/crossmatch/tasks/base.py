"""The training interface between models and the engine.

A Task owns the model and its losses. The Trainer calls `training_step(batch)` and sums the returned
losses (every key ends in `_loss`); it never branches on the model family. Each objective lives in its own
module of this package and is registered there for the model family and `loss.name` it trains
(`register_task`; the family is a class attribute of the model); its settings are a typed section of the
run's `loss` config, which it checks before it is built (`check_config`). Evaluation goes through
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
from crossmatch.models.protocols import model_family
from crossmatch.tasks.grad_cache import grad_cache_step


class Task(nn.Module):
    """Model + loss. Subclasses implement `training_step`, or `encode` and `objective`."""

    uses_text_negatives = False  # True: the objective reads the batch's text negatives (loss.text_negatives)
    needs = "a model of the family it is registered for"  # what the objective needs of a model, for errors

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @classmethod
    def check_config(cls, model: nn.Module, cfg: LossConfig) -> None:
        """Refuse loss settings this objective cannot honour for `model`, in one line, before anything is built.
        The caption-anchored hinge term is the dual-encoder hinge's (TripletTask): refused here."""
        if cfg.caption_anchor_weight > 0:
            raise ConfigError(
                f"loss.caption_anchor_weight={cfg.caption_anchor_weight} needs a dual encoder trained with the hinge "
                f"loss (the cosine of two caption embeddings), not {type(model).__name__}"
            )

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


ANY_FAMILY = "*"  # a registration for every family that registers no task of its own for the loss
_TASKS: dict[tuple[str, str], type[Task]] = {}  # (model family, loss.name) -> the task it trains with


def register_task(family: str = ANY_FAMILY, losses: tuple[str, ...] = ("hinge",)) -> Callable:
    """Class decorator: `build_task` trains models of `family` (the model class's `family`) with this task when
    `loss.name` is one of `losses`.

    `loss.name` picks among the dual-encoder objectives; a family with an objective of its own registers it
    under the default name, hinge, so the contrastive names are refused for it. `family=ANY_FAMILY` is the
    fallback for families that register nothing for the loss (the hinge triplet task).
    """

    def wrap(task_cls: type[Task]) -> type[Task]:
        for loss in losses:
            if (family, loss) in _TASKS:
                raise ValueError(
                    f"family {family!r} with loss.name={loss} already trains with {_TASKS[family, loss].__name__}"
                )
            _TASKS[family, loss] = task_cls
        return task_cls

    return wrap


def task_class(model: nn.Module, loss_name: str = "hinge") -> type[Task] | None:
    """The task registered for the model's family and `loss_name` (else for any family); None when none is."""
    return _TASKS.get((model_family(model), loss_name)) or _TASKS.get((ANY_FAMILY, loss_name))


def build_task(model: nn.Module, cfg: LossConfig, rank: int = 0, world_size: int = 1) -> Task:
    """The task registered for the model's family and `loss.name` (tasks register in their own modules, which
    importing crossmatch.tasks imports); the task then checks the loss settings it is given (`check_config`).

    Raises:
        ConfigError: an unknown loss.name, no task for this family and loss.name, or loss settings the task
            cannot honour for this model.
    """
    known = sorted({loss for _, loss in _TASKS})
    if cfg.name not in known:
        raise ConfigError(f"unknown loss.name {cfg.name!r}; known: {', '.join(known)}")
    task_cls = task_class(model, cfg.name)
    if task_cls is None:
        raise ConfigError(_no_task(model, cfg.name))
    task_cls.check_config(model, cfg)
    return task_cls(model, cfg, rank=rank, world_size=world_size)


def _no_task(model: nn.Module, loss_name: str) -> str:
    """'loss.name=infonce needs a dual encoder ... (family 'dual_encoder'); ALBEF (family 'albef') trains with ...'"""
    family = model_family(model)
    takers = {(f, t) for (f, loss), t in _TASKS.items() if loss == loss_name}
    needs = " or ".join(sorted({f"{t.needs}, family {f!r}" for f, t in takers}))
    own = [
        f"loss.name={loss} ({t.__name__})" for loss in sorted({k for _, k in _TASKS}) if (t := task_class(model, loss))
    ]
    return (
        f"loss.name={loss_name} needs {needs}; {type(model).__name__} (family {family!r}) trains with {', '.join(own)}"
    )
