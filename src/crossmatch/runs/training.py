"""Training set-up: a ready `Trainer` built from a config (data, tokenizer, model, task, optimiser and schedule,
train and validation loaders, evaluator, checkpointer and metric logger), with every setting checked before
a run folder is touched."""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

import numpy as np
import torch

from crossmatch.config import RunConfig, check_metric, config_to_dict
from crossmatch.data.datasets import PairView
from crossmatch.data.hard_batches import HardBatchSampler, item_keys
from crossmatch.data.loaders import build_train_loader
from crossmatch.data.tokenizer import CaptionTokenizer
from crossmatch.data.transforms import transform_from_config
from crossmatch.engine.checkpoint import Checkpointer
from crossmatch.engine.distributed import DistInfo
from crossmatch.engine.logging import MetricLogger
from crossmatch.engine.optim import create_optimizer, create_scheduler
from crossmatch.engine.trainer import RunLoaders, RunSinks, Trainer
from crossmatch.errors import ConfigError, DataError
from crossmatch.models.protocols import FrozenCacheable, GradCheckpointing
from crossmatch.progress import show_progress
from crossmatch.runs.build import (
    DATA_FROM_RUN,
    build_model,
    build_run_tokenizer,
    needs_boxes,
    open_split,
    resolve_preprocess,
    resolved_model_section,
)
from crossmatch.runs.evaluation import check_split_overlap, make_evaluator
from crossmatch.tasks import build_task
from crossmatch.tasks.identity import IdentityTask
from crossmatch.tasks.irra import IrraTask


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_trainer(
    cfg: RunConfig, run_dir: Path, dist: DistInfo, tokenizer: CaptionTokenizer | None = None
) -> tuple[Trainer, RunConfig]:
    """Everything a run needs, built from the config, and the resolved config (every field of the built
    model's config: what config.yaml and every checkpoint store). The tokenizer is trained on the train
    captions unless given (a resumed run reuses the saved one)."""
    seed_everything(cfg.train.seed)
    train_ds = open_split(cfg, cfg.data.train_split)
    if tokenizer is None:
        tokenizer = build_run_tokenizer(cfg, lambda: train_ds.captions)
    model, cfg = build_model(cfg, tokenizer)
    model = model.to(dist.device)
    # every field of the built model's config, and the model's own image preprocessing: saved in
    # config.yaml and every checkpoint
    cfg = dataclasses.replace(cfg, model=resolved_model_section(cfg.model["name"], model))
    cfg = resolve_preprocess(cfg, model)
    if cfg.model.get("cache_frozen") and isinstance(model, FrozenCacheable):  # frozen outputs: once, on disk
        folder = run_dir / "frozen_cache" / (f"rank{dist.rank}" if dist.world_size > 1 else "")
        model.use_cache_dir(folder, cache_images=not cfg.data.augment)
    if cfg.train.grad_checkpointing:
        if not isinstance(model, GradCheckpointing):
            raise ConfigError(f"train.grad_checkpointing: model {cfg.model['name']} has no tower that supports it")
        model.set_grad_checkpointing(True)
    if dist.distributed and dist.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics over the global batch
    task = build_task(model, cfg.loss, rank=dist.rank, world_size=dist.world_size)
    check_mlm_weight(task, cfg)
    use_train_identities(task, cfg, train_ds)  # the ID loss's classes, before the optimiser sees the task
    task = task.to(dist.device)
    transform = transform_from_config(cfg.data, train=True)
    pin = dist.device.type == "cuda"
    K = cfg.loss.text_negatives
    if K and not task.uses_text_negatives:
        raise ConfigError(f"loss.text_negatives={K}: the {type(task).__name__} objective takes no text negatives")
    if K and getattr(train_ds, "streaming", False):
        raise ConfigError(f"loss.text_negatives={K} needs an indexed dataset (not data.format={cfg.data.format})")
    if getattr(train_ds, "streaming", False):  # webdataset shards: a resumable stream, not an indexed split
        if cfg.data.hard_batches:
            raise ConfigError("data.hard_batches needs an indexed train split, not a stream of webdataset shards")
        loader = build_stream_loader(cfg, train_ds, tokenizer, transform, dist, needs_boxes(model))
        n_pairs = train_ds.num_pairs
    else:
        skip_bad = cfg.data.max_bad_samples > 0
        pairs = PairView(train_ds, tokenizer, transform, needs_boxes(model), skip_bad=skip_bad, text_negatives=K)
        sampler = None
        if cfg.data.hard_batches:  # confusable pairs in the same batch
            keys = item_keys(train_ds)
            sampler = HardBatchSampler(*keys, cfg.train.batch_size, cfg.train.seed, dist.rank, dist.world_size)
        loader = build_train_loader(
            pairs, cfg.train.batch_size, cfg.train.seed, cfg.data.num_workers, dist.rank, dist.world_size, pin, sampler
        )
        n_pairs = len(pairs)
    if len(loader) == 0:
        raise DataError(
            f"the train split has {n_pairs} captions, fewer than one batch (train.batch_size={cfg.train.batch_size})"
        )
    if len(loader) < cfg.train.accum_steps:
        raise ConfigError(
            f"train.accum_steps={cfg.train.accum_steps}: an epoch has {len(loader)} batches of "
            f"{cfg.train.batch_size}, too few for one optimizer step; lower train.accum_steps or train.batch_size"
        )
    optimizer = create_optimizer(task, cfg.train)
    steps = len(loader) if cfg.train.max_steps_per_epoch <= 0 else min(len(loader), cfg.train.max_steps_per_epoch)
    scheduler = create_scheduler(optimizer, cfg.train, steps)
    progress = show_progress(dist.is_main)
    for split in dict.fromkeys((cfg.data.val_split, cfg.data.test_split)):
        check_split_overlap(cfg, split, train_ds=train_ds)
    val = cfg.data.val_split
    evaluator = make_evaluator(cfg, val, tokenizer, model, dist.device, progress, cfg.eval.max_images, training=True)
    check_metric(cfg.eval.metric, evaluator.metric_names, evaluator.protocol)  # before an epoch, not after it
    val_pairs = PairView(
        open_split(cfg, cfg.data.val_split),
        tokenizer,
        transform_from_config(cfg.data, train=False),
        needs_boxes(model),
        skip_bad=cfg.data.max_bad_samples > 0,
        text_negatives=K,  # the validation loss is the training loss, negatives included
    )
    val_loader = build_train_loader(
        val_pairs, cfg.train.batch_size, cfg.train.seed, cfg.data.num_workers, dist.rank, dist.world_size
    )

    sinks = RunSinks(
        Checkpointer(run_dir, cfg.checkpoint.keep_last, dist.is_main, cfg.checkpoint.safetensors),
        MetricLogger(run_dir, dist.is_main, cfg.train.loggers, config_to_dict(cfg)),
        {
            "config": config_to_dict(cfg),
            "tokenizer": tokenizer.to_str(),
            DATA_FROM_RUN: _relative_to(cfg.data.root, run_dir),
        },
    )
    loaders = RunLoaders(loader, val_loader)
    return Trainer(task, optimizer, scheduler, loaders, evaluator, sinks, cfg, dist), cfg


def check_mlm_weight(task, cfg: RunConfig) -> None:
    """Refuse loss.identity.mlm_weight > 0 for an objective without IRRA's masked-token prediction (it would be
    silently ignored). ALBEF's MLM has its own key, loss.albef.mlm_weight."""
    weight = cfg.loss.identity.mlm_weight
    if weight > 0 and not isinstance(task, IrraTask):
        raise ConfigError(
            f"loss.identity.mlm_weight={weight}: the {type(task).__name__} objective has no masked-token prediction "
            "(IRRA's: model.name=irra or tiny_irra); set it to 0"
        )


def use_train_identities(task, cfg: RunConfig, train_ds) -> None:
    """loss.identity.id_weight > 0: give the task's ID loss its classes, the train split's person identities
    (class k = the k-th smallest id; the map is saved with the classifier in the task's loss state).

    Raises:
        ConfigError: the objective has no ID loss, or the train split has no person identities (or is a stream,
            whose identities are not known before the first step).
    """
    weight = cfg.loss.identity.id_weight
    if weight <= 0:
        return
    if not isinstance(task, IdentityTask):
        raise ConfigError(
            f"loss.identity.id_weight={weight}: the {type(task).__name__} objective has no ID loss (the "
            "person-search objectives have one: a tipcb model, or a dual encoder with loss.name=sdm or cmpm)"
        )
    if getattr(train_ds, "streaming", False):
        raise ConfigError(
            f"loss.identity.id_weight={weight} needs the train identities before the first step: an indexed train "
            f"split, not a stream (data.format={cfg.data.format})"
        )
    pids = [rec.pid for rec in train_ds.images]
    missing = sum(p is None for p in pids)
    if not pids or missing:
        raise ConfigError(
            f"loss.identity.id_weight={weight} needs a person identity (pid) on every train image; the "
            f"data.format={cfg.data.format} split {cfg.data.train_split!r} has {missing} of {len(pids)} without "
            "one: use a person-search format (cuhk_pedes, icfg_pedes, rstpreid) or entries with a pid"
        )
    task.use_identities(pids)


def _relative_to(path: str, folder: Path) -> str:
    """`path` relative to `folder` (POSIX separators), for a run folder that moves together with its dataset."""
    return Path(os.path.relpath(Path(path).resolve(), folder.resolve())).as_posix()


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
