"""The Trainer's own contract: its config is the run's `train` section, the non-finite guard runs once per
optimizer step, and the train loader is driven through `ResumableLoader` only."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from crossmatch.config import LossConfig, RunConfig
from crossmatch.engine.checkpoint import Checkpointer
from crossmatch.engine.distributed import DistInfo
from crossmatch.engine.logging import MetricLogger
from crossmatch.engine.optim import create_optimizer, create_scheduler
from crossmatch.engine.trainer import RunLoaders, RunSinks, Trainer
from crossmatch.models import create_model
from crossmatch.tasks import build_task

VOCAB = 20


def make_batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(n, 3, 32, 32, generator=g),
        "input_ids": torch.randint(5, VOCAB, (n, 4), generator=g),
        "attention_mask": torch.ones(n, 4, dtype=torch.bool),
        "image_idx": torch.arange(n),
    }


def make_trainer(tmp_path, cfg: RunConfig, loader=None) -> Trainer:
    torch.manual_seed(0)
    task = build_task(create_model("tiny_vse", vocab_size=VOCAB, image_size=32), LossConfig())
    opt = create_optimizer(task, cfg.train)
    sinks = RunSinks(Checkpointer(tmp_path, 1, enabled=False), MetricLogger(tmp_path, enabled=False))
    loader = loader if loader is not None else DataLoader(list(range(32)), batch_size=8)
    return Trainer(task, opt, create_scheduler(opt, cfg.train, 4), RunLoaders(loader), None, sinks, cfg, DistInfo())


def test_the_trainer_config_is_the_run_train_section_with_its_defaults(tmp_path):
    cfg = RunConfig()
    trainer = make_trainer(tmp_path, cfg)
    assert trainer.cfg is cfg.train and cfg.train.grad_clip == 2.0  # what every CLI run uses
    assert "grad_norm" in trainer.train_step([make_batch(8, 0)])  # clipping is on by default
    cfg.train.grad_clip = 0.0
    assert "grad_norm" not in make_trainer(tmp_path, cfg).train_step([make_batch(8, 0)])
