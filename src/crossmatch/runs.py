"""Runs: everything between a config (or a checkpoint) and the objects that train, evaluate and search.

- config -> dataset splits, tokenizer, model (`build_model`), evaluation data and `Evaluator`;
- config -> a ready `Trainer` (`build_trainer`) and a whole training run in a run folder (`train`);
- checkpoint, safetensors export or run folder -> the model, config and tokenizer it was trained with
  (`load_run`, behind `crossmatch.load`).

The CLI parses arguments, calls these and prints; nothing here reads flags.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from crossmatch.config import (
    RunConfig,
    apply_overrides,
    check_metric,
    config_from_dict,
    config_to_dict,
    image_hw,
    load_config,
    move_legacy_loss_keys,
    save_config,
    selectable_metrics,
    validate_config,
)
from crossmatch.data import formats
from crossmatch.data.datasets import CaptionView, ImageCaptionDataset, ImageView, PairView
from crossmatch.data.hard_batches import HardBatchSampler, item_keys
from crossmatch.data.loaders import build_eval_loader, build_train_loader
from crossmatch.data.tokenizer import CaptionTokenizer, build_tokenizer
from crossmatch.data.transforms import DEFAULT_PREPROCESS, WHITE, describe_transform, transform_from_config
from crossmatch.engine.checkpoint import Checkpointer, is_pretrained_dir, partial_load, read_weights
from crossmatch.engine.distributed import DistInfo, init_distributed
from crossmatch.engine.logging import MetricLogger, close_run_log, hold_run_log, setup_logging
from crossmatch.engine.optim import create_optimizer, create_scheduler
from crossmatch.engine.rundir import RunLock, SetAside
from crossmatch.engine.trainer import RunLoaders, RunSinks, Trainer, TrainerConfig, TrainState
from crossmatch.errors import CheckpointError, ConfigError, DataError
from crossmatch.files import remove_orphans
from crossmatch.metrics import image_folds
from crossmatch.models.frozen_cache import warm_up as cache_train_images
from crossmatch.models.registry import UnknownModelKeysError, create_model, create_tokenizer
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
from crossmatch.tasks import build_task

log = logging.getLogger(__name__)
DATA_FROM_RUN = "data_root_from_run"  # checkpoint entry: the dataset's path relative to the run folder
MAX_BOXES = 8  # object boxes read per image for box-region models


def open_split(cfg: RunConfig, split: str):
    return formats.open_split(cfg.data, split)


def build_model(cfg: RunConfig, tokenizer: CaptionTokenizer, load_weights: bool = True) -> tuple[nn.Module, RunConfig]:
    """The registered model `model.name` with the config's overrides, and the config it was built from.
    The vocabulary size, image side and caption length come from the tokenizer and data config, for
    models whose config has them. Loss keys that 0.1.0 kept in the model section are moved into their
    `loss` section (with a warning), so old configs and checkpoints build the same model.
    `load_weights=False`: a checkpoint's weights follow, so pretrained ones need not be fetched."""
    overrides = {k: v for k, v in cfg.model.items() if k != "name"}
    data = {
        "vocab_size": tokenizer.vocab_size,
        "image_size": cfg.data.image_size,
        "max_text_len": cfg.data.max_words + 1,  # + a [CLS] for transformer text towers
        "pad_id": getattr(tokenizer, "pad_id", 0),
    }
    try:
        model = create_model(cfg.model["name"], data_defaults=data, load_weights=load_weights, **overrides)
        check_image_size(model, resolve_preprocess(cfg, model))
        return model, cfg
    except UnknownModelKeysError as err:
        moved = move_legacy_loss_keys(cfg, err.config_class, err.keys)
        if moved is None:
            raise
        cfg, what = moved
        log.warning("config keys moved since 0.1.0: %s", "; ".join(what))
        return build_model(cfg, tokenizer, load_weights)


@torch.no_grad()
def check_image_size(model: nn.Module, cfg: RunConfig) -> None:
    """Encode two blank images of the configured size: a size the image tower cannot take (smaller than a
    patch, pooled to nothing) is a ConfigError naming data.image_size, not a traceback at the first step.
    A model whose image input is more than pixels (boxes, stored region features) is not probed."""
    if getattr(model, "needs_boxes", False) or not hasattr(model, "encode_image_features"):
        return
    was_training = model.training
    model.eval()
    try:
        model.encode_image_features({"image": torch.zeros(2, 3, *image_hw(cfg.data.image_size))})
    except (RuntimeError, ValueError) as err:
        detail = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"data.image_size={cfg.data.image_size}: too small for model {cfg.model['name']} ({detail})"
        ) from err
    except Exception:  # noqa: BLE001 - inputs this probe does not know (e.g. precomputed features): not judged
        pass
    finally:
        model.train(was_training)


def build_run_tokenizer(cfg: RunConfig, captions: Callable[[], list[str]]) -> CaptionTokenizer:
    """The model family's own tokenizer (open_clip models), else `data.tokenizer` (trained on `captions()`)."""
    own = create_tokenizer(cfg.model["name"], **{k: v for k, v in cfg.model.items() if k != "name"})
    if own is None:
        texts = captions() if cfg.data.tokenizer == "word" else []  # a named tokenizer reads no dataset
        return build_tokenizer(cfg.data.tokenizer, texts, cfg.data.min_word_freq, cfg.data.max_words)
    if cfg.data.tokenizer != "word":
        raise ConfigError(f"model {cfg.model['name']} brings its own tokenizer: leave data.tokenizer unset")
    return own


def resolve_preprocess(cfg: RunConfig, model: nn.Module) -> RunConfig:
    """A copy of `cfg` whose empty preprocessing fields (data.image_mean/std/resize/interpolation/background)
    take the model's own `preprocess` (else DEFAULT_PREPROCESS: ImageNet mean/std, squash, bilinear); a `size`
    in it replaces data.image_size (when the architecture fixes it)."""
    pp = {**DEFAULT_PREPROCESS, **(getattr(model, "preprocess", None) or {})}
    d = cfg.data
    data = dataclasses.replace(
        d,
        image_size=pp.get("size", d.image_size),
        image_mean=d.image_mean or list(pp["mean"]),
        image_std=d.image_std or list(pp["std"]),
        resize=d.resize or pp["resize"],
        interpolation=d.interpolation or pp["interpolation"],
        background=d.background or list(pp["background"]),
    )
    return dataclasses.replace(cfg, data=data)


def build_untrained_run(
    name: str, data_root: str, overrides: list[str] | None = None
) -> tuple[nn.Module, RunConfig, CaptionTokenizer]:
    """Model (eval mode, CPU), config and tokenizer of a registered model built from its config alone (no
    checkpoint): the zero-shot path, e.g. a pretrained open_clip model evaluated before any training."""
    cfg = load_config(None, [f"model.name={name}", f"data.root={data_root}", *(overrides or [])])
    tokenizer = build_run_tokenizer(cfg, lambda: open_split(cfg, cfg.data.train_split).captions)
    model, cfg = build_model(cfg, tokenizer)
    cfg = dataclasses.replace(cfg, model=resolved_model_section(name, model))
    return model.eval(), resolve_preprocess(cfg, model), tokenizer


def resolved_model_section(name: str, model: nn.Module) -> dict:
    """`model` config section with every field of the built model's config, so a checkpoint rebuilds the
    same architecture even if the registered defaults change later."""
    if not dataclasses.is_dataclass(getattr(model, "config", None)):
        return {"name": name}
    fields = dataclasses.asdict(model.config)
    return {"name": name, **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint path as given, for a run folder its `checkpoints/best.pt`, a save_pretrained folder itself."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "best.pt", path / "best.pt"):
            if candidate.is_file():
                return candidate
        if is_pretrained_dir(path):
            return path
        raise CheckpointError(
            f"{path} is a folder without checkpoints/best.pt (not a finished crossmatch run) and without "
            "model.safetensors + config.json (not a save_pretrained folder)"
        )
    return path


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


def needs_boxes(model: nn.Module) -> int:
    return MAX_BOXES if getattr(model, "needs_boxes", False) else 0


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


def run_folder_of(checkpoint: Path) -> Path:
    """The run folder of a checkpoint file: the parent of its `checkpoints/` folder, else its own folder."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def data_root_candidates(stored: str, run_dir: Path, from_run: str | None = None) -> list[Path]:
    """Where a run's dataset may be, in order: the stored data.root as given (relative to the current
    folder), the dataset's path relative to the run folder recorded at training time (`from_run`), the stored
    path below the run folder."""
    candidates = [Path(stored)]
    if from_run:
        candidates.append(Path(os.path.normpath(run_dir / from_run)))
    if not Path(stored).is_absolute():
        candidates.append(run_dir / stored)
    return list(dict.fromkeys(candidates))


def locate_data_root(cfg: RunConfig, run_dir: Path, from_run: str | None, required: bool) -> RunConfig:
    """`cfg` with data.root set to the first of `data_root_candidates` that exists (a run folder moved or copied
    elsewhere still finds its dataset), and a relative data.image_dir inside the stored root moved with it. A
    shard pattern is left as it is.

    Raises:
        DataError: with `required`, when no candidate exists: one line listing the paths tried and naming the
            data.root= override.
    """
    stored = cfg.data.root
    if any(c in stored for c in "{*?["):  # a webdataset brace or glob pattern: not a path to test
        return cfg
    candidates = data_root_candidates(stored, run_dir, from_run)
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        if required:
            tried = ", ".join(str(c) for c in candidates)
            raise DataError(f"dataset of run {run_dir} not found (tried {tried}); pass data.root=PATH")
        return cfg
    image_dir = cfg.data.image_dir
    if image_dir and not Path(image_dir).is_absolute() and Path(image_dir).is_relative_to(stored):
        image_dir = str(found / Path(image_dir).relative_to(stored))  # e.g. data/coco/images -> <found>/images
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(found), image_dir=image_dir))


def load_run(
    path: str | Path, overrides: list[str] | None = None, need_data: bool = False
) -> tuple[nn.Module, RunConfig, CaptionTokenizer]:
    """Model (eval mode, CPU), config and tokenizer from a .pt checkpoint or a .safetensors export;
    `overrides` (key=value) apply on top of the stored config, e.g. a different data.root. Without a data.root
    override, the dataset is looked for where `locate_data_root` says; with `need_data`, not finding it is an
    error (evaluate, search), else the stored path stays (export, load)."""
    path = resolve_checkpoint(path)
    ckpt = read_weights(path)
    for key in ("config", "tokenizer"):
        if key not in ckpt:
            raise CheckpointError(f"{path} has no '{key}' entry (not written by crossmatch train)")
    cfg = apply_overrides(config_from_dict(ckpt["config"]), overrides or [])
    if not any(o.startswith("data.root=") for o in overrides or []):
        cfg = locate_data_root(cfg, run_folder_of(path), ckpt.get(DATA_FROM_RUN), need_data)
    try:
        tokenizer = CaptionTokenizer.from_str(ckpt["tokenizer"], cfg.data.max_words)
    except DataError as err:
        raise CheckpointError(f"{path}: {err}") from err
    model, cfg = build_model(cfg, tokenizer, load_weights=False)
    # 0.1.0 kept the contrastive objective's learned scale (and SigLIP bias) in the `loss` entry only
    learned = {k: v for k, v in (ckpt.get("loss") or {}).items() if k in ("logit_scale", "logit_bias")}
    try:
        model.load_state_dict({**learned, **ckpt["model"]} if "logit_scale" in model.state_dict() else ckpt["model"])
    except RuntimeError as err:
        lines = str(err).splitlines()
        detail = lines[1].strip() if len(lines) > 1 else str(err)
        raise CheckpointError(f"{path}: weights do not fit model {cfg.model['name']}: {detail}") from err
    model.card_metrics = best_validation_row(ckpt.get("trainer") or {}, cfg.data.val_split)  # save_pretrained's card
    return model.eval(), cfg, tokenizer


def best_validation_row(trainer: dict, split: str) -> dict[str, float] | None:
    """The validation metrics of a checkpoint's best epoch (its `trainer` entry), or None when unknown."""
    rows = [h for h in trainer.get("history", []) if h.get("epoch") == trainer.get("best_epoch")]
    if not rows:
        return None
    metrics = {k: v for k, v in rows[-1].items() if k != "epoch" and not k.endswith("_loss")}
    return {f"{split} {k} (epoch {trainer['best_epoch']})": v for k, v in metrics.items()}


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
    evaluator = Evaluator(build_eval_data(cfg, ds, tokenizer, model), cfg.eval, device, pids, stage1, progress)
    evaluator.protocol = "person-search" if pids is not None else "retrieval"  # what it reports, for eval.metric
    evaluator.metric_names = selectable_metrics(person_search=pids is not None, twins=bool(ds.twins))
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
    return bool(cfg.eval.first_stage) and not (cfg.eval.rerank_k > 0 and hasattr(model, "score_pairs"))


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
    if cfg.model.get("cache_frozen") and hasattr(model, "use_cache_dir"):  # frozen outputs: once, on disk
        folder = run_dir / "frozen_cache" / (f"rank{dist.rank}" if dist.world_size > 1 else "")
        model.use_cache_dir(folder, cache_images=not cfg.data.augment)
    if cfg.train.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ConfigError(f"train.grad_checkpointing: model {cfg.model['name']} has no tower that supports it")
        model.set_grad_checkpointing(True)
    if dist.distributed and dist.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics over the global batch
    task = build_task(model, cfg.loss, rank=dist.rank, world_size=dist.world_size).to(dist.device)
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
    progress = dist.is_main and sys.stderr.isatty()
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
    return Trainer(task, optimizer, scheduler, loaders, evaluator, sinks, TrainerConfig.from_run(cfg), dist), cfg


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


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts, as 'key: old -> new'. A key the new
    config leaves unset (None, [] or "": resolved when the model is built, e.g. data.image_mean from the model,
    model.vocab_size from the tokenizer) is no change: the checkpoint stores its resolved value."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b and b not in (None, [], ""):
            out.append(f"{prefix}{k}: {a} -> {b}")
    return out


# What --overwrite removes.
RUN_FILES = ("checkpoints", "tb", "wandb", "metrics.jsonl", "train.log", "config.yaml", "tokenizer.json", "curves.png")


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a `--run-dir` that is a file, or a folder that holds another run's checkpoints unless told what
    to do with them: `resume` continues that run, `overwrite` replaces it (see SetAside). Reads only."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir} is a file, not a folder; choose another --run-dir")
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()) and not (resume or overwrite):
        raise ConfigError(
            f"{run_dir} already holds a run's checkpoints: add --resume to continue it, --overwrite to start "
            "it again, or choose another --run-dir"
        )


def log_run_header(trainer: Trainer, cfg: RunConfig, dist: DistInfo, run_dir: Path) -> None:
    """What a run is about to do: device, threads, parameters, data, preprocessing, schedule."""
    params = list(trainer.task.parameters())
    total, trainable = sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
    log.info("device %s (world size %d), %d CPU threads", dist.device, dist.world_size, torch.get_num_threads())
    log.info("model %s: %s parameters, %s trainable", cfg.model["name"], f"{total:,}", f"{trainable:,}")
    sizes = []
    for name in dict.fromkeys((cfg.data.train_split, cfg.data.val_split, cfg.data.test_split)):
        try:
            ds = open_split(cfg, name)
            sizes.append(f"{name} {len(ds.images)} images / {len(ds.captions)} captions")
        except DataError:
            sizes.append(f"{name} -")
    log.info("data %s (%s): %s", cfg.data.root, cfg.data.format, ", ".join(sizes))
    log.info("preprocessing: %s", describe_transform(cfg.data))
    log.info(
        "training %s: %d epochs x %d steps of %d pairs, run dir %s",
        cfg.model["name"],
        cfg.train.epochs,
        trainer.steps_per_epoch,
        cfg.train.batch_size * dist.world_size * trainer.micro_batches,
        run_dir,
    )


def train(
    cfg: RunConfig, run_dir: str | Path, resume: bool = False, init_from: str | None = None, overwrite: bool = False
) -> TrainState:
    """Train `cfg` in `run_dir`; with `resume`, continue from the newest readable checkpoint there, with
    `overwrite`, replace the run that is there. `init_from` (fine-tuning) loads the weights of another run
    whose names and shapes match.

    Lifecycle: data, model, task, optimizer, evaluator and resume state are built and every setting checked
    before the run folder is touched; a start that fails leaves it as it was (no new folder, no rewritten
    config.yaml). `overwrite` sets the old run aside and deletes it only once the new run has written its
    first checkpoint; a new run that fails before that gets the old one back."""
    validate_config(cfg)
    run_dir = Path(run_dir)
    check_run_dir(run_dir, resume, overwrite)
    dist = init_distributed(cfg.train.device)
    created = not run_dir.exists()
    lock = RunLock(run_dir).acquire() if dist.is_main else None  # one trainer per run dir
    aside = SetAside(run_dir, RUN_FILES)
    try:
        if dist.is_main:
            aside.recover()  # a folder left by a killed --overwrite
        check_run_dir(run_dir, resume, overwrite)
        try:
            trainer, cfg, latest = _build(cfg, run_dir, dist, resume, init_from)  # writes nothing in run_dir
            if overwrite and dist.is_main and (run_dir / "checkpoints").is_dir():
                aside.move()
                trainer.sinks.checkpointer.on_first_save = aside.discard
            _open_run(trainer, cfg, run_dir, dist, latest)
        except BaseException:
            _undo_start(run_dir, aside, created and dist.is_main)
            raise
        try:
            return trainer.fit()
        except BaseException:
            if trainer.sinks.checkpointer.on_first_save is not None:  # no checkpoint yet: the old run comes back
                trainer.close()
                _undo_start(run_dir, aside, False)
            raise
        finally:
            trainer.close()
    finally:
        close_run_log(run_dir)
        if lock is not None:
            lock.release()


def _undo_start(run_dir: Path, aside: SetAside, remove: bool) -> None:
    """After a failed start: release train.log, put a run set aside back, remove a folder this start made."""
    close_run_log(run_dir)
    aside.restore()
    if remove:
        shutil.rmtree(run_dir, ignore_errors=True)


def _build(
    cfg: RunConfig, run_dir: Path, dist: DistInfo, resume: bool, init_from: str | None
) -> tuple[Trainer, RunConfig, tuple[dict, Path] | None]:
    """The Trainer with its resumed or initial weights, its resolved config and the checkpoint it resumed
    from: everything that can refuse a start, with nothing written in `run_dir`."""
    hold_run_log(dist.is_main)  # console now, train.log (these lines first) once the start is accepted
    latest = _resume_point(cfg, run_dir) if resume else None
    init_weights = read_weights(init_from)["model"] if init_from and latest is None else None  # fail early
    tokenizer = None
    if latest is not None:
        try:
            tokenizer = CaptionTokenizer.from_str(latest[0]["tokenizer"], cfg.data.max_words)
        except (KeyError, DataError) as err:
            raise CheckpointError(f"cannot resume from {latest[1]}: {err}") from err
    trainer, cfg = build_trainer(cfg, run_dir, dist, tokenizer)
    if init_weights is not None:
        report = partial_load(trainer.model, init_weights)
        log.info("initialised %d tensors from %s", len(report["loaded"]), init_from)
        for kind in ("missing", "mismatched", "unexpected"):
            if report[kind]:
                n, names = len(report[kind]), ", ".join(report[kind])
                log.warning("--init-from %s: %d %s tensor(s) not loaded: %s", init_from, n, kind, names)
    if latest is not None:
        _load_resume_state(trainer, *latest)
    return trainer, cfg, latest


def _open_run(trainer: Trainer, cfg: RunConfig, run_dir: Path, dist: DistInfo, latest: tuple | None) -> None:
    """The accepted start: train.log, config.yaml and tokenizer.json, best files repaired, the run header."""
    setup_logging(run_dir, dist.is_main)
    if dist.is_main:
        for orphan in remove_orphans(run_dir / "checkpoints") + remove_orphans(run_dir):
            log.info("removed %s, left by an interrupted run", orphan)
        save_config(cfg, run_dir / "config.yaml")
        CaptionTokenizer.from_str(trainer.sinks.extra_state["tokenizer"]).save(run_dir / "tokenizer.json")
    if latest is not None:
        ckpt, path = latest
        trainer.sinks.checkpointer.repair_best(ckpt)
        log.info("resumed from %s at epoch %d, step %d", path, trainer.state.epoch + 1, trainer.state.step_in_epoch)
    log_run_header(trainer, cfg, dist, run_dir)
    pairs, steps = getattr(trainer.train_loader, "dataset", None), cfg.train.max_steps_per_epoch
    if isinstance(pairs, PairView) and (steps <= 0 or steps >= len(trainer.train_loader)):  # epochs see every image
        cache_train_images(trainer.model, pairs, cfg.train.batch_size, cfg.data.num_workers)  # the weights are final


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


def _load_resume_state(trainer: Trainer, ckpt: dict, path: Path) -> None:
    """Restore the trainer from `ckpt` (best.pt / best.safetensors are repaired once the start is accepted)."""
    try:
        trainer.load_state_dict(ckpt)
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        lines = str(err).strip().splitlines() or [type(err).__name__]
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise CheckpointError(f"cannot resume from {path}: it does not fit this run ({detail[:160]})") from err
