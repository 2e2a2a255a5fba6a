"""Run configuration: a typed tree of dataclasses loaded from YAML plus dotted `key=value` overrides.

`RunConfig` is the whole schema. Every section except `model` is typed, so an unknown key such as
`train.lrr=1` is an error that names the key. `model` is a free dict whose `name` picks a registered
model and whose other keys override that model's config dataclass; `create_model` rejects unknown ones.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from crossmatch.errors import ConfigError
from crossmatch.files import write_text


@dataclass
class DataConfig:
    root: str = "data/shapes"  # dataset folder (dataset.json + images/, {split}_ims.npy, *.tar) or a shard pattern
    format: str = "karpathy"  # see crossmatch.data.formats (karpathy, jsonl, csv, folder, webdataset, ...)
    json_name: str = ""  # karpathy: the JSON file in root (default dataset.json; dataset_coco.json for COCO)
    image_dir: str = ""  # karpathy: image folder (default {root}/images)
    restval: bool = False  # karpathy COCO: fold the "restval" split into train
    csv_img_key: str = "filepath"  # csv: the column of image paths (relative to root), as open_clip's --csv-img-key
    csv_caption_key: str = "title"  # csv: the column of captions, as open_clip's --csv-caption-key
    csv_separator: str = "\t"  # csv: the column separator (one character; "\\t" typed in a shell is a tab too)
    split_file: str = ""  # folder: JSON {relative image path: split}; "": split by a hash of the path, 90/5/5
    image_size: Any = 64  # int: the square side the images are resized to; [H, W]: non-square (e.g. [384, 128])
    train_split: str = "train"  # split names as written in the dataset file
    val_split: str = "val"  # the split validated during training
    test_split: str = "test"  # the split `crossmatch evaluate --split test` reads
    augment: bool = True  # random resized crop + flip (flip is off: captions name left and right)
    tokenizer: str = "word"  # word: train a word-level vocabulary; else a tokenizer.json (or its folder)
    min_word_freq: int = 1  # words seen fewer times in train captions map to [UNK]
    max_words: int = 32  # captions are cut to this many tokens
    num_workers: int = 0  # DataLoader workers; 0 keeps everything in the main process
    max_bad_samples: int = 0  # unreadable images skipped per epoch before the run fails
    max_image_pixels: int = 89_478_485  # larger images are unreadable (decompression bombs); Pillow's default
    max_annotation_bytes: int = 1 << 30  # a dataset file read whole (a JSONL line) may hold at most this many bytes
    max_shard_member_bytes: int = 256 << 20  # webdataset: the most one tar member may inflate to (gzip bombs)
    allow_outside_root: bool = False  # accept image paths that leave the image folder (../x.png, /abs/x.png)
    shuffle_buffer: int = 1000  # webdataset: pairs held in each loader worker's shuffle buffer
    allow_pipe: bool = False  # webdataset: accept `pipe:` shard commands (they run in a shell) in data.root
    hard_batches: bool = False  # train batches of confusable pairs, images that share objects (data/hard_batches.py)
    # Image preprocessing. Empty values take the model's own (open_clip models declare theirs), else the
    # defaults (ImageNet mean/std, squash resize, bilinear). A run stores the resolved values.
    image_mean: list[float] = field(default_factory=list)  # per-channel mean, RGB
    image_std: list[float] = field(default_factory=list)  # per-channel std, RGB
    resize: str = ""  # squash (stretch to a square) | shortest (shorter side, then centre crop) | letterbox (pad)
    interpolation: str = ""  # bilinear | bicubic
    background: list[int] = field(default_factory=list)  # RGB 0-255 behind transparent pixels and letterbox bars

    def splits_to_read(self, split: str) -> list[str]:
        """The split names a reader takes for `split`: COCO's "restval" joins train when `restval` is set."""
        return [split, "restval"] if (self.restval and split == self.train_split) else [split]


@dataclass
class AlbefLossConfig:
    """ALBEF's objective (crossmatch.tasks.albef); the momentum encoders and MLM head are model.* keys."""

    itc_weight: float = 1.0  # weight of itc_loss
    itm_weight: float = 1.0  # weight of itm_loss
    mlm_weight: float = 1.0  # weight of mlm_loss (when model.mlm built the MLM head)
    mlm_prob: float = 0.15  # fraction of real words masked (BERT's 80/10/10 replacement)
    alpha: float = 0.4  # momentum distillation weight, ramped linearly from 0 over the first epoch


@dataclass
class ViltLossConfig:
    """ViLT's objective (crossmatch.tasks.vilt)."""

    n_negatives: int = 15  # negative captions per positive for the ranking loss (at most B - 1)
    negatives: str = "random"  # random (ViLT) | hard: drawn by softmax of the cheap head's ITC logits (ALBEF's draw)
    rank_weight: float = 1.0  # weight of rank_loss
    itm_weight: float = 1.0  # weight of itm_loss
    itc_weight: float = 1.0  # weight of itc_loss (the cheap first-stage head)


@dataclass
class IdentityLossConfig:
    """Person search with part models (crossmatch.tasks.identity)."""

    name: str = "sdm"  # sdm (IRRA) | cmpm (TIPCB)
    temperature: float = 0.02  # SDM temperature tau (IRRA's value)


@dataclass
class LossConfig:
    """The training objective. Dual encoders train with `name` (hinge, the default, with margin / max_violation
    / warmup_epochs, as SCAN does; or a contrastive loss); the other families read their own section
    (`loss.albef`, `loss.vilt`, `loss.identity`)."""

    name: str = "hinge"  # dual encoders: hinge (VSE++) | infonce (CLIP) | siglip (SigLIP); others have their own
    local: bool = False  # infonce/siglip under DDP: this rank's rows against all columns (open_clip --local-loss)
    init_logit_scale: float | None = None  # log of the initial scale; default CLIP log(1/0.07), SigLIP log(10)
    init_logit_bias: float | None = None  # SigLIP's initial bias; default -10
    max_logit_scale: float = 100.0  # the learned scale exp(logit_scale) is clamped to at most this (CLIP)
    margin: float = 0.2  # hinge margin (VSE++, SCAN)
    max_violation: bool = True  # hardest negative in the batch instead of the sum over negatives
    warmup_epochs: int = 0  # epochs with the sum of violations before switching to hardest negatives
    # K perturbed captions per pair as extra negatives (hinge: image -> negative caption; ITC: extra i2t
    # columns; ALBEF/ViLT: ITM pairs labelled 0), from the dataset's exact negatives or the rule-based
    # perturber (crossmatch.data.negatives); 0: off
    text_negatives: int = 0
    # hinge with max_violation: the K text negatives join each image's hardest-caption max (joint), or the
    # hardest of them is a hinge term of its own, beside the in-batch hardest (separate; losses/triplet.py)
    text_negative_term: str = "joint"
    # dual-encoder hinge: weight of a second term with the caption as the anchor, its image the positive and
    # its hardest text negative the negative (cosine of the two captions' embeddings; losses/triplet.py); 0: off
    caption_anchor_weight: float = 0.0
    albef: AlbefLossConfig = field(default_factory=AlbefLossConfig)
    vilt: ViltLossConfig = field(default_factory=ViltLossConfig)
    identity: IdentityLossConfig = field(default_factory=IdentityLossConfig)


# Loss settings that 0.1.0 kept in the model section, by model config class: old key -> (loss section, key).
# Configs and checkpoints written then still load: `move_legacy_loss_keys` moves them (with a warning).
LEGACY_LOSS_KEYS: dict[str, tuple[str, dict[str, str]]] = {
    "AlbefConfig": ("albef", {k: k for k in ("itc_weight", "itm_weight", "mlm_weight", "mlm_prob", "alpha")}),
    "ViltConfig": ("vilt", {k: k for k in ("n_negatives", "rank_weight", "itm_weight", "itc_weight")}),
    "TipcbConfig": ("identity", {"loss": "name", "temperature": "temperature"}),
}


@dataclass
class TrainConfig:
    epochs: int = 10  # passes over the train split
    batch_size: int = 128  # pairs per micro-batch on each rank; a step sees this x accum_steps x world size
    lr: float = 2e-4  # peak learning rate of the new (not pretrained) parameters
    optimizer: str = "adam"  # adam | adamw | sgd
    weight_decay: float = 0.0  # decoupled for adamw; never on 1-D parameters (biases, norms) or temperatures
    scheduler: str = "step"  # step | cosine | constant
    lr_step_epochs: int = 15  # step scheduler: multiply the lr by lr_gamma every this many epochs
    lr_gamma: float = 0.1  # step scheduler: the lr factor at each step
    warmup_steps: int = 0  # linear lr warm-up from 0, in optimizer steps
    grad_clip: float = 2.0  # max gradient norm; 0 disables clipping
    seed: int = 0  # seeds the weights, the batch order and every augmentation (resume replays them)
    max_steps_per_epoch: int = 0  # 0 = the whole epoch; >0 cuts epochs short (smoke tests, demos)
    log_every: int = 20  # steps between scalar logs
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a GradScaler)
    accum_steps: int = 1  # micro-batches per optimizer step; exact big-batch gradient for in-batch-negative tasks
    compile: bool = False  # torch.compile the training step
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
    grad_checkpointing: bool = False  # activation checkpointing in the towers that support it (clip)
    layer_decay: float = 1.0  # layer-wise lr decay: block k of n gets lr * layer_decay ** (n - k) (the towers)
    tower_lr: float = 0.0  # lr of pretrained towers (vse_pretrained, clip, *_minilm) before layer_decay; 0 = train.lr
    # where scalars go: tensorboard (tb/), jsonl (metrics.jsonl, which curves.png is drawn from), wandb (optional)
    loggers: list[str] = field(default_factory=lambda: ["tensorboard", "jsonl"])


@dataclass
class EvalConfig:
    batch_size: int = 256  # encoding batch size
    chunk_size: int = 512  # rows (images) per block of the all-pairs score matrix
    every_epochs: int = 1  # validate every this many epochs
    max_images: int = 0  # validation during training on the split's first N images and their captions (0: all)
    loss_batches: int = 10  # batches of val pairs on which validation also computes the training loss (0: off)
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
    keep_last: int = 0  # full-state per-epoch checkpoints (epoch_XXXX.pt) kept besides last.pt and best.pt
    safetensors: bool = False  # also write best.safetensors and last.safetensors (weights, config, tokenizer)
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
            layer = OmegaConf.load(path)
        except Exception as err:  # yaml errors come in many types
            raise ConfigError(f"cannot parse config {path}: {_one_line(err)}") from err
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"config {path} must be a mapping of sections (data:, model:, train:, ...), not a list")
        layers.append(layer)
    return _merge(layers, overrides)


def apply_overrides(cfg: RunConfig, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """A copy of `cfg` with `key=value` overrides applied (validated like load_config)."""
    return _merge([OmegaConf.structured(cfg)], overrides)


def _override_layer(item: str) -> DictConfig:
    """One `key=value` override as a config layer. Values are read as YAML (`[a,b]`, `true`, `1e-4`); a value
    YAML cannot read, such as `data.csv_separator=,`, is taken as the text itself."""
    try:
        return OmegaConf.from_dotlist([item])
    except yaml.YAMLError:
        key, value = item.split("=", 1)
        layer = OmegaConf.create()
        OmegaConf.update(layer, key, value, force_add=True)
        return layer


def _merge(layers: list, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        layers = [*layers, *(_override_layer(item) for item in overrides)]
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), *layers)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"bad config key {key!r}: {_one_line(err)}" if key else _one_line(err)) from err
    cfg = OmegaConf.to_object(merged)
    if "name" not in cfg.model:
        raise ConfigError("config has no model.name")
    return cfg


# Metrics that may select best.pt (higher is better), by evaluation protocol: the keys that
# `evaluate_retrieval` and `evaluate_person_search` report (a test keeps these lists true).
RETRIEVAL_METRICS = ("rsum", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
TWIN_METRICS = ("twin_acc",)  # only on splits with twin scenes (the shapes data)
PERSON_METRICS = ("t2i_r1", "t2i_r5", "t2i_r10", "t2i_mAP", "t2i_mINP")
LOWER_IS_BETTER = ("i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr")
# An Adam step is at most lr / (1 - beta1) = 10 lr; from lr = 3.4e37 on it is not a float32 number and the
# optimiser itself fails. Far below that the weights blow up, and the non-finite loss guard stops the run.
MAX_LR = 3.4e38 / 10
EVAL_PRECISIONS = ("fp32", "same", "bf16", "fp16")
VILT_NEGATIVES = ("random", "hard")  # loss.vilt.negatives
LOGGERS = ("tensorboard", "jsonl", "wandb")  # train.loggers (crossmatch.engine.logging)
TEXT_NEGATIVE_TERMS = ("joint", "separate")  # loss.text_negative_term (losses/triplet.py)


def selectable_metrics(person_search: bool, twins: bool) -> tuple[str, ...]:
    """The metrics that may select best.pt under one evaluation protocol."""
    return PERSON_METRICS if person_search else RETRIEVAL_METRICS + TWIN_METRICS * twins


def check_metric(metric: str, reported: tuple[str, ...] | list[str], protocol: str) -> None:
    """`eval.metric` must be one of the higher-is-better metrics that the evaluation protocol reports."""
    if metric not in reported:
        why = "lower is better" if metric in LOWER_IS_BETTER else f"not reported by {protocol} evaluation"
        raise ConfigError(f"eval.metric={metric!r} cannot select best.pt ({why}); choose one of {', '.join(reported)}")


def image_hw(size: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    """(H, W) of a `data.image_size`: a side S is (S, S), a pair [H, W] is itself.

    Raises:
        ConfigError: neither a positive int nor two positive ints.
    """
    if not _is_size(size):
        raise ConfigError(f"data.image_size={size!r}: must be a side >= 1 or [H, W], each >= 1")
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _is_size(value) -> bool:
    def side(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    return side(value) or (isinstance(value, (list, tuple)) and len(value) == 2 and all(side(v) for v in value))


def _is_colour(value) -> bool:
    """[] (the model's colour, else white) or three integers 0-255."""
    if not isinstance(value, list):
        return False
    ints = all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value)
    return not value or (len(value) == 3 and ints)


def validate_config(cfg: RunConfig, training: bool = True) -> RunConfig:
    """Check the whole resolved config before any work: sizes, counts, names, the learning rate and the
    metric name, so that a bad value fails in one line at once rather than after an epoch.

    Names that have a home elsewhere are checked there, also before any work: the model and its keys
    (create_model), train.optimizer, train.scheduler, train.precision (the builders), data.format.

    Args:
        training: also check the `train` and `checkpoint` sections (evaluation reads data, model, eval).
    Raises:
        ConfigError: naming the first bad key and its value.
    """
    d, t, e = cfg.data, cfg.train, cfg.eval
    rules = [
        ("data.image_size", d.image_size, _is_size(d.image_size), "must be a side >= 1 or [H, W], each >= 1"),
        ("data.max_words", d.max_words, d.max_words >= 1, "must be at least 1"),
        ("data.min_word_freq", d.min_word_freq, d.min_word_freq >= 0, "must be >= 0"),
        ("data.num_workers", d.num_workers, d.num_workers >= 0, "must be >= 0 (0: load in the main process)"),
        ("data.max_bad_samples", d.max_bad_samples, d.max_bad_samples >= 0, "must be >= 0"),
        ("data.max_image_pixels", d.max_image_pixels, d.max_image_pixels >= 1, "must be at least 1"),
        ("data.max_annotation_bytes", d.max_annotation_bytes, d.max_annotation_bytes >= 1, "must be at least 1"),
        ("data.max_shard_member_bytes", d.max_shard_member_bytes, d.max_shard_member_bytes >= 1, "must be at least 1"),
        ("data.background", d.background, _is_colour(d.background), "must be [] or [R, G, B], each 0-255"),
        ("eval.batch_size", e.batch_size, e.batch_size >= 1, "must be at least 1"),
        ("eval.chunk_size", e.chunk_size, e.chunk_size >= 1, "must be at least 1"),
        ("eval.every_epochs", e.every_epochs, e.every_epochs >= 1, "must be at least 1"),
        ("eval.max_images", e.max_images, e.max_images >= 0, "must be >= 0 (0: the whole split)"),
        ("eval.folds", e.folds, e.folds >= 1, "must be at least 1"),
        ("eval.rerank_k", e.rerank_k, e.rerank_k >= 0, "must be >= 0 (0: no re-ranking)"),
        ("eval.rerank_batch", e.rerank_batch, e.rerank_batch >= 1, "must be at least 1"),
        ("eval.precision", e.precision, e.precision in EVAL_PRECISIONS, f"choose {', '.join(EVAL_PRECISIONS)}"),
    ]
    if training:
        vilt_neg = cfg.loss.vilt.negatives
        rules += [
            ("train.epochs", t.epochs, t.epochs >= 1, "must be at least 1"),
            ("train.batch_size", t.batch_size, t.batch_size >= 1, "must be at least 1"),
            ("train.lr", t.lr, math.isfinite(t.lr) and 0 < t.lr <= MAX_LR, f"must be > 0 and at most {MAX_LR:.1e}"),
            ("train.weight_decay", t.weight_decay, t.weight_decay >= 0, "must be >= 0"),
            ("train.tower_lr", t.tower_lr, math.isfinite(t.tower_lr) and 0 <= t.tower_lr <= MAX_LR, "must be >= 0"),
            ("train.lr_step_epochs", t.lr_step_epochs, t.lr_step_epochs >= 1, "must be at least 1"),
            ("train.lr_gamma", t.lr_gamma, math.isfinite(t.lr_gamma) and t.lr_gamma > 0, "must be > 0"),
            ("train.warmup_steps", t.warmup_steps, t.warmup_steps >= 0, "must be >= 0"),
            ("train.grad_clip", t.grad_clip, math.isfinite(t.grad_clip) and t.grad_clip >= 0, "must be >= 0"),
            ("train.max_steps_per_epoch", t.max_steps_per_epoch, t.max_steps_per_epoch >= 0, "must be >= 0"),
            ("train.log_every", t.log_every, t.log_every >= 1, "must be at least 1"),
            ("train.accum_steps", t.accum_steps, t.accum_steps >= 1, "must be at least 1"),
            ("loss.margin", cfg.loss.margin, math.isfinite(cfg.loss.margin), "must be a finite number"),
            ("loss.warmup_epochs", cfg.loss.warmup_epochs, cfg.loss.warmup_epochs >= 0, "must be >= 0"),
            ("loss.text_negatives", cfg.loss.text_negatives, cfg.loss.text_negatives >= 0, "must be >= 0"),
            (
                "loss.text_negative_term",
                cfg.loss.text_negative_term,
                cfg.loss.text_negative_term in TEXT_NEGATIVE_TERMS,
                f"must be {' or '.join(TEXT_NEGATIVE_TERMS)}",
            ),
            (
                "loss.caption_anchor_weight",
                cfg.loss.caption_anchor_weight,
                math.isfinite(cfg.loss.caption_anchor_weight) and cfg.loss.caption_anchor_weight >= 0,
                "must be >= 0",
            ),
            ("loss.vilt.negatives", vilt_neg, vilt_neg in VILT_NEGATIVES, f"choose {' or '.join(VILT_NEGATIVES)}"),
            ("checkpoint.keep_last", cfg.checkpoint.keep_last, cfg.checkpoint.keep_last >= 0, "must be >= 0"),
            (
                "train.loggers",
                t.loggers,
                all(name in LOGGERS for name in t.loggers),
                f"each must be one of {', '.join(LOGGERS)}",
            ),
            ("checkpoint.every_steps", cfg.checkpoint.every_steps, cfg.checkpoint.every_steps >= 0, "must be >= 0"),
        ]
    for key, value, ok, what in rules:
        if not ok:
            raise ConfigError(f"{key}={value!r}: {what}")
    if not isinstance(cfg.model.get("name"), str):
        raise ConfigError(f"model.name={cfg.model.get('name')!r}: must be the name of a registered model")
    check_metric(e.metric, sorted({*RETRIEVAL_METRICS, *TWIN_METRICS, *PERSON_METRICS}), "any")
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


def move_legacy_loss_keys(cfg: RunConfig, config_class: str, keys: list[str]) -> tuple[RunConfig, list[str]] | None:
    """A copy of `cfg` with 0.1.0's model-section loss keys of `config_class` moved into their loss section,
    and what was moved ('model.itm_weight -> loss.albef.itm_weight'); None unless every key is such a key."""
    section, table = LEGACY_LOSS_KEYS.get(config_class, ("", {}))
    if not keys or any(k not in table for k in keys):
        return None
    model = {k: v for k, v in cfg.model.items() if k not in keys}
    loss = dataclasses.replace(
        cfg.loss, **{section: dataclasses.replace(getattr(cfg.loss, section), **{table[k]: cfg.model[k] for k in keys})}
    )
    moved = [f"model.{k} -> loss.{section}.{table[k]}" for k in keys]
    return dataclasses.replace(cfg, model=model, loss=loss), moved


def save_config(cfg: RunConfig, path: str | Path) -> None:
    write_text(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
