"""`crossmatch train CONFIG [--run-dir DIR] [--resume] [key=value ...]`: config -> data, tokenizer,
task, optimiser, checkpointer, logger -> Trainer.fit()."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from crossmatch.cli.common import build_model, make_evaluator, needs_boxes, open_split, resolved_model_section
from crossmatch.config import RunConfig, config_from_dict, config_to_dict, save_config
from crossmatch.data.datasets import PairView
from crossmatch.data.loaders import build_train_loader
from crossmatch.data.tokenizer import CaptionTokenizer, build_tokenizer
from crossmatch.data.transforms import build_image_transform
from crossmatch.engine.checkpoint import Checkpointer, partial_load, read_weights
from crossmatch.engine.distributed import DistInfo, init_distributed
from crossmatch.engine.logging import MetricLogger, setup_logging
from crossmatch.engine.optim import create_optimizer, create_scheduler
from crossmatch.engine.trainer import RunSinks, Trainer, TrainState
from crossmatch.errors import DataError
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
    if getattr(train_ds, "streaming", False):  # webdataset shards: a resumable stream, not an indexed split
        loader = build_stream_loader(cfg, train_ds, tokenizer, transform, dist, needs_boxes(model))
        n_pairs = train_ds.num_pairs
    else:
        pairs = PairView(train_ds, tokenizer, transform, needs_boxes(model), skip_bad=cfg.data.max_bad_samples > 0)
        loader = build_train_loader(
            pairs, cfg.train.batch_size, cfg.train.seed, cfg.data.num_workers, dist.rank, dist.world_size
        )
        n_pairs = len(pairs)
    if len(loader) == 0:
        raise DataError(
            f"the train split has {n_pairs} captions, fewer than one batch (train.batch_size={cfg.train.batch_size})"
        )
    optimizer = create_optimizer(task, cfg.train)
    steps = len(loader) if cfg.train.max_steps_per_epoch <= 0 else min(len(loader), cfg.train.max_steps_per_epoch)
    scheduler = create_scheduler(optimizer, cfg.train, steps)
    evaluator = make_evaluator(cfg, cfg.data.val_split, tokenizer, model, dist.device)

    sinks = RunSinks(
        Checkpointer(run_dir, cfg.checkpoint.keep_last, dist.is_main),
        MetricLogger(run_dir, enabled=dist.is_main),
        {"config": config_to_dict(cfg), "tokenizer": tokenizer.to_str()},
    )
    return Trainer(task, optimizer, scheduler, loader, evaluator, sinks, cfg, dist)


def build_stream_loader(cfg: RunConfig, train_ds, tokenizer, transform, dist: DistInfo, max_boxes: int):
    """The resumable loader of a streamed (webdataset) train split."""
    from crossmatch.data.shard_stream import build_shard_loader

    return build_shard_loader(
        train_ds,
        tokenizer,
        transform,
        batch_size=cfg.train.batch_size,
        seed=cfg.train.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        num_workers=cfg.data.num_workers,
        buffer_size=cfg.data.shuffle_buffer,
        skip_bad=cfg.data.max_bad_samples > 0,
        max_boxes=max_boxes,
    )


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
    `init_from` (fine-tuning) loads the weights of another run whose names and shapes match."""
    run_dir = Path(run_dir)
    dist = init_distributed()
    setup_logging(run_dir, dist.is_main)
    latest = Checkpointer(run_dir).load_latest() if resume else None
    if resume and latest is None:
        log.info("no checkpoint in %s: starting from scratch", run_dir / "checkpoints")
    if latest is not None:
        changed = _diff(config_to_dict(config_from_dict(latest[0]["config"])), config_to_dict(cfg))
        if changed:
            log.warning("resuming with a config that differs from %s: %s", latest[1], "; ".join(changed))
    tokenizer = CaptionTokenizer.from_str(latest[0]["tokenizer"], cfg.data.max_words) if latest else None
    trainer = build_trainer(cfg, run_dir, dist, tokenizer)
    if dist.is_main:
        save_config(cfg, run_dir / "config.yaml")
        CaptionTokenizer.from_str(trainer.sinks.extra_state["tokenizer"]).save(run_dir / "tokenizer.json")
    if init_from and latest is None:
        report = partial_load(trainer.model, read_weights(init_from)["model"])
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
        trainer.load_state_dict(latest[0])
        log.info(
            "resumed from %s at epoch %d, step %d", latest[1], trainer.state.epoch + 1, trainer.state.step_in_epoch
        )
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
