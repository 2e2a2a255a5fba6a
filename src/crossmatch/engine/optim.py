"""Optimiser and learning-rate schedule from the config."""

from __future__ import annotations

import math

import torch
from torch import nn

from crossmatch.config import TrainConfig
from crossmatch.errors import ConfigError
from crossmatch.models.protocols import LayeredTowers
from crossmatch.tasks.base import Task


def lr_scales(module: nn.Module, layer_decay: float) -> dict[str, float]:
    """Layer-wise lr decay (as BEiT and ELECTRA fine-tune): a parameter at depth d of a tower of depth n gets
    lr * layer_decay ** (n - d); depths come from the model's `layer_depths()` (embeddings 0, blocks 1..n-1,
    the tower's head n). Parameters outside the model (a task's temperature) keep the full lr.

    Raises:
        ConfigError: layer_decay is not in (0, 1], or the model does not describe its layers.
    """
    if not 0 < layer_decay <= 1:
        raise ConfigError(f"train.layer_decay={layer_decay}: must be in (0, 1]")
    if layer_decay == 1:
        return {}
    model = module.model if isinstance(module, Task) else module
    if not isinstance(model, LayeredTowers):
        raise ConfigError(f"train.layer_decay: {type(model).__name__} does not describe its layers (clip models do)")
    prefix = "model." if model is not module else ""
    return {prefix + name: layer_decay ** (top - d) for name, (d, top) in model.layer_depths().items()}


def tower_lrs(module: nn.Module, cfg: TrainConfig) -> dict[str, float]:
    """Parameter name -> lr for the parameters whose lr is not train.lr: the towers' (the names the model's
    `layer_depths()` lists) get (train.tower_lr or train.lr) * layer_decay ** (n - d); see lr_scales.

    Raises:
        ConfigError: as lr_scales; or train.tower_lr is set for a model that does not describe its towers.
    """
    if cfg.tower_lr == 0:
        return {name: cfg.lr * scale for name, scale in lr_scales(module, cfg.layer_decay).items()}
    model = module.model if isinstance(module, Task) else module
    if not isinstance(model, LayeredTowers):
        raise ConfigError(
            f"train.tower_lr: {type(model).__name__} has no pretrained towers "
            "(vse_pretrained, clip, albef_minilm, vilt_minilm do)"
        )
    scales = lr_scales(module, cfg.layer_decay) or {
        ("model." if model is not module else "") + name: 1.0 for name in model.layer_depths()
    }
    return {name: cfg.tower_lr * scale for name, scale in scales.items()}


def create_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """adam | adamw | sgd. No weight decay on biases, norms and temperatures (1-D or scalar params);
    with train.layer_decay < 1 or train.tower_lr, one more group per (decay, lr) pair (see tower_lrs)."""
    lrs = tower_lrs(model, cfg)
    grouped: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            grouped.setdefault((p.ndim >= 2, lrs.get(name, cfg.lr)), []).append(p)
    groups = [
        {"params": grouped.get((True, cfg.lr), []), "weight_decay": cfg.weight_decay},
        {"params": grouped.get((False, cfg.lr), []), "weight_decay": 0.0},
    ]  # the two groups of a run without layer decay, in this order (checkpoints of optimiser state rely on it)
    for (decay, lr), params in sorted(grouped.items(), key=lambda kv: (-kv[0][1], not kv[0][0])):
        if lr != cfg.lr:
            groups.append({"params": params, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": lr})
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
