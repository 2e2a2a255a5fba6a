"""The training loop. It receives built objects (task, optimiser and schedule, loader, evaluator, output
sinks, the run config whose `train` section is its own, DistInfo) and never branches on the model family.

Resume is exact: the batch stream is a pure function of (seed, epoch, position) (see EpochSampler), and
a checkpoint holds model, optimiser, scheduler, AMP scaler, RNG states and the position in the epoch. The
train loader is driven only through `ResumableLoader` (set_epoch, steps, state_dict, load_state_dict).
Under torchrun the Task is wrapped in DistributedDataParallel: `Task.forward` is its training step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from crossmatch.config import RunConfig
from crossmatch.engine.checkpoint import Checkpointer, rng_state, set_rng_state
from crossmatch.engine.distributed import DistInfo
from crossmatch.engine.logging import MetricLogger
from crossmatch.errors import CrossmatchError, DataError
from crossmatch.models.protocols import ResumableLoader
from crossmatch.progress import show_progress
from crossmatch.tensors import all_gather_objects, all_reduce_max, to_device

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(CrossmatchError):
    """A loss became NaN or Inf; the run stops with the last good checkpoint intact."""


@dataclass
class TrainState:
    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    global_step: int = 0  # optimizer steps done in total
    best_metric: float = -math.inf  # best validation metric so far
    best_epoch: int = -1
    skipped_samples: int = 0  # training pairs skipped so far because their image was unreadable
    bad_images: list[int] = field(default_factory=list)  # distinct unreadable images of the current epoch
    history: list[dict[str, float]] = field(default_factory=list)  # validation metrics per epoch


@dataclass
class RunLoaders:
    """The batches a run reads: training pairs, and optionally validation pairs for the validation loss."""

    train: ResumableLoader
    val: ResumableLoader | None = None  # pairs of the val split (no augmentation), same batch size as training


@dataclass
class RunSinks:
    """Where a run writes: checkpoints, scalar metrics, and what every checkpoint carries besides state."""

    checkpointer: Checkpointer
    metric_logger: MetricLogger
    extra_state: dict[str, Any] = field(default_factory=dict)  # config, tokenizer


def autocast(device: torch.device, precision: str):
    """Mixed-precision context for fp16/bf16; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's peak resident memory on CPU, in MB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KB


class Trainer:
    """fit() = for each epoch: train (train mode), validate (eval mode, no grad), checkpoint."""

    def __init__(
        self,
        task: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        loaders: RunLoaders,
        evaluator: Callable[[nn.Module], dict[str, float]] | None,
        sinks: RunSinks,
        cfg: RunConfig,
        dist: DistInfo,
    ):
        self.task, self.model = task, task.model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_loader, self.val_loader = loaders.train, loaders.val
        self.evaluator, self.sinks = evaluator, sinks
        self.cfg, self.dist = cfg.train, dist  # the run's train section is the loop's own config
        self.eval_cfg = cfg.eval  # when to validate, the metric that selects best.pt, the validation loss
        self.eval_precision = cfg.eval.precision_for(cfg.train.precision)
        self.checkpoint_every = cfg.checkpoint.every_steps  # also refresh last.pt every this many steps (0: off)
        self.max_bad_samples = cfg.data.max_bad_samples  # unreadable training images allowed per epoch
        if self.cfg.precision not in DTYPES:
            raise CrossmatchError(f"unknown train.precision {self.cfg.precision!r}; known: fp32, bf16, fp16")
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=self.cfg.precision == "fp16")
        step_module: nn.Module = task
        if dist.distributed:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            step_module = DistributedDataParallel(task, device_ids=ids)
        self.step_module = torch.compile(step_module) if self.cfg.compile else step_module
        self.state = TrainState()
        self.epoch_seconds = 0.0  # wall time of the last train_epoch (validation excluded)

    @property
    def micro_batches(self) -> int:
        return max(1, self.cfg.accum_steps)

    @property
    def steps_per_epoch(self) -> int:
        n = self.train_loader.steps // self.micro_batches
        return min(n, self.cfg.max_steps_per_epoch) if self.cfg.max_steps_per_epoch > 0 else n

    def close(self) -> None:
        """Flush and close the metric writers (TensorBoard, metrics.jsonl)."""
        self.sinks.metric_logger.close()

    # ---- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "loss": self.task.loss_state_dict(),  # learned temperatures of the objective (not in the model)
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "trainer": asdict(self.state),
            "rng": rng_state(),
            **self._loader_state(),
            **self.sinks.extra_state,
        }

    def _loader_state(self) -> dict[str, Any]:
        # A streaming loader (webdataset shards) knows its position itself: keep every rank's. An indexed
        # loader's position is the step (its state is empty): its checkpoints carry no loader entry.
        states = all_gather_objects(self.train_loader.state_dict())
        return {"loader": states} if any(states) else {}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.task.load_loss_state_dict(ckpt.get("loss", {}))
        self.optimizer.load_state_dict(ckpt["optimizer"])  # moves state tensors to the params' device
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["trainer"])
        set_rng_state(ckpt["rng"])
        if "loader" in ckpt and self.dist.rank < len(ckpt["loader"]):
            self.train_loader.load_state_dict(ckpt["loader"][self.dist.rank])

    # ---- loop --------------------------------------------------------------------------------------
    @property
    def show_progress(self) -> bool:
        return show_progress(self.dist.is_main)  # bars on a terminal only, never in logs

    def fit(self) -> TrainState:
        # Log lines go above the progress bars instead of into them.
        with logging_redirect_tqdm(loggers=[logging.getLogger("crossmatch")]):
            while self.state.epoch < self.cfg.epochs:
                self.train_epoch()
                self.end_epoch()
        return self.state

    def train_epoch(self) -> None:
        s, n_steps = self.state, self.steps_per_epoch
        self.task.train()
        self.task.on_epoch_start(s.epoch)
        per_step = self.train_loader.batch_size * self.micro_batches
        self.train_loader.set_epoch(s.epoch, start=s.step_in_epoch * per_step)
        bar = tqdm(
            total=n_steps,
            initial=s.step_in_epoch,
            desc=f"epoch {s.epoch + 1}/{self.cfg.epochs}",
            disable=not self.show_progress,
            leave=False,
        )
        t0, done0, waited = time.perf_counter(), s.step_in_epoch, 0.0
        batches = iter(self.train_loader)
        while s.step_in_epoch < n_steps:
            self.task.on_step(s.step_in_epoch / max(1, n_steps))  # for ramps within an epoch (ALBEF's alpha)
            t_data = time.perf_counter()
            micro = [next(batches) for _ in range(self.micro_batches)]
            waited += time.perf_counter() - t_data  # time the step waited for the loader
            logs = self.train_step(micro)
            s.step_in_epoch += 1
            s.global_step += 1
            every = self.checkpoint_every
            if every and s.global_step % every == 0 and s.step_in_epoch < n_steps:
                self.sinks.checkpointer.save(self.state_dict())  # mid-epoch: last.pt only
            bar.update(1)
            if self.show_progress:
                bar.set_postfix(loss=f"{float(logs['loss']):.3f}")
            if s.global_step % self.cfg.log_every == 0 or s.step_in_epoch == n_steps:
                logs = {k: float(v) for k, v in logs.items()}  # the only host syncs of the logged values
                logs["lr"] = self.optimizer.param_groups[0]["lr"]
                elapsed = max(1e-9, time.perf_counter() - t0)
                logs["steps_per_s"] = (s.step_in_epoch - done0) / elapsed
                logs["data_wait"] = waited / elapsed  # share of the epoch's wall time spent waiting for batches
                epoch = s.epoch + s.step_in_epoch / n_steps
                self.sinks.metric_logger.log(logs, s.global_step, "train", epoch=epoch)
                text = " ".join(f"{k}={v:.4g}" for k, v in logs.items())
                log.info("epoch %d step %d/%d %s", s.epoch + 1, s.step_in_epoch, n_steps, text)
        bar.close()
        self.epoch_seconds = time.perf_counter() - t0

    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor | float]:
        """One optimizer step over `accum_steps` micro-batches: forward (autocast), backward (scaled),
        unscale, clip, step. Returns the step's scalar logs (loss terms averaged over micro-batches), as
        detached 0-dim tensors where they are computed, so that a step that is not logged does not wait
        for the device."""
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor | float] = {}
        if len(batches) > 1 and self.task.exact_accumulation:  # in-batch negatives over all micro-batches
            totals, batches = self._accumulated_step(batches), []
        for k, batch in enumerate(batches):
            self._count_skipped(batch)
            if "image_idx" not in batch:
                continue  # every item of this micro-batch was unreadable
            batch = to_device(batch, self.dist.device)
            last = k == len(batches) - 1
            sync = contextlib.nullcontext() if (last or not self.dist.distributed) else self.step_module.no_sync()
            with sync:
                with autocast(self.dist.device, self.cfg.precision):
                    losses, logs = self.step_module(batch)
                loss = sum(losses.values())
                self.scaler.scale(loss / len(batches)).backward()
            for name, v in {"loss": loss, **losses, **logs}.items():
                totals[name] = totals.get(name, 0.0) + (v.detach() if torch.is_tensor(v) else v) / len(batches)
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            totals["grad_norm"] = nn.utils.clip_grad_norm_(self.task.parameters(), self.cfg.grad_clip).detach()
        self._check_finite(totals)  # before the weights change: the step's one host sync
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None  # fp16 only
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if scale is None or self.scaler.get_scale() >= scale:
            self.scheduler.step()  # fp16: a step the scaler skipped (inf/NaN gradients) keeps the lr where it is
        return totals

    def _accumulated_step(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """The forward and backward of all micro-batches by the task's exact accumulation (GradCache: the
        gradient of their concatenation, see tasks/grad_cache.py). Returns the step's scalar logs."""
        ready = []
        for batch in batches:
            self._count_skipped(batch)
            if "image_idx" in batch:  # else every item of this micro-batch was unreadable
                ready.append(to_device(batch, self.dist.device))
        if not ready:
            return {}
        losses, logs = self.task.accumulated_step(
            ready, self.step_module, self.scaler.scale, lambda: autocast(self.dist.device, self.cfg.precision)
        )
        loss = sum(losses.values())
        return {name: float(v) for name, v in {"loss": loss, **losses, **logs}.items()}

    def _check_finite(self, totals: dict[str, torch.Tensor | float]) -> None:
        """Stop before `optimizer.step()` when this step's loss, or (clipping in fp32/bf16) its gradient norm,
        is NaN or infinite on any rank: the weights stay those of the last good step (no checkpoint can hold
        bad ones), and every rank raises the same error together (a healthy rank would otherwise wait forever
        in the next collective). One all-reduce, once per optimizer step: the micro-batches before it never
        wait for the device. In fp16 the grad scaler skips a step with inf/NaN gradients itself (and lowers
        its scale), so only the loss is watched there.

        Raises:
            NonFiniteLossError: naming the step, the rank(s) and the loss terms of the first bad rank.
        """
        watched = {"loss": totals.get("loss", 0.0)}
        if "grad_norm" in totals and not self.scaler.is_enabled():
            watched["gradients"] = totals["grad_norm"]
        values = torch.stack(
            [torch.as_tensor(v, dtype=torch.float32, device=self.dist.device) for v in watched.values()]
        )
        bad_here = ~torch.isfinite(values)  # (len(watched),)
        if all_reduce_max(bad_here.any().float()) == 0:
            return
        flags = dict(zip(watched, bad_here.tolist(), strict=True))
        kind = "loss" if flags["loss"] else "gradients" if any(flags.values()) else ""  # a bad loss has bad grads
        keep = ("grad_norm",) if kind == "gradients" else ()
        here = {k: float(v) for k, v in totals.items() if k.endswith("_loss") or k in keep}  # the task's terms
        every = all_gather_objects((kind, here))  # (what is bad, terms) per rank: one message
        worst = "loss" if any(what == "loss" for what, _ in every) else "gradients"  # DDP shares a bad gradient
        bad = [r for r, (what, _) in enumerate(every) if what == worst]
        kind, terms = every[bad[0]][0], ", ".join(f"{k}={v:.4g}" for k, v in every[bad[0]][1].items())
        where = f" on rank {', '.join(map(str, bad))} of {len(every)}" if len(every) > 1 else ""
        raise NonFiniteLossError(
            f"non-finite {kind} at epoch {self.state.epoch + 1} step {self.state.step_in_epoch + 1}{where} "
            f"({terms}); stopping with the last good checkpoint intact"
        )

    def _count_skipped(self, batch: dict) -> None:
        """Count the pairs of unreadable images that `collate` dropped; more than data.max_bad_samples
        distinct images in one epoch fail the run (each image has several captions, hence pairs)."""
        skipped = batch.pop("skipped", [])  # (image index, reason) per dropped pair
        if not skipped:
            return
        s = self.state
        s.skipped_samples += len(skipped)
        new = sorted({i for i, _ in skipped} - set(s.bad_images))
        s.bad_images += new
        if new:
            log.warning("skipped %d unreadable image(s), %d this epoch: %s", len(new), len(s.bad_images), skipped[0][1])
        if len(s.bad_images) > self.max_bad_samples:
            raise DataError(
                f"{len(s.bad_images)} unreadable training images in epoch {s.epoch + 1}, more than "
                f"data.max_bad_samples={self.max_bad_samples}; first: {skipped[0][1]}"
            )

    def end_epoch(self) -> None:
        """Validate, record, checkpoint (last, per-epoch, best)."""
        s = self.state
        due = (s.epoch + 1) % self.eval_cfg.every_epochs == 0 or s.epoch + 1 == self.cfg.epochs
        t_val = time.perf_counter()
        metrics = self.evaluate() if due else {}
        val_losses = self.validation_loss() if due else {}
        t_val = time.perf_counter() - t_val
        if val_losses:
            self.sinks.metric_logger.log(val_losses, s.global_step, "val", epoch=s.epoch + 1)
            log.info("epoch %d val %s", s.epoch + 1, " ".join(f"{k}={v:.4g}" for k, v in val_losses.items()))
        is_best = False
        if metrics:
            s.history.append({"epoch": s.epoch + 1, **val_losses, **metrics})
            value = metrics[self.eval_cfg.metric]
            is_best = value > s.best_metric
            if is_best:
                s.best_metric, s.best_epoch = value, s.epoch + 1
            self.sinks.metric_logger.log(metrics, s.global_step, "val", epoch=s.epoch + 1)
            log.info(
                "epoch %d val %s=%.2f (best %.2f at epoch %d), peak memory %.0f MB, validation %.1f s "
                "(%.0f%% of the epoch's training time)",
                s.epoch + 1,
                self.eval_cfg.metric,
                value,
                s.best_metric,
                s.best_epoch,
                peak_memory_mb(self.dist.device),
                t_val,
                100 * t_val / max(1e-9, self.epoch_seconds),
            )
        s.epoch, s.step_in_epoch, s.bad_images = s.epoch + 1, 0, []
        self.sinks.checkpointer.save(self.state_dict(), epoch_tag=s.epoch, is_best=is_best)
        self.sinks.metric_logger.flush()

    @torch.no_grad()
    def validation_loss(self) -> dict[str, float]:
        """The task's own objective on up to `eval.loss_batches` batches of validation pairs (eval mode, no
        gradient): `loss` and every `*_loss` term, averaged over batches, logged under the training tags so
        that TensorBoard draws train and val curves on one chart. The training RNG stream is untouched."""
        n = min(self.val_loader.steps, self.eval_cfg.loss_batches) if self.val_loader is not None else 0
        if n <= 0:
            return {}
        self.val_loader.set_epoch(0)  # the same validation batches every time
        was_training = self.task.training
        self.task.eval()
        totals: dict[str, float] = {}
        devices = [self.dist.device] if self.dist.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), autocast(self.dist.device, self.cfg.precision):
                batches = iter(self.val_loader)
                for _ in tqdm(range(n), desc="val loss", disable=not self.show_progress, leave=False):
                    batch = next(batches)
                    batch.pop("skipped", None)
                    if "image_idx" not in batch:
                        continue
                    losses, _ = self.task.validation_step(to_device(batch, self.dist.device))
                    for name, v in {"loss": sum(losses.values()), **losses}.items():
                        totals[name] = totals.get(name, 0.0) + float(v) / n
        finally:
            self.task.train(was_training)
        return totals

    def evaluate(self) -> dict[str, float]:
        if self.evaluator is None:
            return {}
        with torch.no_grad(), autocast(self.dist.device, self.eval_precision):
            metrics = self.evaluator(self.model)
        if self.dist.device.type == "cuda":
            torch.cuda.empty_cache()  # give the evaluation's cached blocks back before training resumes
        return metrics
