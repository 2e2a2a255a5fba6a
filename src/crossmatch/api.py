"""The Python API a user of open_clip expects, with open_clip's names, argument order and return values:

    model, _, preprocess = crossmatch.create_model_and_transforms("runs/x")   # or a registered name
    tokenizer = crossmatch.get_tokenizer("runs/x")
    images = torch.stack([preprocess(Image.open(p)) for p in paths])          # (N, 3, S, S)
    img = model.encode_image(images, normalize=True)                         # (N, E)
    txt = model.encode_text(tokenizer(["a frog.", "a red circle"]), normalize=True)  # (M, E)
    scores = crossmatch.score(model, pil_images, captions, direction="t2i")  # (N, M), every family

Modelled on open_clip's `create_model_and_transforms` / `get_tokenizer` (Ilharco et al., 2021); the model's
methods are declared in `models/protocols.py`. The preprocessing is the run's `data` section (the model's
own, resolved when it was trained: see `runs.resolve_preprocess`), so a checkpoint is scored on exactly
what it was trained on. `from_pretrained` reads run folders, checkpoints, `save_pretrained` folders and
Hugging Face hub ids. Legend: N images, M captions, E embedding width, S image side, L tokens.
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
from crossmatch.data.loaders import collate, pad_sequences
from crossmatch.data.tokenizer import PAD_ID, CaptionTokenizer, build_tokenizer
from crossmatch.data.transforms import DEFAULT_PREPROCESS, load_image, to_rgb, transform_from_config
from crossmatch.engine.checkpoint import read_weights
from crossmatch.errors import DataError, ModelError, install_hint
from crossmatch.models.hub import HUB_ID, PRETRAINED_FILES, hub_error, short_hub_timeouts
from crossmatch.models.protocols import DeclaresPreprocess, RunAttached, takes_boxes
from crossmatch.retrieval.evaluate import score_all_pairs
from crossmatch.retrieval.rerank import rerank, reranks
from crossmatch.runs import build_untrained_run, load_run, resolve_checkpoint, resolve_preprocess
from crossmatch.tensors import cat_features


class ImagePreprocess(Mapping):
    """A run's evaluation (or, with `train`, training) image transform: PIL image, image path or uint8 tensor
    (3, H, W) -> (3, S, S) float.

    It is also a read-only mapping of the resolved preprocessing (size, mean, std, resize, interpolation,
    background), the fields a model's `preprocess` dict declares.
    """

    def __init__(self, data: DataConfig, train: bool = False):
        self.fields = {"size": data.image_size, **{k: v for k, v in DEFAULT_PREPROCESS.items()}}
        set_fields = {"mean": data.image_mean, "std": data.image_std, "resize": data.resize}
        set_fields |= {"interpolation": data.interpolation, "background": data.background}
        self.fields |= {k: v for k, v in set_fields.items() if v}
        self.max_pixels = data.max_image_pixels
        self.transform = transform_from_config(data, train=train)

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
    """A model's caption tokenizer with open_clip's contract: `tokenizer(texts)` -> (B, L) long ids padded with
    the model's pad id `pad_id` (a tensor: `.to(device)` works), L the longest caption of the batch.
    `batch(texts)` gives the internal face's dict {"input_ids", "attention_mask"}; other attributes (encode,
    decode, vocab_size, to_str) are the wrapped tokenizer's."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.pad_id = int(getattr(tokenizer, "pad_id", PAD_ID))

    def __call__(self, texts: str | Sequence[str]) -> Tensor:
        ids, _ = pad_sequences(self._encode(texts), self.pad_id)  # (B, L)
        return ids

    def batch(self, texts: str | Sequence[str]) -> dict[str, Tensor]:
        """Captions -> {"input_ids": (B, L) long, "attention_mask": (B, L) bool}, as the loaders collate them."""
        return collate([{"input_ids": ids} for ids in self._encode(texts)])

    def _encode(self, texts: str | Sequence[str]) -> list[list[int]]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise DataError("the tokenizer takes a caption or a list of captions (str)")
        return self.tokenizer.encode_batch(texts)

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("tokenizer")
        if inner is None or name.startswith("__"):  # copy/pickle probe dunders before __init__ has run
            raise AttributeError(name)
        return getattr(inner, name)

    def __repr__(self) -> str:
        return (
            f"Tokenizer({type(self.tokenizer).__name__}, vocab_size={self.tokenizer.vocab_size}, pad_id={self.pad_id})"
        )


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _image_features(model: nn.Module, pixels: Tensor, batch_size: int) -> dict[str, Tensor]:
    """The internal face's features of N preprocessed images (N, 3, S, S), in batches."""
    if takes_boxes(model):
        raise ModelError(f"{type(model).__name__} reads object boxes: score it with `crossmatch evaluate`")
    dev, dtype = _device(model), next(model.parameters()).dtype  # fp16/bf16 models take images of their dtype
    return cat_features(
        [
            model.encode_image_features({"image": pixels[i : i + batch_size].to(dev, dtype)})
            for i in range(0, len(pixels), batch_size)
        ]
    )


def _text_features(model: nn.Module, batch: dict[str, Tensor], batch_size: int) -> dict[str, Tensor]:
    dev, n = _device(model), batch["input_ids"].shape[0]
    parts = []
    for i in range(0, n, batch_size):
        parts.append(
            model.encode_text_features(
                {k: batch[k][i : i + batch_size].to(dev) for k in ("input_ids", "attention_mask")}
            )
        )
    return cat_features(parts)


@torch.no_grad()
def score(
    model: nn.Module,
    images: Sequence[Image.Image | str | Path | Tensor],
    texts: Sequence[str],
    direction: str = "t2i",
    rerank_k: int | None = None,
) -> Tensor:
    """(N, M) scores of N images against M captions, higher = better, ranked as `crossmatch evaluate` ranks
    `direction`: the Evaluator's own code (`score_all_pairs`, then for fusion models `rerank`).

    Dual encoders, CLIP, TIPCB and SCAN: the model's all-pairs `similarity` (the same for both directions).
    Fusion models (ALBEF, ViLT): that first stage, then `score_pairs` re-scores the top-k candidates of each
    query of `direction` (i2t: each image's top-k captions, row-wise; t2i: each caption's top-k images,
    column-wise); the others keep their first-stage order below every candidate. k: `rerank_k`, default the
    run's `eval.rerank_k`. Needs a model from `crossmatch.load` / `create_model_and_transforms`.

    Raises:
        ModelError: a bare model (no preprocessing or tokenizer), or an unknown direction.
    """
    if direction not in ("t2i", "i2t"):
        raise ModelError(f"direction={direction!r}: expected 't2i' (caption queries) or 'i2t' (image queries)")
    if not isinstance(model, RunAttached) or not isinstance(model.tokenizer, Tokenizer):
        raise ModelError("crossmatch.score needs a model from crossmatch.load or create_model_and_transforms")
    preprocess, tokenizer, cfg = model.preprocess, model.tokenizer, model.run_config
    was_training = model.training
    model.eval()
    try:
        pixels = torch.stack(
            [im if isinstance(im, Tensor) and im.is_floating_point() else preprocess(im) for im in images]
        )
        img = _image_features(model, pixels, cfg.eval.batch_size)
        txt = _text_features(model, tokenizer.batch(texts), cfg.eval.batch_size)
        stage1 = score_all_pairs(model, img, txt, cfg.eval.chunk_size)  # (N, M)
        k = rerank_k if rerank_k is not None else cfg.eval.rerank_k
        if not reranks(model, k):
            return stage1
        s_i2t, s_t2i = rerank(model, stage1, img, txt, k, cfg.eval.rerank_batch)  # (N, M) float64 each
        return s_i2t if direction == "i2t" else s_t2i
    finally:
        model.train(was_training)


def attach(model: nn.Module, cfg: RunConfig, tokenizer: Any) -> tuple[nn.Module, ImagePreprocess, ImagePreprocess]:
    """Give a built model its run config, preprocessing and tokenizer (plain attributes: a deep copy of the
    model stays whole). Returns (model, preprocess_train, preprocess_val)."""
    preprocess = ImagePreprocess(cfg.data)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    model.run_config, model.preprocess, model.tokenizer = cfg, preprocess, tok
    return model, ImagePreprocess(cfg.data, train=True), preprocess


SCHEMAS = ("hf-hub:", "local-dir:")  # open_clip's model names that the clip family takes as model.arch


def _hub_snapshot(repo_id: str) -> Path:
    """The local copy of a Hugging Face hub repository written by save_pretrained (downloaded once)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise ModelError(
            f"{repo_id!r} is not a local path; hub ids need huggingface_hub, {install_hint('hub')}"
        ) from err
    with short_hub_timeouts() as hub:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=list(PRETRAINED_FILES)))
        except Exception as err:  # huggingface_hub raises many kinds (offline, timeouts, 401, 404, ...)
            raise ModelError(
                hub_error(f"crossmatch model {repo_id!r} (no such local path either)", err, hub.offline)
            ) from err


def _resolve(name_or_path: str | Path) -> Path | None:
    """A local run folder, checkpoint or save_pretrained folder; a hub id downloaded; None for a registered name."""
    path = Path(name_or_path)
    if path.exists():
        return path
    name = str(name_or_path)
    from crossmatch.models.registry import list_models

    if name in list_models() or name.startswith(SCHEMAS):
        return None
    if HUB_ID.fullmatch(name):
        return _hub_snapshot(name)
    raise ModelError(
        f"{name!r} is neither a file, a run folder, a save_pretrained folder, a hub id (org/name) nor a "
        "registered model (crossmatch models)"
    )


def load(path: str | Path, overrides: list[str] | None = None) -> nn.Module:
    """A trained model, eval mode, from a run folder, .pt, .safetensors, save_pretrained folder or hub id, with
    `preprocess`, `tokenizer` and `run_config` attached (what `encode`, `score` and `save_pretrained` use)."""
    local = _resolve(path)
    if local is None:
        raise ModelError(f"{str(path)!r} is a registered name, not trained weights: use create_model_and_transforms")
    return attach(*load_run(local, overrides))[0]


from_pretrained = load  # Hugging Face's name (crossmatch.from_pretrained is crossmatch.load)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def create_model_and_transforms(
    name_or_path: str | Path,
    pretrained: str | None = None,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    *,
    overrides: list[str] | None = None,
    data_root: str = "data",
) -> tuple[nn.Module, ImagePreprocess, ImagePreprocess]:
    """(model, preprocess_train, preprocess_val), as open_clip's function of that name returns them.

    Args:
        name_or_path: a run folder, .pt, .safetensors, save_pretrained folder or hub id (trained weights); a
            registered model name (untrained heads, pretrained towers as the model's config says); or, for the
            clip family, open_clip's `hf-hub:org/repo` and `local-dir:/path` names.
        pretrained: sets model.pretrained of a registered name (clip: an open_clip tag or a weights file).
        precision: fp32 | fp16 | bf16, the dtype of the weights (feed images of that dtype).
        device: where the model goes.
        overrides: key=value config overrides (e.g. data.resize=letterbox, model.embed_dim=256).
        data_root: for a name whose tokenizer is trained on captions (data.tokenizer=word): the dataset.
    A name whose model has a `text_tower` uses that tower's tokenizer unless data.tokenizer is given, and a
    pretrained image tower its native input size unless data.image_size is given.
    """
    if precision not in PRECISIONS:
        raise ModelError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    overrides = list(overrides or [])
    local = _resolve(name_or_path)
    if local is not None:
        if pretrained is not None:
            raise ModelError(
                f"pretrained={pretrained!r} applies to a registered name; {name_or_path} holds its weights"
            )
        model, pp_train, pp_val = attach(*load_run(local, overrides))
    else:
        model, pp_train, pp_val = attach(*_untrained(str(name_or_path), pretrained, overrides, data_root))
    return model.to(device=device, dtype=PRECISIONS[precision]).eval(), pp_train, pp_val


def create_model_from_pretrained(
    name_or_path: str | Path,
    pretrained: str | None = None,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    *,
    overrides: list[str] | None = None,
    data_root: str = "data",
) -> tuple[nn.Module, ImagePreprocess]:
    """(model, preprocess_val), as open_clip's function of that name; arguments as create_model_and_transforms."""
    model, _, preprocess = create_model_and_transforms(
        name_or_path, pretrained, precision, device, overrides=overrides, data_root=data_root
    )
    return model, preprocess


def _untrained(name: str, pretrained: str | None, overrides: list[str], data_root: str):
    """(model, cfg, tokenizer) of a registered name (or an open_clip hf-hub:/local-dir: name)."""
    from crossmatch.models.registry import model_config

    if name.startswith(SCHEMAS):
        overrides = [f"model.arch={name}", *overrides]
        name = "clip"
    if pretrained is not None:
        overrides.append(f"model.pretrained={pretrained}")
    text_tower = getattr(model_config(name), "text_tower", None)
    if text_tower is not None and not any(o.startswith("data.tokenizer=") for o in overrides):
        overrides.append(f"data.tokenizer={text_tower}")
    model, cfg, tokenizer = build_untrained_run(name, data_root, overrides)
    native = ((model.preprocess if isinstance(model, DeclaresPreprocess) else None) or {}).get("native_size")
    if native and not any(o.startswith("data.image_size=") for o in overrides):
        cfg = resolve_preprocess(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=native)), model)
    return model, cfg, tokenizer


def get_tokenizer(name_or_path: str | Path) -> Tokenizer:
    """The tokenizer of a run folder, checkpoint, save_pretrained folder or hub id, or of a registered model
    that brings its own (clip, tiny_clip) or a pretrained text tower's (vse_pretrained, albef_minilm, ...).

    Raises:
        ModelError: a registered name whose vocabulary is learned from its training captions.
    """
    local = _resolve(name_or_path)
    if local is not None:
        ckpt = read_weights(resolve_checkpoint(local))
        if "tokenizer" not in ckpt:
            raise ModelError(f"{name_or_path} has no tokenizer (not written by crossmatch train)")
        max_words = (ckpt.get("config") or {}).get("data", {}).get("max_words", 32)
        return Tokenizer(CaptionTokenizer.from_str(ckpt["tokenizer"], max_words))
    from crossmatch.models.registry import create_tokenizer, model_config

    name = str(name_or_path)
    if name.startswith(SCHEMAS):
        return Tokenizer(create_tokenizer("clip", arch=name))
    own = create_tokenizer(name)
    if own is not None:
        return Tokenizer(own)
    text_tower = getattr(model_config(name), "text_tower", None)
    if text_tower is not None:
        return Tokenizer(build_tokenizer(text_tower, [], max_words=DataConfig().max_words))
    raise ModelError(
        f"model {name} learns its vocabulary from its training captions: pass its run folder, "
        f"e.g. crossmatch.get_tokenizer('runs/{name}')"
    )
