"""`crossmatch train CONFIG [--run-dir DIR] [--resume] [key=value ...]`: config -> data, tokenizer,
task, optimiser, checkpointer, logger -> Trainer.fit()."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from crossmatch.cli.common import build_model, make_evaluator, needs_boxes, open_split, resolved_model_section
from crossmatch.config import RunConfig, check_metric, config_from_dict, config_to_dict, save_config, validate_config
from crossmatch.data.datasets import PairView
from crossmatch.data.loaders import build_train_loader
from crossmatch.data.tokenizer import CaptionTokenizer, build_tokenizer
from crossmatch.data.transforms import build_image_transform
from crossmatch.engine.checkpoint import Checkpointer, partial_load, read_weights
from crossmatch.engine.distributed import DistInfo, init_distributed
from crossmatch.engine.logging import MetricLogger, setup_logging
from crossmatch.engine.optim import create_optimizer, create_scheduler
from crossmatch.engine.rundir import RunLock
from crossmatch.engine.trainer import RunSinks, Trainer, TrainState
from crossmatch.errors import CheckpointError, DataError
from crossmatch.files import remove_orphans, write_text
from crossmatch.tasks import build_task

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_trainer(cfg: RunConfig, run_dir: Path, dist: DistInfo, tokenizer: CaptionTokenizer | None = None) -> Trainer:
    """Everything a run needs, built from the config. The tokenizer is trained on the train captions
    unless given (a resumed run reuses the saved one)."""
    seed_everything(cfg.train.seed)
    train_ds = open_split(cfg, cfg.data.train_split)
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg.data.tokenizer, train_ds.captions, cfg.data.min_word_freq, cfg.data.max_words)
    model = build_model(cfg, tokenizer).to(dist.device)
    cfg.model = resolved_model_section(cfg.model["name"], model)  # saved in config.yaml and every checkpoint
    if dist.distributed and dist.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics over the global batch
    task = build_task(model, cfg.loss, rank=dist.rank, world_size=dist.world_size).to(dist.device)
    transform = build_image_transform(cfg.data.image_size, train=True, augment=cfg.data.augment)
    pairs = PairView(train_ds, tokenizer, transform, needs_boxes(model), skip_bad=cfg.data.max_bad_samples > 0)
    loader = build_train_loader(
        pairs, cfg.train.batch_size, cfg.train.seed, cfg.data.num_workers, dist.rank, dist.world_size
    )
    if len(loader) == 0:
        raise DataError(
            f"the train split has {len(pairs)} captions, fewer than one batch (train.batch_size={cfg.train.batch_size})"
        )
    optimizer = create_optimizer(task, cfg.train)
    steps = len(loader) if cfg.train.max_steps_per_epoch <= 0 else min(len(loader), cfg.train.max_steps_per_epoch)
    scheduler = create_scheduler(optimizer, cfg.train, steps)
    evaluator = make_evaluator(cfg, cfg.data.val_split, tokenizer, model, dist.device)
    check_metric(cfg.eval.metric, evaluator.metric_names, evaluator.protocol)  # before an epoch, not after it

    sinks = RunSinks(
        Checkpointer(run_dir, cfg.checkpoint.keep_last, dist.is_main),
        MetricLogger(run_dir, enabled=dist.is_main),
        {"config": config_to_dict(cfg), "tokenizer": tokenizer.to_str()},
    )
    return Trainer(task, optimizer, scheduler, loader, evaluator, sinks, cfg, dist)


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts, as 'key: old -> new'."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a} -> {b}")
    return out


def run_train(cfg: RunConfig, run_dir: str | Path, resume: bool = False, init_from: str | None = None) -> TrainState:
    """Train `cfg` in `run_dir`; with `resume`, continue from the newest readable checkpoint there.
    `init_from` (fine-tuning) loads the weights of another run whose names and shapes match.

    The config is validated before anything is read or written, and the run dir is locked for the
    run (a second trainer on it is refused, naming this one's PID)."""
    validate_config(cfg)
    run_dir = Path(run_dir)
    dist = init_distributed()
    lock = RunLock(run_dir).acquire() if dist.is_main else None
    try:
        return _train(cfg, run_dir, dist, resume, init_from)
    finally:
        if lock is not None:
            lock.release()


def _resume_point(cfg: RunConfig, run_dir: Path) -> tuple[dict, Path] | None:
    """The checkpoint to resume from (None: start from scratch), checked against this run's model."""
    latest = Checkpointer(run_dir).load_latest()
    if latest is None:
        log.info("no checkpoint in %s: starting from scratch", run_dir / "checkpoints")
        return None
    ckpt, path = latest
    if "config" not in ckpt or "tokenizer" not in ckpt:
        raise CheckpointError(f"cannot resume from {path}: it has no config or tokenizer (not from crossmatch train)")
    old = ckpt["config"].get("model", {}).get("name")
    if old != cfg.model["name"]:
        raise CheckpointError(
            f"cannot resume from {path}: it holds a {old} model and the config asks for {cfg.model['name']} "
            "(resume with the same model.name, or train into another --run-dir)"
        )
    changed = _diff(config_to_dict(config_from_dict(ckpt["config"])), config_to_dict(cfg))
    if changed:
        log.warning("resuming with a config that differs from %s: %s", path, "; ".join(changed))
    return latest


def _train(cfg: RunConfig, run_dir: Path, dist: DistInfo, resume: bool, init_from: str | None) -> TrainState:
    setup_logging(run_dir, dist.is_main)
    if dist.is_main:
        for orphan in remove_orphans(run_dir / "checkpoints") + remove_orphans(run_dir):
            log.info("removed %s, left by an interrupted run", orphan)
    latest = _resume_point(cfg, run_dir) if resume else None
    init_weights = read_weights(init_from)["model"] if init_from and latest is None else None  # fail early
    tokenizer = None
    if latest is not None:
        try:
            tokenizer = CaptionTokenizer.from_str(latest[0]["tokenizer"], cfg.data.max_words)
        except (KeyError, DataError) as err:
            raise CheckpointError(f"cannot resume from {latest[1]}: {err}") from err
    trainer = build_trainer(cfg, run_dir, dist, tokenizer)
    if dist.is_main:
        save_config(cfg, run_dir / "config.yaml")
        tok = CaptionTokenizer.from_str(trainer.sinks.extra_state["tokenizer"]).tokenizer
        write_text(run_dir / "tokenizer.json", tok.to_str(pretty=True))
    if init_weights is not None:
        report = partial_load(trainer.model, init_weights)
        log.info("initialised %d tensors from %s", len(report["loaded"]), init_from)
        for kind in ("missing", "mismatched", "unexpected"):
            if report[kind]:
                log.warning(
                    "--init-from %s: %d %s tensor(s) not loaded: %s",
                    init_from,
                    len(report[kind]),
                    kind,
                    ", ".join(report[kind]),
                )
    if latest is not None:
        _load_resume_state(trainer, *latest)
    log.info(
        "training %s: %d epochs x %d steps, run dir %s",
        cfg.model["name"],
        cfg.train.epochs,
        trainer.steps_per_epoch,
        run_dir,
    )
    try:
        return trainer.fit()
    finally:
        trainer.sinks.metric_logger.close()


def _load_resume_state(trainer: Trainer, ckpt: dict, path: Path) -> None:
    """Restore the trainer from `ckpt`, and repair best.pt / best.safetensors if an interruption left them
    missing or stale (see Checkpointer.repair_best)."""
    try:
        trainer.load_state_dict(ckpt)
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        lines = str(err).strip().splitlines() or [type(err).__name__]
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise CheckpointError(f"cannot resume from {path}: it does not fit this run ({detail[:160]})") from err
    trainer.sinks.checkpointer.repair_best(ckpt)
    log.info("resumed from %s at epoch %d, step %d", path, trainer.state.epoch + 1, trainer.state.step_in_epoch)
