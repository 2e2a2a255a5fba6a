"""Optimiser and learning-rate schedule from the config."""

from __future__ import annotations

import math

import torch
from torch import nn

from crossmatch.config import TrainConfig
from crossmatch.errors import ConfigError


def create_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """adam | adamw | sgd. No weight decay on biases, norms and temperatures (1-D or scalar params)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    raise ConfigError(f"unknown train.optimizer {cfg.optimizer!r}; known: adam, adamw, sgd")


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """A per-step LambdaLR: linear warm-up, then step decay (every lr_step_epochs), cosine, or constant."""
    total = max(1, cfg.epochs * steps_per_epoch)
    step_every = max(1, cfg.lr_step_epochs * steps_per_epoch)
    if cfg.scheduler not in ("step", "cosine", "constant"):
        raise ConfigError(f"unknown train.scheduler {cfg.scheduler!r}; known: step, cosine, constant")

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.scheduler == "step":
            return cfg.lr_gamma ** (step // step_every)
        if cfg.scheduler == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
