"""Run configuration: a typed tree of dataclasses loaded from YAML plus dotted `key=value` overrides.

`RunConfig` is the whole schema. Every section except `model` is typed, so an unknown key such as
`train.lrr=1` is an error that names the key. `model` is a free dict whose `name` picks a registered
model and whose other keys override that model's config dataclass; `create_model` rejects unknown ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from crossmatch.errors import ConfigError


@dataclass
class DataConfig:
    root: str = "data/shapes"  # dataset folder (dataset.json + images/, {split}_ims.npy, *.tar) or a shard pattern
    format: str = "karpathy"  # see crossmatch.data.formats (karpathy, ...)
    json_name: str = ""  # karpathy: the JSON file in root (default dataset.json; dataset_coco.json for COCO)
    image_dir: str = ""  # karpathy: image folder (default {root}/images)
    restval: bool = False  # karpathy COCO: fold the "restval" split into train
    image_size: int = 64  # square side the image transform resizes to
    train_split: str = "train"  # split names as written in the dataset file
    val_split: str = "val"
    test_split: str = "test"
    augment: bool = True  # random resized crop + flip (flip is off: captions name left and right)
    tokenizer: str = "word"  # word: train a word-level vocabulary; else a tokenizer.json (or its folder)
    min_word_freq: int = 1  # words seen fewer times in train captions map to [UNK]
    max_words: int = 32  # captions are cut to this many tokens
    num_workers: int = 0  # DataLoader workers; 0 keeps everything in the main process
    max_bad_samples: int = 0  # unreadable images skipped per epoch before the run fails
    shuffle_buffer: int = 1000  # webdataset: pairs held in each loader worker's shuffle buffer


@dataclass
class LossConfig:
    margin: float = 0.2  # hinge margin (VSE++, SCAN)
    max_violation: bool = True  # hardest negative in the batch instead of the sum over negatives
    warmup_epochs: int = 0  # epochs with the sum of violations before switching to hardest negatives


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-4
    optimizer: str = "adam"  # adam | adamw | sgd
    weight_decay: float = 0.0
    scheduler: str = "step"  # step | cosine | constant
    lr_step_epochs: int = 15  # step scheduler: multiply the lr by lr_gamma every this many epochs
    lr_gamma: float = 0.1
    warmup_steps: int = 0  # linear lr warm-up from 0, in optimizer steps
    grad_clip: float = 2.0  # max gradient norm; 0 disables clipping
    seed: int = 0
    max_steps_per_epoch: int = 0  # 0 = the whole epoch; >0 cuts epochs short (smoke tests, demos)
    log_every: int = 20  # steps between scalar logs
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a GradScaler)
    accum_steps: int = 1  # micro-batches per optimizer step (each micro-batch has its own negatives)
    compile: bool = False  # torch.compile the training step


@dataclass
class EvalConfig:
    batch_size: int = 256  # encoding batch size
    chunk_size: int = 512  # rows (images) per block of the all-pairs score matrix
    every_epochs: int = 1  # validate every this many epochs
    metric: str = "rsum"  # key of the metrics dict that selects best.pt (higher is better)
    folds: int = 1  # mean over this many consecutive image folds (COCO 1K protocol: 5 folds of 1000)
    rerank_k: int = 0  # fusion models: re-score each query's top-k stage-1 candidates (0: stage 1 only)
    rerank_batch: int = 128  # pairs per score_pairs call when re-ranking
    first_stage: str = ""  # checkpoint of a dual encoder whose scores replace the model's own stage 1
    precision: str = "fp32"  # fp32 | same (the train.precision autocast) | bf16 | fp16

    def precision_for(self, train_precision: str) -> str:
        return train_precision if self.precision == "same" else self.precision


@dataclass
class CheckpointConfig:
    keep_last: int = 3  # per-epoch checkpoints kept besides last.pt and best.pt
    every_steps: int = 0  # also refresh last.pt every this many optimizer steps (0: only at epoch ends)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=lambda: {"name": "vse_cnn"})
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def _one_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Build a RunConfig from defaults, then the YAML file at `path`, then `key=value` overrides.

    Raises:
        ConfigError: the file is missing or not YAML, a key is unknown, or a value has the wrong type.
    """
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as err:  # yaml errors come in many types
            raise ConfigError(f"cannot parse config {path}: {_one_line(err)}") from err
    return _merge(layers, overrides)


def apply_overrides(cfg: RunConfig, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """A copy of `cfg` with `key=value` overrides applied (validated like load_config)."""
    return _merge([OmegaConf.structured(cfg)], overrides)


def _merge(layers: list, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        layers = [*layers, OmegaConf.from_dotlist(list(overrides))]
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), *layers)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"bad config key {key!r}: {_one_line(err)}" if key else _one_line(err)) from err
    cfg = OmegaConf.to_object(merged)
    if "name" not in cfg.model:
        raise ConfigError("config has no model.name")
    return cfg


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested dict (what checkpoints store)."""
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    """Inverse of config_to_dict, validating keys against the schema."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(d)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"stored config does not match this version: {_one_line(err)}") from err


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def as_omegaconf(cfg: RunConfig) -> DictConfig:
    return OmegaConf.structured(cfg)
