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


# What a run reads off a model when it builds it (crossmatch.runs).


@runtime_checkable
class DeclaresPreprocess(Protocol):
    """Models whose image tower brings its own preprocessing (open_clip, pretrained towers)."""

    preprocess: dict[str, Any] | None  # mean, std, resize, interpolation, background (and a fixed size); None: none


def preprocess_of(model: object) -> dict[str, Any]:
    """The model's own image preprocessing (filled into the empty data.* fields), {} when it declares none."""
    return (model.preprocess or {}) if isinstance(model, DeclaresPreprocess) else {}


@runtime_checkable
class Configured(Protocol):
    """Registered models: built from a config dataclass, whose every field a checkpoint stores."""

    config: Any  # the model's config dataclass


def config_of(model: object) -> Any | None:
    """The model's config dataclass, None when it has none."""
    return model.config if isinstance(model, Configured) else None
