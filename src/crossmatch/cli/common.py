"""Builders shared by the CLI commands: config -> datasets, tokenizer, model, evaluation data; and a
checkpoint -> the model, config and tokenizer it was trained with."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from crossmatch.config import RunConfig, apply_overrides, config_from_dict, load_config
from crossmatch.data import formats
from crossmatch.data.datasets import CaptionView, ImageCaptionDataset
from crossmatch.data.loaders import build_eval_loader
from crossmatch.data.tokenizer import CaptionTokenizer, build_tokenizer
from crossmatch.data.transforms import transform_from_config
from crossmatch.engine.checkpoint import read_weights
from crossmatch.errors import CheckpointError, ConfigError
from crossmatch.evaluation.evaluate import EvalData, compute_scores, evaluate_retrieval
from crossmatch.evaluation.person import evaluate_person_search, image_pids
from crossmatch.models.registry import create_model, create_tokenizer

log = logging.getLogger(__name__)
MAX_BOXES = 8  # object boxes read per image for box-region models


def open_split(cfg: RunConfig, split: str):
    return formats.open_split(cfg.data, split)


def build_model(cfg: RunConfig, tokenizer: CaptionTokenizer, load_weights: bool = True) -> nn.Module:
    """The registered model `model.name` with the config's overrides. The vocabulary size, image side
    and caption length come from the tokenizer and data config, for models whose config has them.
    `load_weights=False`: a checkpoint's weights follow, so pretrained ones need not be fetched."""
    overrides = {k: v for k, v in cfg.model.items() if k != "name"}
    data = {
        "vocab_size": tokenizer.vocab_size,
        "image_size": cfg.data.image_size,
        "max_text_len": cfg.data.max_words + 1,
        "pad_id": getattr(tokenizer, "pad_id", 0),
    }  # + a [CLS] for transformer text towers
    return create_model(cfg.model["name"], data_defaults=data, load_weights=load_weights, **overrides)


def build_run_tokenizer(cfg: RunConfig, captions: Callable[[], list[str]]) -> CaptionTokenizer:
    """The model family's own tokenizer (open_clip models), else `data.tokenizer` (trained on `captions()`)."""
    own = create_tokenizer(cfg.model["name"], **{k: v for k, v in cfg.model.items() if k != "name"})
    if own is None:
        return build_tokenizer(cfg.data.tokenizer, captions(), cfg.data.min_word_freq, cfg.data.max_words)
    if cfg.data.tokenizer != "word":
        raise ConfigError(f"model {cfg.model['name']} brings its own tokenizer: leave data.tokenizer unset")
    return own


def resolve_preprocess(cfg: RunConfig, model: nn.Module) -> None:
    """Fill the run's empty preprocessing fields (data.image_mean/std/resize/interpolation) from the model's
    own `preprocess`; its input size replaces data.image_size (its architecture fixes it)."""
    pp = getattr(model, "preprocess", None)
    if not pp:
        return
    d = cfg.data
    d.image_size = pp["size"]
    d.image_mean, d.image_std = d.image_mean or pp["mean"], d.image_std or pp["std"]
    d.resize, d.interpolation = d.resize or pp["resize"], d.interpolation or pp["interpolation"]
    log.info(
        "preprocessing: %d px, %s resize, %s, mean %s, std %s",
        d.image_size,
        d.resize,
        d.interpolation,
        d.image_mean,
        d.image_std,
    )


def build_untrained_run(
    name: str, data_root: str, overrides: list[str] | None = None
) -> tuple[nn.Module, RunConfig, CaptionTokenizer]:
    """Model (eval mode, CPU), config and tokenizer of a registered model built from its config alone (no
    checkpoint): the zero-shot path, e.g. a pretrained open_clip model evaluated before any training."""
    cfg = load_config(None, [f"model.name={name}", f"data.root={data_root}", *(overrides or [])])
    tokenizer = build_run_tokenizer(cfg, lambda: open_split(cfg, cfg.data.train_split).captions)
    model = build_model(cfg, tokenizer)
    cfg.model = resolved_model_section(name, model)
    resolve_preprocess(cfg, model)
    return model.eval(), cfg, tokenizer


def resolved_model_section(name: str, model: nn.Module) -> dict:
    """`model` config section with every field of the built model's config, so a checkpoint rebuilds the
    same architecture even if the registered defaults change later."""
    if not dataclasses.is_dataclass(getattr(model, "config", None)):
        return {"name": name}
    fields = dataclasses.asdict(model.config)
    return {"name": name, **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}


def needs_boxes(model: nn.Module) -> int:
    return MAX_BOXES if getattr(model, "needs_boxes", False) else 0


def build_eval_data(cfg: RunConfig, ds: ImageCaptionDataset, tokenizer: CaptionTokenizer, model: nn.Module) -> EvalData:
    transform = transform_from_config(cfg.data, train=False)
    return EvalData(
        image_loader=build_eval_loader(
            ds.image_view(transform, needs_boxes(model)), cfg.eval.batch_size, cfg.data.num_workers
        ),
        text_loader=build_eval_loader(CaptionView(ds, tokenizer), cfg.eval.batch_size, cfg.data.num_workers),
        txt_to_img=torch.tensor(ds.txt_to_img),
        twins=ds.twins,
    )


def load_run(path: str | Path, overrides: list[str] | None = None) -> tuple[nn.Module, RunConfig, CaptionTokenizer]:
    """Model (eval mode, CPU), config and tokenizer from a .pt checkpoint or a .safetensors export;
    `overrides` (key=value) apply on top of the stored config, e.g. a different data.root."""
    ckpt = read_weights(path)
    for key in ("config", "tokenizer"):
        if key not in ckpt:
            raise CheckpointError(f"{path} has no '{key}' entry (not written by crossmatch train)")
    cfg = apply_overrides(config_from_dict(ckpt["config"]), overrides or [])
    tokenizer = CaptionTokenizer.from_str(ckpt["tokenizer"], cfg.data.max_words)
    model = build_model(cfg, tokenizer, load_weights=False)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        lines = str(err).splitlines()
        detail = lines[1].strip() if len(lines) > 1 else str(err)
        raise CheckpointError(f"{path}: weights do not fit model {cfg.model['name']}: {detail}") from err
    return model.eval(), cfg, tokenizer


def make_evaluator(
    cfg: RunConfig,
    split: str,
    tokenizer: CaptionTokenizer,
    model: nn.Module,
    device: torch.device,
    progress: bool = False,
):
    """`evaluator(model) -> metrics` for one split with the config's protocol (folds, re-ranking, and a
    first-stage model from `eval.first_stage`, scored once and reused)."""
    ds = open_split(cfg, split)
    data = build_eval_data(cfg, ds, tokenizer, model)
    pids = image_pids(ds)  # person-search datasets: relevance by identity
    cache: dict[str, torch.Tensor] = {}

    def evaluator(m: nn.Module) -> dict[str, float]:
        if pids is not None:
            return evaluate_person_search(m, data, pids, device, cfg.eval.chunk_size, progress)
        if cfg.eval.first_stage and "stage1" not in cache:
            first, first_cfg, first_tok = load_run(cfg.eval.first_stage, [f"data.root={cfg.data.root}"])
            first_data = build_eval_data(first_cfg, open_split(first_cfg, split), first_tok, first)
            cache["stage1"] = compute_scores(first.to(device), first_data, device, cfg.eval.chunk_size, progress)
        return evaluate_retrieval(
            m,
            data,
            device,
            cfg.eval.chunk_size,
            cfg.eval.folds,
            cfg.eval.rerank_k,
            cfg.eval.rerank_batch,
            cache.get("stage1"),
            progress,
        )

    return evaluator
