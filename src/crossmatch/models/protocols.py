"""What a crossmatch model offers, declared in one place as `typing.Protocol`s.

Two faces, one model:
- the public face is open_clip's tensor contract (`ClipLike`): `encode_image(images, normalize=False)`,
  `encode_text(tokens, normalize=False)`, `forward(image, text)` -> `(image_features, text_features,
  logit_scale.exp())` (plus `logit_bias` for SigLIP-trained models), so that a tool written for open_clip
  models (retrieval benchmarks, embedding pipelines, index builders) runs on any crossmatch model;
- the internal face (`FeatureEncoder`) feeds the tasks, the Evaluator and the index: batch dicts in,
  feature dicts out (token features `(B, R, D)` / `(B, L, D)` where a family has them), an all-pairs
  `similarity`, and for cross-encoders a `PairScorer.score_pairs` that re-scores candidate pairs.

`SentenceEncoder` is sentence-transformers' `encode`, and `SavesPretrained` Hugging Face's file layout.
Every registered model is all of these (`models/face.py` implements the public ones on top of the internal
face); `isinstance(model, PairScorer)` is how code asks for a capability.

Legend: B batch, L tokens, E embedding, N_img images, N_txt captions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class FeatureEncoder(Protocol):
    """The internal face: what the tasks, the Evaluator and the index call."""

    def encode_image_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch["image"] (B, 3, H, W) (plus boxes for box-region models) -> feature dict."""
        ...

    def encode_text_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch["input_ids"], batch["attention_mask"] (B, L) -> feature dict."""
        ...

    def similarity(self, img: dict[str, Tensor], txt: dict[str, Tensor]) -> Tensor:
        """All pairs of encoded images and captions -> (N_img, N_txt) first-stage scores."""
        ...


@runtime_checkable
class PairScorer(Protocol):
    """Cross-encoders (ALBEF, ViLT): a second-stage score of aligned (image, caption) pairs."""

    def score_pairs(self, img: dict[str, Tensor], txt: dict[str, Tensor]) -> Tensor:
        """B encoded images and B encoded captions, row i with row i -> (B,) scores."""
        ...


@runtime_checkable
class ClipLike(Protocol):
    """open_clip's public contract (open_clip `CLIP.encode_image` / `encode_text` / `forward`)."""

    logit_scale: Tensor  # () log of the contrastive scale; 0 (scale 1) for hinge-trained models

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        """(B, 3, H, W) preprocessed images -> (B, E) first-stage embeddings."""
        ...

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        """(B, L) token ids padded with the model's pad id -> (B, E) first-stage embeddings."""
        ...

    def forward(self, image: Tensor, text: Tensor) -> tuple[Tensor, ...]:
        """-> (image_features (B, E), text_features (B, E), logit_scale.exp()) l2-normalised, plus
        logit_bias for SigLIP-trained models."""
        ...


@runtime_checkable
class SentenceEncoder(Protocol):
    """sentence-transformers' `encode`: captions (str) or images (PIL images, pathlib.Path), one modality
    per call, -> embeddings."""

    def encode(
        self,
        items: Any,
        batch_size: int = 32,
        device: Any = None,
        normalize_embeddings: bool = False,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        show_progress_bar: bool | None = None,
    ) -> Any: ...


@runtime_checkable
class SavesPretrained(Protocol):
    """Hugging Face's file layout: a folder `crossmatch.from_pretrained` reads back."""

    def save_pretrained(self, save_directory: str | Path) -> Path: ...

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None) -> str: ...


@runtime_checkable
class Tokenizes(Protocol):
    """`get_tokenizer(name)(texts)`: captions -> (B, L) long ids padded with `pad_id`."""

    pad_id: int

    def __call__(self, texts: str | Sequence[str]) -> Tensor: ...


# Optional capabilities. A model has one when it implements the members below; code asks with `isinstance`
# (or the one-line helpers after them), never by attribute name.


@runtime_checkable
class TakesBoxes(Protocol):
    """Box-region models (SCAN with `regions: boxes`): `encode_image_features` reads batch["boxes"]."""

    needs_boxes: bool  # False for the same family configured on grid regions


def takes_boxes(model: object) -> bool:
    """Whether the data must load batch["boxes"] (B, R, 4) for `model`."""
    return isinstance(model, TakesBoxes) and bool(model.needs_boxes)


@runtime_checkable
class LayeredTowers(Protocol):
    """Towers with numbered blocks: layer-wise lr decay (`train.layer_decay`, engine/optim.py)."""

    def layer_depths(self) -> dict[str, tuple[int, int]]:
        """Parameter name -> (depth, depth of its tower): 0 embeddings, block i -> i + 1, head -> top."""
        ...


@runtime_checkable
class GradCheckpointing(Protocol):
    """Towers that recompute activations in the backward pass (`train.grad_checkpointing`)."""

    def set_grad_checkpointing(self, enable: bool = True) -> None: ...


@runtime_checkable
class FrozenCacheable(Protocol):
    """Frozen pretrained towers whose outputs are computed once and kept on disk (`model.cache_frozen`)."""

    caches_image_outputs: bool  # whether encode_image_features serves the image tower's frozen outputs per item

    def use_cache_dir(self, folder: str | Path, cache_images: bool = True) -> None: ...


@runtime_checkable
class WordAttention(Protocol):
    """Cross-attention models (SCAN): which image regions each word attends to (`crossmatch search --explain`)."""

    def word_attention(self, img: dict[str, Tensor], txt: dict[str, Tensor]) -> Tensor:
        """One encoded image and one caption -> (L, R) attention of each word over the regions."""
        ...


@runtime_checkable
class ResumableLoader(Protocol):
    """A train loader the Trainer can stop and restart mid-epoch at the same batch (exact resume).

    The indexed loader (`EpochLoader`), the hard-batch loader (the same over a `HardBatchSampler`) and the shard
    stream (`ShardLoader`) implement it."""

    batch_size: int  # items per batch on this rank

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Order the epoch's items by (seed, epoch); skip the first `start` items this rank would read."""
        ...

    @property
    def steps(self) -> int:
        """Batches per epoch on this rank, counted from the epoch start (whatever `start`)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# What a model declares about itself (the registry, the tasks and the exporters read it).


@runtime_checkable
class Configured(Protocol):
    """A model built from a config dataclass (every registered model: `create_model`); checkpoints save it."""

    config: Any  # the family's config dataclass (ScanConfig, AlbefConfig, ...)


def config_of(model: object) -> Any | None:
    """The config dataclass `model` was built from; None for a module built outside the registry."""
    return model.config if isinstance(model, Configured) else None


@runtime_checkable
class FamilyMember(Protocol):
    """A model of a named family; training objectives are registered by (family, loss.name) (crossmatch.tasks)."""

    family: str  # declared on the family's model class, e.g. "scan"


def model_family(model: object) -> str:
    """The family `model` declares; "" for a module that declares none."""
    return model.family if isinstance(model, FamilyMember) else ""


@runtime_checkable
class DualEncoding(Protocol):
    """Dual encoders: one l2-normalised (B, E) embedding per side and their dot product as the score, so the
    contrastive losses and caption-to-caption cosines apply."""

    is_dual_encoder: bool


def is_dual_encoder(model: object) -> bool:
    """Whether `model` scores a pair by the dot product of one embedding per side."""
    return isinstance(model, DualEncoding) and bool(model.is_dual_encoder)


@runtime_checkable
class PretrainedTemperature(Protocol):
    """Pretrained contrastive models (open_clip): the temperature the contrastive objective starts from."""

    contrastive_init: dict[str, float]  # {"logit_scale": log scale, "logit_bias": bias (SigLIP)}, as loaded


def pretrained_temperature(model: object) -> dict[str, float]:
    """The model's pretrained {logit_scale, logit_bias}; {} for a model that brings none."""
    return dict(model.contrastive_init) if isinstance(model, PretrainedTemperature) else {}


# What the Python API attaches and reads (crossmatch.api).


@runtime_checkable
class DeclaresPreprocess(Protocol):
    """Families whose pretrained towers bring their input statistics: `preprocess` (mean, std, native_size, ...)
    fills the data section's unset fields (`runs.resolve_preprocess`); None or {} when a family has none."""

    preprocess: Any  # Mapping[str, Any] | None


def preprocess_of(model: object) -> dict[str, Any]:
    """The model's own image preprocessing (filled into the empty data.* fields), {} when it declares none."""
    return dict(model.preprocess or {}) if isinstance(model, DeclaresPreprocess) else {}


@runtime_checkable
class RunAttached(Protocol):
    """A model from `crossmatch.load` / `create_model_and_transforms`: its run's config, image preprocessing
    and tokenizer, attached as plain attributes (what `encode`, `score` and `save_pretrained` read)."""

    run_config: Any  # the RunConfig it was trained or built with
    preprocess: Any  # image (PIL, path or uint8 (3, H, W)) -> (3, S, S) float; also a mapping of its fields
    tokenizer: Tokenizes  # captions -> (B, L) ids


@runtime_checkable
class KeyedImageCache(FrozenCacheable, Protocol):
    """Frozen-cache models whose image outputs are filled ahead of training under keys of the caller's choosing
    (image file keys) and then read by key alone, `batch["image_key"]` instead of pixels (`frozen_cache.warm_up`)."""

    def missing_image_outputs(self, keys: list[bytes]) -> list[int]:
        """The positions of the keys whose frozen image outputs are not cached yet."""
        ...

    def fill_image_cache(self, keys: list[bytes], image: Tensor) -> None:
        """Compute and keep the frozen image outputs of (B, 3, H, W) `image` under `keys` (B of them)."""
        ...


@runtime_checkable
class HasImageTower(Protocol):
    """Models with one image backbone, `image_tower` (an nn.Module: (B, 3, H, W) -> a (B, C, h, w) feature map,
    or a tower with `feature_map` and `pool`), whose outputs `crossmatch features` exports."""

    image_tower: Any
