"""Evaluation set-up: the `Evaluator` of a split with the config's protocol (folds, re-ranking, a first-stage
model, person search), checked before any work; the evaluation loaders of a split; the refusal of an
evaluation split that shares images with the train split; compositional accuracy on a negatives file."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from crossmatch.config import RunConfig, selectable_metrics
from crossmatch.data.datasets import CaptionView, ImageCaptionDataset, ImageView
from crossmatch.data.loaders import build_eval_loader
from crossmatch.data.tokenizer import CaptionTokenizer
from crossmatch.data.transforms import WHITE, transform_from_config
from crossmatch.errors import ConfigError, DataError
from crossmatch.metrics import image_folds
from crossmatch.models.protocols import PairScorer
from crossmatch.retrieval.compositional import (
    NegativesFileError,
    Triple,
    TripleSplit,
    compositional_accuracy,
    read_negatives,
    score_triples,
)
from crossmatch.retrieval.evaluate import EvalData, compute_scores
from crossmatch.retrieval.evaluator import Evaluator
from crossmatch.retrieval.person import image_pids
from crossmatch.runs.build import load_run, needs_boxes, open_split, resolve_checkpoint

log = logging.getLogger(__name__)


def image_identities(ds) -> set[str]:
    """What makes images of two splits the same image: the resolved file path, or a shard sample's shard and key."""
    keys = getattr(ds, "image_keys", None)
    return set(keys) if keys is not None else {os.path.realpath(r.path) for r in ds.images}


def check_split_overlap(cfg: RunConfig, split: str, ds=None, train_ds=None) -> None:
    """Refuse an evaluation split that shares images with the train split (its metrics would be inflated),
    or with `data.allow_split_overlap` warn about it. A split that does not exist shares nothing.

    Raises:
        DataError: naming how many images are shared and one of them.
    """
    if split == cfg.data.train_split:
        return
    try:
        ds = ds if ds is not None else open_split(cfg, split)
        train_ds = train_ds if train_ds is not None else open_split(cfg, cfg.data.train_split)
    except DataError:
        return
    shared = image_identities(ds) & image_identities(train_ds)
    if not shared:
        return
    what = (
        f"{len(shared)} image(s) of the {split} split are also in the train split (e.g. {min(shared)}): "
        "its metrics would be inflated"
    )
    if not cfg.data.allow_split_overlap:
        raise DataError(f"{what}; fix the dataset's splits, or set data.allow_split_overlap=true to accept them")
    log.warning("%s (data.allow_split_overlap=true)", what)


def build_eval_data(cfg: RunConfig, ds: ImageCaptionDataset, tokenizer: CaptionTokenizer, model: nn.Module) -> EvalData:
    transform = transform_from_config(cfg.data, train=False)
    return EvalData(
        image_loader=build_eval_loader(
            ds.image_view(transform, needs_boxes(model)), cfg.eval.batch_size, cfg.data.num_workers
        ),
        # captions are tokenised up front: a worker would only add inter-process copies
        text_loader=build_eval_loader(CaptionView(ds, tokenizer), cfg.eval.batch_size),
        txt_to_img=torch.tensor(ds.txt_to_img),
        twins=ds.twins,
    )


def make_evaluator(
    cfg: RunConfig,
    split: str,
    tokenizer: CaptionTokenizer,
    model: nn.Module,
    device: torch.device,
    progress: bool = False,
    max_images: int = 0,
    training: bool = False,
) -> Evaluator:
    """The Evaluator of one split with the config's protocol (folds, re-ranking, person search, and a
    first-stage model from `eval.first_stage`, loaded and scored once on first use); with `max_images`,
    of the split's first images only (quick validation, `eval.max_images`). The protocol is checked at once
    (`check_protocol`; `training`: the validation of a run)."""
    ds = open_split(cfg, split)
    if not training:  # a run checks its val and test splits against the train split it holds (build_trainer)
        check_split_overlap(cfg, split, ds)
    ds = ds.first_images(max_images)

    def first_stage() -> torch.Tensor:
        first, first_cfg, first_tok = load_run(cfg.eval.first_stage, [f"data.root={cfg.data.root}"])
        first_data = build_eval_data(first_cfg, open_split(first_cfg, split).first_images(max_images), first_tok, first)
        return compute_scores(first.to(device), first_data, device, cfg.eval.chunk_size, progress)

    pids = image_pids(ds)  # person-search datasets: relevance by identity
    check_protocol(cfg, model, ds, pids is not None, training)
    stage1 = first_stage if cfg.eval.first_stage else None
    twin_pids = getattr(ds, "twin_pids", [])  # person search: twin identities (crossmatch data people)
    data = build_eval_data(cfg, ds, tokenizer, model)
    evaluator = Evaluator(data, cfg.eval, device, pids, stage1, progress, twin_pids)
    evaluator.protocol = "person-search" if pids is not None else "retrieval"  # what it reports, for eval.metric
    twins = bool(twin_pids) if pids is not None else bool(ds.twins)  # twin identities, or twin scenes
    evaluator.metric_names = selectable_metrics(person_search=pids is not None, twins=twins)
    return evaluator


def check_protocol(cfg: RunConfig, model: nn.Module, ds, person_search: bool, training: bool) -> None:
    """The eval settings that depend on the split and the model, checked before any work (a training run
    would otherwise meet them after its first epoch): `eval.folds` divides the split's images, and an
    `eval.first_stage` exists. In training, the first stage must also be re-ranked by the model: without
    re-ranking every validation score is the first stage's, and no epoch could be better than another."""
    e = cfg.eval
    if not person_search:
        try:
            image_folds(ds.txt_to_img, e.folds)
        except ValueError as err:
            raise ConfigError(f"eval.folds={e.folds}: {err}") from err
    if not e.first_stage:
        return
    if not resolve_checkpoint(e.first_stage).is_file():
        raise ConfigError(f"eval.first_stage={e.first_stage}: no such checkpoint")
    if training and first_stage_only(cfg, model):
        raise ConfigError(
            f"eval.first_stage={e.first_stage} without re-ranking (eval.rerank_k={e.rerank_k}, model "
            f"{cfg.model['name']}): validation would measure only the first stage; set eval.rerank_k >= 1 "
            "with a fusion model, or leave eval.first_stage empty"
        )


def first_stage_only(cfg: RunConfig, model: nn.Module) -> bool:
    """Whether an evaluation's scores are all `eval.first_stage`'s (the model re-ranks none of them)."""
    return bool(cfg.eval.first_stage) and not (cfg.eval.rerank_k > 0 and isinstance(model, PairScorer))


def evaluate_negatives(
    cfg: RunConfig,
    model: nn.Module,
    tokenizer: CaptionTokenizer,
    path: str | Path | list[Triple],
    device: torch.device,
    root: str | Path | None = None,
    progress: bool = False,
) -> dict[str, dict[str, float | int]]:
    """Compositional accuracy of a model on a negatives file (crossmatch.retrieval.compositional), or on
    triples already made, per perturbation type and overall. Images resolve against `root` (default
    data.root) unless absolute; box-region models read each image's boxes from the train/val/test splits of
    the dataset at `root`."""
    root = Path(root or cfg.data.root)
    triples = path if isinstance(path, list) else read_negatives(path, root)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(root)))  # boxes: from that dataset
    max_boxes = needs_boxes(model)
    split = TripleSplit(triples, _boxes_from_dataset(cfg, path) if max_boxes else None)
    split.max_image_pixels = cfg.data.max_image_pixels
    split.background = tuple(cfg.data.background) if cfg.data.background else WHITE
    transform = transform_from_config(cfg.data, train=False)
    image_loader = build_eval_loader(ImageView(split, transform, max_boxes), cfg.eval.batch_size, cfg.data.num_workers)
    text_loader = build_eval_loader(CaptionView(split, tokenizer), cfg.eval.batch_size)
    pos, neg = score_triples(model.to(device), split, image_loader, text_loader, device, progress)
    return compositional_accuracy(pos, neg, split.types)


def _boxes_from_dataset(cfg: RunConfig, path: str | Path) -> Callable[[Triple], list | None]:
    """triple -> its image's boxes, looked up (by resolved path) in the dataset's train, val and test splits."""
    boxes: dict[Path, list | None] = {}
    for name in dict.fromkeys((cfg.data.train_split, cfg.data.val_split, cfg.data.test_split)):
        try:
            ds = open_split(cfg, name)
        except DataError:
            continue
        boxes.update({r.path.resolve(): r.boxes for r in getattr(ds, "images", [])})

    def lookup(t: Triple) -> list | None:
        key = t.path.resolve()
        if key not in boxes:
            raise NegativesFileError(
                f"{path} line {t.line}: image {t.image} is not in the dataset {cfg.data.root}, and "
                f"{cfg.model['name']} reads object boxes from it"
            )
        return boxes[key]

    return lookup
