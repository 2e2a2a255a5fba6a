"""The Python API a user of open_clip expects: a model, its image preprocessing and its tokenizer.

    model, preprocess, tokenizer = crossmatch.create_model_and_transforms("runs/x")
    img = model.embed_images([preprocess(Image.open(p)) for p in paths])  # (N, E) l2-normalised
    txt = model.embed_texts(tokenizer(["a frog.", "a red circle"]))          # (M, E)
    scores = crossmatch.score(model, images=pil_images, texts=captions)     # (N, M) for every family

Modelled on open_clip's `create_model_and_transforms` / `get_tokenizer` (Ilharco et al., 2021). The
preprocessing is the run's `data` section (the model's own, resolved when it was trained: see
`runs.resolve_preprocess`), so a checkpoint is scored on exactly what it was trained on. Legend: N images,
M captions, E embedding width, S image side, L tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.v2.functional import pil_to_tensor

from crossmatch.config import DataConfig, RunConfig
from crossmatch.data.loaders import collate
from crossmatch.data.transforms import DEFAULT_PREPROCESS, load_image, to_rgb, transform_from_config
from crossmatch.errors import DataError, ModelError
from crossmatch.retrieval.rerank import below_candidates, candidate_pairs, topk_masks
from crossmatch.runs import build_untrained_run, load_run, needs_boxes, resolve_preprocess
from crossmatch.tensors import cat_features, slice_features

BATCH = 64  # images or captions encoded at a time


class ImagePreprocess(Mapping):
    """A run's evaluation image transform: PIL image, image path or uint8 tensor (3, H, W) -> (3, S, S) float.

    It is also a read-only mapping of the resolved preprocessing (size, mean, std, resize, interpolation,
    background), the fields a model's `preprocess` dict declares.
    """

    def __init__(self, data: DataConfig):
        self.fields = {"size": data.image_size, **{k: v for k, v in DEFAULT_PREPROCESS.items()}}
        set_fields = {"mean": data.image_mean, "std": data.image_std, "resize": data.resize}
        set_fields |= {"interpolation": data.interpolation, "background": data.background}
        self.fields |= {k: v for k, v in set_fields.items() if v}
        self.max_pixels = data.max_image_pixels
        self.transform = transform_from_config(data, train=False)

    def __call__(self, image: Image.Image | str | Path | Tensor) -> Tensor:
        """One image -> the model's input (3, S, S) float32."""
        background = tuple(self.fields["background"])
        if isinstance(image, (str, Path)):
            pixels = load_image(image, self.max_pixels, background)  # (3, H, W) uint8
        elif isinstance(image, Image.Image):
            pixels = pil_to_tensor(to_rgb(image, background))
        elif isinstance(image, Tensor):
            if image.dtype != torch.uint8 or image.ndim not in (2, 3):
                raise DataError(f"preprocess takes a uint8 (3, H, W) tensor, not {image.dtype} {tuple(image.shape)}")
            pixels = image if image.ndim == 3 else image[None]
            if pixels.shape[0] == 1:
                pixels = pixels.expand(3, -1, -1)  # grey -> RGB
            if pixels.shape[0] != 3:
                raise DataError(f"preprocess takes 1 or 3 channels first, not a tensor of shape {tuple(image.shape)}")
        else:
            raise DataError(f"preprocess takes a PIL image, a path or a uint8 tensor, not {type(image).__name__}")
        return self.transform(pixels)  # (3, S, S)

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    def __repr__(self) -> str:
        return f"ImagePreprocess({self.fields})"


class Tokenizer:
    """A run's caption tokenizer: `tokenizer(list[str])` -> {"input_ids": (M, L) long, "attention_mask": (M, L)
    bool}, padded to the longest caption. Other attributes (encode, decode, vocab_size) are the wrapped one's."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(self, texts: str | Sequence[str]) -> dict[str, Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise DataError("the tokenizer was given no captions")
        return collate([{"input_ids": ids} for ids in self.tokenizer.encode_batch(texts)])

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["tokenizer"], name)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def embed_images(model: nn.Module, images: Sequence[Tensor] | Tensor) -> Tensor:
    """Preprocessed images (N, 3, S, S) or a list of (3, S, S) -> (N, E) float32 l2-normalised, on the CPU."""
    feats = encode_images(model, images)
    if "embed" not in feats:
        raise ModelError(f"{type(model).__name__} has no global image embedding: use crossmatch.score")
    return feats["embed"].float().cpu()


@torch.no_grad()
def embed_texts(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """A tokenizer's batch {"input_ids", "attention_mask"} (M, L) -> (M, E) float32 l2-normalised, on the CPU."""
    feats = encode_texts(model, batch)
    if "embed" not in feats:
        raise ModelError(f"{type(model).__name__} has no global caption embedding: use crossmatch.score")
    return feats["embed"].float().cpu()


def encode_images(model: nn.Module, images: Sequence[Tensor] | Tensor) -> dict[str, Tensor]:
    """Every feature `model.encode_image` returns, for N preprocessed images, in batches of BATCH."""
    if needs_boxes(model):
        raise ModelError(f"{type(model).__name__} reads object boxes: score it with `crossmatch evaluate`")
    stack = images if isinstance(images, Tensor) else torch.stack(list(images))  # (N, 3, S, S)
    model.eval()
    dev = _device(model)
    return cat_features(
        [model.encode_image({"image": stack[i : i + BATCH].to(dev)}) for i in range(0, len(stack), BATCH)]
    )


def encode_texts(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every feature `model.encode_text` returns for a tokenizer's batch, in batches of BATCH."""
    model.eval()
    dev, n = _device(model), batch["input_ids"].shape[0]
    parts = []
    for i in range(0, n, BATCH):
        rows = {k: batch[k][i : i + BATCH].to(dev) for k in ("input_ids", "attention_mask")}
        parts.append(model.encode_text(rows))
    return cat_features(parts)


@torch.no_grad()
def score(
    model: nn.Module,
    images: Sequence[Image.Image | str | Path | Tensor],
    texts: Sequence[str],
    rerank_k: int | None = None,
) -> Tensor:
    """(N, M) float scores of N images against M captions, higher = better match, for every family.

    Dual encoders and SCAN: the model's all-pairs `similarity`. Fusion models (ALBEF, ViLT): that first
    stage, then `score_pairs` re-scores each image's and each caption's top-k candidates (k: `rerank_k`,
    default the model's own `eval.rerank_k`); pairs outside every top-k keep their first-stage order, below
    every candidate (as `crossmatch evaluate` ranks them). Needs a model from `load` or
    `create_model_and_transforms` (it carries `preprocess` and `tokenizer`).
    """
    preprocess, tokenizer = getattr(model, "preprocess", None), getattr(model, "tokenizer", None)
    if not callable(preprocess) or not isinstance(tokenizer, Tokenizer):
        raise ModelError("crossmatch.score needs a model from crossmatch.load or create_model_and_transforms")
    pixels = [im if isinstance(im, Tensor) and im.is_floating_point() else preprocess(im) for im in images]
    img, txt = encode_images(model, pixels), encode_texts(model, tokenizer(texts))
    stage1 = model.similarity(img, txt).float().cpu()  # (N, M)
    cfg = getattr(model, "run_config", None)
    k = rerank_k if rerank_k is not None else (cfg.eval.rerank_k if cfg is not None else 0)
    if k <= 0 or not hasattr(model, "score_pairs"):
        return stage1
    in_i2t, in_t2i = topk_masks(stage1, k)  # (N, M) bool each
    pairs = candidate_pairs(in_i2t, in_t2i)  # (P, 2)
    full = torch.zeros_like(stage1)
    dev = _device(model)
    for start in range(0, len(pairs), BATCH):
        i, t = pairs[start : start + BATCH].to(dev).unbind(1)  # (b,), (b,)
        full[i.cpu(), t.cpu()] = model.score_pairs(slice_features(img, i), slice_features(txt, t)).float().cpu()
    return below_candidates(full, stage1, in_i2t | in_t2i).float()  # (N, M)


def attach(model: nn.Module, cfg: RunConfig, tokenizer: Any) -> tuple[nn.Module, ImagePreprocess, Tokenizer]:
    """Give a built model its run config, preprocessing and tokenizer, and the embed_* helpers."""
    preprocess, tok = ImagePreprocess(cfg.data), tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    model.run_config, model.preprocess, model.tokenizer = cfg, preprocess, tok
    model.embed_images = lambda images: embed_images(model, images)
    model.embed_texts = lambda batch: embed_texts(model, batch)
    return model, preprocess, tok


def load(path: str | Path, overrides: list[str] | None = None) -> nn.Module:
    """A trained model from a run folder, .pt or .safetensors, eval mode, with `preprocess`, `tokenizer`,
    `run_config`, `embed_images` and `embed_texts` attached."""
    model, cfg, tokenizer = load_run(path, overrides)
    return attach(model, cfg, tokenizer)[0]


def create_model_and_transforms(
    name_or_path: str | Path, overrides: list[str] | None = None, data_root: str = "data"
) -> tuple[nn.Module, ImagePreprocess, Tokenizer]:
    """(model, preprocess, tokenizer) of a checkpoint, run folder or .safetensors export, else of a
    registered model name (untrained heads, pretrained towers as the model's config says).

    Args:
        overrides: key=value config overrides (e.g. data.resize=letterbox, model.embed_dim=256).
        data_root: for a name whose tokenizer is trained on captions (data.tokenizer=word): the dataset.
    A name whose model has a `text_tower` uses that tower's tokenizer unless data.tokenizer is given, and a
    pretrained image tower its native input size unless data.image_size is given.
    """
    overrides = list(overrides or [])
    path = Path(name_or_path)
    if path.exists():
        model, preprocess, tok = attach(*load_run(path, overrides))
        return model, preprocess, tok
    from crossmatch.models.registry import list_models, model_config

    name = str(name_or_path)
    if name not in list_models():
        raise ModelError(f"{name!r} is neither a file, a run folder nor a registered model (crossmatch models)")
    text_tower = getattr(model_config(name), "text_tower", None)
    if text_tower is not None and not any(o.startswith("data.tokenizer=") for o in overrides):
        overrides.append(f"data.tokenizer={text_tower}")
    model, cfg, tokenizer = build_untrained_run(name, data_root, overrides)
    native = (getattr(model, "preprocess", None) or {}).get("native_size")
    if native and not any(o.startswith("data.image_size=") for o in overrides):
        cfg = resolve_preprocess(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=native)), model)
    return attach(model, cfg, tokenizer)
