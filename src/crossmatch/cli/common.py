"""Builders shared by the CLI commands: config -> datasets, tokenizer, model, evaluation data; and a
checkpoint -> the model, config and tokenizer it was trained with."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from crossmatch.config import RunConfig, apply_overrides, config_from_dict, selectable_metrics
from crossmatch.data import formats
from crossmatch.data.datasets import CaptionView, ImageCaptionDataset
from crossmatch.data.loaders import build_eval_loader
from crossmatch.data.tokenizer import CaptionTokenizer
from crossmatch.data.transforms import build_image_transform
from crossmatch.engine.checkpoint import read_weights
from crossmatch.errors import CheckpointError, DataError
from crossmatch.evaluation.evaluate import EvalData, compute_scores, evaluate_retrieval
from crossmatch.evaluation.person import evaluate_person_search, image_pids
from crossmatch.models.registry import create_model

MAX_BOXES = 8  # object boxes read per image for box-region models


def open_split(cfg: RunConfig, split: str):
    return formats.open_split(cfg.data, split)


def build_model(cfg: RunConfig, tokenizer: CaptionTokenizer) -> nn.Module:
    """The registered model `model.name` with the config's overrides. The vocabulary size, image side
    and caption length come from the tokenizer and data config, for models whose config has them."""
    overrides = {k: v for k, v in cfg.model.items() if k != "name"}
    data = {
        "vocab_size": tokenizer.vocab_size,
        "image_size": cfg.data.image_size,
        "max_text_len": cfg.data.max_words + 1,
    }  # + a [CLS] for transformer text towers
    return create_model(cfg.model["name"], data_defaults=data, **overrides)


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
    transform = build_image_transform(cfg.data.image_size, train=False)
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
    try:
        tokenizer = CaptionTokenizer.from_str(ckpt["tokenizer"], cfg.data.max_words)
    except DataError as err:
        raise CheckpointError(f"{path}: {err}") from err
    model = build_model(cfg, tokenizer)
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

    evaluator.protocol = "person-search" if pids is not None else "retrieval"  # what it reports, for eval.metric
    evaluator.metric_names = selectable_metrics(person_search=pids is not None, twins=bool(ds.twins))
    return evaluator
