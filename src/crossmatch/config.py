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

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from crossmatch.errors import ConfigError
from crossmatch.fields import Check, check_fields, image_hw, ranged  # noqa: F401  (image_hw: importable from here too)
from crossmatch.files import write_text

# An Adam step is at most lr / (1 - beta1) = 10 lr; from lr = 3.4e37 on it is not a float32 number and the
# optimiser itself fails. Far below that the weights blow up, and the non-finite loss guard stops the run.
MAX_LR = 3.4e38 / 10
MAX_SEED = 2**32 - 1  # NumPy's seed range (np.random.seed)
EVAL_PRECISIONS = ("fp32", "same", "bf16", "fp16")
VILT_NEGATIVES = ("random", "hard")  # loss.vilt.negatives
TEXT_NEGATIVE_TERMS = ("joint", "separate")  # loss.text_negative_term (losses/triplet.py)
LOGGERS = ("tensorboard", "jsonl", "wandb")  # train.loggers (crossmatch.engine.logging)
LOGGERS_CHECK = Check(
    lambda v: isinstance(v, list) and all(name in LOGGERS for name in v), f"each must be one of {', '.join(LOGGERS)}"
)


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
    # int: the square side the images are resized to; [H, W]: non-square (e.g. [384, 128])
    image_size: Any = ranged(64, check="size")
    train_split: str = "train"  # split names as written in the dataset file
    val_split: str = "val"  # the split validated during training
    test_split: str = "test"  # the split `crossmatch evaluate --split test` reads
    augment: bool = True  # random resized crop + flip (flip is off: captions name left and right)
    tokenizer: str = "word"  # word: train a word-level vocabulary; else a tokenizer.json (or its folder)
    min_word_freq: int = ranged(1, min=0)  # words seen fewer times in train captions map to [UNK]
    max_words: int = ranged(32, min=1)  # captions are cut to this many tokens
    num_workers: int = ranged(0, min=0)  # DataLoader workers; 0 keeps everything in the main process
    max_bad_samples: int = ranged(0, min=0)  # unreadable images skipped per epoch before the run fails
    # larger images are unreadable (decompression bombs); Pillow's default
    max_image_pixels: int = ranged(89_478_485, min=1)
    # a dataset file read whole (a JSONL line) may hold at most this many bytes
    max_annotation_bytes: int = ranged(1 << 30, min=1)
    # webdataset: the most one tar member may inflate to (gzip bombs)
    max_shard_member_bytes: int = ranged(256 << 20, min=1)
    allow_outside_root: bool = False  # accept image paths that leave the image folder (../x.png, /abs/x.png)
    # accept images that are in the train split and in an evaluation split (same resolved path or shard key), with
    # a warning; otherwise train and evaluate refuse them (the metrics would be inflated)
    allow_split_overlap: bool = False
    shuffle_buffer: int = ranged(1000, min=1)  # webdataset: pairs held in each loader worker's shuffle buffer
    allow_pipe: bool = False  # webdataset: accept `pipe:` shard commands (they run in a shell) in data.root
    hard_batches: bool = False  # train batches of confusable pairs, images that share objects (data/hard_batches.py)
    # Image preprocessing. Empty values take the model's own (open_clip models declare theirs), else the
    # defaults (ImageNet mean/std, squash resize, bilinear). A run stores the resolved values.
    image_mean: list[float] = ranged(factory=list, check="mean")  # per-channel mean, RGB
    image_std: list[float] = ranged(factory=list, check="std")  # per-channel std, RGB
    resize: str = ""  # squash (stretch to a square) | shortest (shorter side, then centre crop) | letterbox (pad)
    interpolation: str = ""  # bilinear | bicubic
    # RGB 0-255 behind transparent pixels and letterbox bars
    background: list[int] = ranged(factory=list, check="colour")

    def splits_to_read(self, split: str) -> list[str]:
        """The split names a reader takes for `split`: COCO's "restval" joins train when `restval` is set."""
        return [split, "restval"] if (self.restval and split == self.train_split) else [split]


@dataclass
class AlbefLossConfig:
    """ALBEF's objective (crossmatch.tasks.albef); the momentum encoders and MLM head are model.* keys."""

    itc_weight: float = 1.0  # weight of itc_loss
    itm_weight: float = 1.0  # weight of itm_loss
    mlm_weight: float = 1.0  # weight of mlm_loss (when model.mlm built the MLM head)
    mlm_prob: float = ranged(0.15, min=0, max=1)  # fraction of real words masked (BERT's 80/10/10 replacement)
    alpha: float = 0.4  # momentum distillation weight, ramped linearly from 0 over the first epoch


@dataclass
class ViltLossConfig:
    """ViLT's objective (crossmatch.tasks.vilt)."""

    n_negatives: int = ranged(15, min=1)  # negative captions per positive for the ranking loss (at most B - 1)
    # random (ViLT) | hard: drawn by softmax of the cheap head's ITC logits (ALBEF's draw)
    negatives: str = ranged("random", choices=VILT_NEGATIVES)
    rank_weight: float = 1.0  # weight of rank_loss
    itm_weight: float = 1.0  # weight of itm_loss
    itc_weight: float = 1.0  # weight of itc_loss (the cheap first-stage head)


@dataclass
class IdentityLossConfig:
    """Person search: TIPCB's part models, IRRA and dual encoders trained with `loss.name=sdm` or `cmpm`."""

    name: str = "sdm"  # sdm (IRRA) | cmpm (TIPCB): TIPCB's matching loss
    temperature: float = ranged(0.02, above=0)  # SDM temperature tau (IRRA's value)
    id_weight: float = ranged(0.0, min=0)  # weight of id_loss: a shared identity classifier on both sides
    mlm_weight: float = ranged(0.0, min=0)  # weight of mlm_loss (IRRA's implicit relation reasoning; irra only)
    mlm_prob: float = ranged(0.15, above=0, max=1)  # share of real caption tokens masked for mlm_loss


@dataclass
class LossConfig:
    """The training objective. Dual encoders train with `name` (hinge, the default, with margin / max_violation
    / warmup_epochs, as SCAN does; or a contrastive loss); the other families read their own section
    (`loss.albef`, `loss.vilt`, `loss.identity`)."""

    # dual encoders: hinge (VSE++) | infonce (CLIP) | siglip (SigLIP) | sdm | cmpm (person search: relevance by
    # identity, settings in loss.identity); other families train with their own objective
    name: str = "hinge"
    local: bool = False  # infonce/siglip under DDP: this rank's rows against all columns (open_clip --local-loss)
    init_logit_scale: float | None = None  # log of the initial scale; default CLIP log(1/0.07), SigLIP log(10)
    init_logit_bias: float | None = None  # SigLIP's initial bias; default -10
    # the learned scale exp(logit_scale) is clamped to at most this (CLIP)
    max_logit_scale: float = ranged(100.0, above=0)
    margin: float = 0.2  # hinge margin (VSE++, SCAN)
    max_violation: bool = True  # hardest negative in the batch instead of the sum over negatives
    warmup_epochs: int = ranged(0, min=0)  # epochs with the sum of violations before switching to hardest negatives
    # K perturbed captions per pair as extra negatives (hinge: image -> negative caption; ITC: extra i2t
    # columns; ALBEF/ViLT: ITM pairs labelled 0), from the dataset's exact negatives or the rule-based
    # perturber (crossmatch.data.negatives); 0: off
    text_negatives: int = ranged(0, min=0)
    # hinge with max_violation: the K text negatives join each image's hardest-caption max (joint), or the
    # hardest of them is a hinge term of its own, beside the in-batch hardest (separate; losses/triplet.py)
    text_negative_term: str = ranged("joint", choices=TEXT_NEGATIVE_TERMS)
    # dual-encoder hinge: weight of a second term with the caption as the anchor, its image the positive and
    # its hardest text negative the negative (cosine of the two captions' embeddings; losses/triplet.py); 0: off
    caption_anchor_weight: float = ranged(0.0, min=0)
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
    """The training loop's own settings: `Trainer` (crossmatch.engine.trainer) takes this section as its config,
    so the loop and the CLI share one set of defaults."""

    epochs: int = ranged(10, min=1)  # passes over the train split
    # pairs per micro-batch on each rank; a step sees this x accum_steps x world size
    batch_size: int = ranged(128, min=1)
    lr: float = ranged(2e-4, above=0, max=MAX_LR)  # peak learning rate of the new (not pretrained) parameters
    optimizer: str = "adam"  # adam | adamw | sgd
    # decoupled for adamw; never on 1-D parameters (biases, norms) or temperatures
    weight_decay: float = ranged(0.0, min=0)
    scheduler: str = "step"  # step | cosine | constant
    lr_step_epochs: int = ranged(15, min=1)  # step scheduler: multiply the lr by lr_gamma every this many epochs
    lr_gamma: float = ranged(0.1, above=0)  # step scheduler: the lr factor at each step
    warmup_steps: int = ranged(0, min=0)  # linear lr warm-up from 0, in optimizer steps
    grad_clip: float = ranged(2.0, min=0)  # max gradient norm; 0 disables clipping
    # seeds the weights, the batch order and every augmentation (resume replays them)
    seed: int = ranged(0, min=0, max=MAX_SEED)
    max_steps_per_epoch: int = ranged(0, min=0)  # 0 = the whole epoch; >0 cuts epochs short (smoke tests, demos)
    log_every: int = ranged(20, min=1)  # steps between scalar logs
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a GradScaler)
    # micro-batches per optimizer step; exact big-batch gradient for in-batch-negative tasks
    accum_steps: int = ranged(1, min=1)
    compile: bool = False  # torch.compile the training step
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
    grad_checkpointing: bool = False  # activation checkpointing in the towers that support it (clip)
    # layer-wise lr decay: block k of n gets lr * layer_decay ** (n - k) (the towers)
    layer_decay: float = ranged(1.0, above=0, max=1)
    # lr of pretrained towers (vse_pretrained, clip, *_minilm) before layer_decay; 0 = train.lr
    tower_lr: float = ranged(0.0, min=0, max=MAX_LR)
    # where scalars go: tensorboard (tb/), jsonl (metrics.jsonl, which curves.png is drawn from), wandb (optional)
    loggers: list[str] = ranged(factory=lambda: ["tensorboard", "jsonl"], check=LOGGERS_CHECK)


@dataclass
class EvalConfig:
    batch_size: int = ranged(256, min=1)  # encoding batch size
    chunk_size: int = ranged(512, min=1)  # rows (images) per block of the all-pairs score matrix
    every_epochs: int = ranged(1, min=1)  # validate every this many epochs
    # validation during training on the split's first N images and their captions (0: all)
    max_images: int = ranged(0, min=0)
    # batches of val pairs on which validation also computes the training loss (0: off)
    loss_batches: int = ranged(10, min=0)
    metric: str = "rsum"  # key of the metrics dict that selects best.pt (higher is better)
    folds: int = ranged(1, min=1)  # mean over this many consecutive image folds (COCO 1K protocol: 5 folds of 1000)
    rerank_k: int = ranged(0, min=0)  # fusion models: re-score each query's top-k stage-1 candidates (0: stage 1 only)
    rerank_batch: int = ranged(128, min=1)  # pairs per score_pairs call when re-ranking
    first_stage: str = ""  # checkpoint of a dual encoder whose scores replace the model's own stage 1
    precision: str = ranged("fp32", choices=EVAL_PRECISIONS)  # fp32 | same (the train.precision autocast) | bf16 | fp16

    def precision_for(self, train_precision: str) -> str:
        return train_precision if self.precision == "same" else self.precision


@dataclass
class CheckpointConfig:
    # full-state per-epoch checkpoints (epoch_XXXX.pt) kept besides last.pt and best.pt
    keep_last: int = ranged(0, min=0)
    safetensors: bool = False  # also write best.safetensors and last.safetensors (weights, config, tokenizer)
    every_steps: int = ranged(0, min=0)  # also refresh last.pt every this many optimizer steps (0: only at epoch ends)


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
        cfg = OmegaConf.to_object(merged)  # resolves ${...} interpolations
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"bad config key {key!r}: {_one_line(err)}" if key else _one_line(err)) from err
    if "name" not in cfg.model:
        raise ConfigError("config has no model.name")
    return cfg


# Metrics that may select best.pt (higher is better), by evaluation protocol: the keys that
# `evaluate_retrieval` and `evaluate_person_search` report (a test keeps these lists true).
RETRIEVAL_METRICS = ("rsum", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
TWIN_METRICS = ("twin_acc",)  # only on splits with twin scenes (the shapes data)
PERSON_METRICS = (
    "t2i_r1",
    "t2i_r5",
    "t2i_r10",
    "t2i_mAP",
    "t2i_mINP",
    "i2t_r1",
    "i2t_r5",
    "i2t_r10",
    "i2t_mAP",
    "i2t_mINP",
)
PERSON_TWIN_METRICS = ("t2i_twin_acc",)  # only on splits with twin identities (the people data)
LOWER_IS_BETTER = ("i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr")


def selectable_metrics(person_search: bool, twins: bool) -> tuple[str, ...]:
    """The metrics that may select best.pt under one evaluation protocol."""
    if person_search:
        return PERSON_METRICS + PERSON_TWIN_METRICS * twins
    return RETRIEVAL_METRICS + TWIN_METRICS * twins


def check_metric(metric: str, reported: tuple[str, ...] | list[str], protocol: str) -> None:
    """`eval.metric` must be one of the higher-is-better metrics that the evaluation protocol reports."""
    if metric not in reported:
        why = "lower is better" if metric in LOWER_IS_BETTER else f"not reported by {protocol} evaluation"
        raise ConfigError(f"eval.metric={metric!r} cannot select best.pt ({why}); choose one of {', '.join(reported)}")


def validate_config(cfg: RunConfig, training: bool = True) -> RunConfig:
    """Check the whole resolved config before any work, so that a bad value fails in one line at once rather
    than after an epoch: every section against the ranges declared beside its fields (`ranged`), and the
    metric name. Model configs are checked the same way when they are built (`build_config`).

    Names that have a home elsewhere are checked there, also before any work: the model and its keys
    (create_model), train.optimizer, train.scheduler, train.precision (the builders), data.format.

    Args:
        training: also check the `train`, `loss` and `checkpoint` sections (evaluation reads data, model, eval).
    Raises:
        ConfigError: naming the first bad key and its value.
    """
    sections = ("data", "eval", "train", "loss", "checkpoint") if training else ("data", "eval")
    for name in sections:
        check_fields(getattr(cfg, name), name)
    if not isinstance(cfg.model.get("name"), str):
        raise ConfigError(f"model.name={cfg.model.get('name')!r}: must be the name of a registered model")
    check_metric(
        cfg.eval.metric, sorted({*RETRIEVAL_METRICS, *TWIN_METRICS, *PERSON_METRICS, *PERSON_TWIN_METRICS}), "any"
    )
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
