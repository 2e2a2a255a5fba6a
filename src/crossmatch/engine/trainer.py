"""The training loop. It receives built objects (task, optimiser, scheduler, loader, evaluator,
checkpointer, metric logger, DistInfo) and never branches on the model family.

Resume is exact: the batch stream is a pure function of (seed, epoch, position) (see EpochSampler),
and a checkpoint holds the model, optimiser, scheduler, RNG states and the position within the epoch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from crossmatch.config import TrainConfig
from crossmatch.engine.checkpoint import Checkpointer, rng_state, set_rng_state
from crossmatch.engine.distributed import DistInfo
from crossmatch.engine.logging import MetricLogger
from crossmatch.errors import CrossmatchError
from crossmatch.evaluation.evaluate import to_device

log = logging.getLogger(__name__)


class NonFiniteLossError(CrossmatchError):
    """A loss became NaN or Inf; the run stops with the last good checkpoint intact."""


@dataclass
class TrainState:
    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    global_step: int = 0  # optimizer steps done in total
    best_metric: float = -math.inf  # best validation metric so far
    best_epoch: int = -1
    history: list[dict[str, float]] = field(default_factory=list)  # validation metrics per epoch


class Trainer:
    """fit() = for each epoch: train (train mode), validate (eval mode, no grad), checkpoint."""

    def __init__(
        self,
        task: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        train_loader: DataLoader,
        evaluator: Callable[[nn.Module], dict[str, float]] | None,
        checkpointer: Checkpointer,
        metric_logger: MetricLogger,
        cfg: TrainConfig,
        dist: DistInfo,
        extra_state: dict | None = None,
        metric: str = "rsum",
        eval_every: int = 1,
        save_every_steps: int = 0,
    ):
        self.task, self.optimizer, self.scheduler = task, optimizer, scheduler
        self.train_loader, self.evaluator = train_loader, evaluator
        self.checkpointer, self.metric_logger = checkpointer, metric_logger
        self.cfg, self.dist, self.metric, self.eval_every = cfg, dist, metric, eval_every
        self.save_every_steps = save_every_steps  # 0: checkpoints at epoch ends only
        self.extra_state = extra_state or {}  # config, tokenizer: saved with every checkpoint
        self.state = TrainState()
        self.model = task.model

    @property
    def steps_per_epoch(self) -> int:
        n = len(self.train_loader.sampler) // self.train_loader.batch_size
        return min(n, self.cfg.max_steps_per_epoch) if self.cfg.max_steps_per_epoch > 0 else n

    # ---- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "trainer": asdict(self.state),
            "rng": rng_state(),
            **self.extra_state,
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])  # moves state tensors to the params' device
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.state = TrainState(**ckpt["trainer"])
        set_rng_state(ckpt["rng"])

    # ---- loop --------------------------------------------------------------------------------------
    def fit(self) -> TrainState:
        while self.state.epoch < self.cfg.epochs:
            self.train_epoch()
            self.end_epoch()
        return self.state

    def train_epoch(self) -> None:
        s = self.state
        self.task.train()
        self.task.on_epoch_start(s.epoch)
        sampler = self.train_loader.sampler
        sampler.set_epoch(s.epoch, start=s.step_in_epoch * self.train_loader.batch_size)
        n_steps = self.steps_per_epoch
        bar = tqdm(
            total=n_steps,
            initial=s.step_in_epoch,
            desc=f"epoch {s.epoch + 1}/{self.cfg.epochs}",
            disable=not (self.dist.is_main and _isatty()),
            leave=False,
        )
        t0 = time.perf_counter()
        batches = iter(self.train_loader)
        while s.step_in_epoch < n_steps:
            logs = self.train_step(next(batches))
            s.step_in_epoch += 1
            s.global_step += 1
            if self.save_every_steps and s.global_step % self.save_every_steps == 0 and s.step_in_epoch < n_steps:
                self.checkpointer.save(self.state_dict())  # mid-epoch: last.pt only
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.3f}")
            if s.global_step % self.cfg.log_every == 0 or s.step_in_epoch == n_steps:
                logs["lr"] = self.optimizer.param_groups[0]["lr"]
                logs["steps_per_s"] = s.step_in_epoch / max(1e-9, time.perf_counter() - t0)
                self.metric_logger.log(logs, s.global_step, "train")
                log.info(
                    "epoch %d step %d/%d %s",
                    s.epoch + 1,
                    s.step_in_epoch,
                    n_steps,
                    " ".join(f"{k}={v:.4g}" for k, v in logs.items()),
                )
        bar.close()

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Forward, backward, clip, step. Returns the step's scalar logs."""
        batch = to_device(batch, self.dist.device)
        losses, logs = self.task.training_step(batch)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            raise NonFiniteLossError(
                f"non-finite loss at epoch {self.state.epoch + 1} step "
                f"{self.state.step_in_epoch + 1} ({terms}); last good checkpoint kept"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            logs["grad_norm"] = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        return {"loss": loss.item(), **{k: v.item() for k, v in losses.items()}, **logs}

    def end_epoch(self) -> None:
        """Validate, record, checkpoint (last, per-epoch, best)."""
        s = self.state
        metrics = self.evaluate() if (s.epoch + 1) % self.eval_every == 0 or s.epoch + 1 == self.cfg.epochs else {}
        is_best = False
        if metrics:
            s.history.append({"epoch": s.epoch + 1, **metrics})
            value = metrics[self.metric]
            is_best = value > s.best_metric
            if is_best:
                s.best_metric, s.best_epoch = value, s.epoch + 1
            self.metric_logger.log(metrics, s.global_step, "val")
            log.info(
                "epoch %d val %s=%.2f (best %.2f at epoch %d)",
                s.epoch + 1,
                self.metric,
                value,
                s.best_metric,
                s.best_epoch,
            )
        epoch_done = s.epoch + 1
        s.epoch, s.step_in_epoch = epoch_done, 0
        self.checkpointer.save(self.state_dict(), epoch_tag=epoch_done, is_best=is_best)
        self.metric_logger.flush()

    def evaluate(self) -> dict[str, float]:
        if self.evaluator is None:
            return {}
        return self.evaluator(self.model)


def _isatty() -> bool:
    import sys

    return sys.stderr.isatty()
