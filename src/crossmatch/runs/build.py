"""A model from a config or a checkpoint: the registered model with the config's overrides, its tokenizer and
image preprocessing, the zero-shot run of a model built from its config alone, and the model, config and
tokenizer of a checkpoint, safetensors export or run folder (`load_run`, behind `crossmatch.load`), with the
run's dataset found where the run folder moved."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from crossmatch.config import (
    RunConfig,
    apply_overrides,
    config_from_dict,
    image_hw,
    load_config,
    move_legacy_loss_keys,
)
from crossmatch.data import formats
from crossmatch.data.tokenizer import CaptionTokenizer, build_tokenizer
from crossmatch.data.transforms import DEFAULT_PREPROCESS
from crossmatch.engine.checkpoint import is_pretrained_dir, read_weights
from crossmatch.errors import CheckpointError, ConfigError, DataError
from crossmatch.models.protocols import FeatureEncoder, config_of, preprocess_of, takes_boxes
from crossmatch.models.registry import UnknownModelKeysError, create_model, create_tokenizer

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
    if takes_boxes(model) or not isinstance(model, FeatureEncoder):
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
    pp = {**DEFAULT_PREPROCESS, **preprocess_of(model)}
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
    config = config_of(model)
    if not dataclasses.is_dataclass(config):
        return {"name": name}
    fields = dataclasses.asdict(config)
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


def needs_boxes(model: nn.Module) -> int:
    """Object boxes to read per image for `model` (0: it reads pixels only)."""
    return MAX_BOXES if takes_boxes(model) else 0


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
