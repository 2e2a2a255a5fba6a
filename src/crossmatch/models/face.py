"""The public face every crossmatch model shares (models/protocols.py declares it): open_clip's tensor
contract, sentence-transformers' `encode`, and Hugging Face's `save_pretrained` / `push_to_hub`, all
written once here on top of each family's internal face (`encode_image_features`, `encode_text_features`).

`encode_image` / `encode_text` return a family's first-stage embedding, the one its all-pairs score starts
from: the l2-normalised global embedding of dual encoders, CLIP, TIPCB (global branch) and of the ITC heads
of ALBEF and ViLT; SCAN overrides `image_embedding` / `text_embedding` (mean of its regions / real words).
For the dot-product families `normalize` changes nothing: their embeddings are unit vectors already.

`logit_scale` is the contrastive objective's learned log-scale, stored with the model (the task shares its
parameter with the model: tasks/contrastive.py); a model trained with the hinge loss has log 1 = 0. The
learned `logit_bias` of SigLIP-trained models is registered when the task or the weights bring one.

`encode` and `save_pretrained` need the run's preprocessing and tokenizer, which `crossmatch.load` and
`create_model_and_transforms` give the model as plain attributes (`preprocess`, `tokenizer`, `run_config`);
nothing callable is stored on the model, so `copy.deepcopy(model)` embeds with its own weights.

Legend: B batch, L tokens, E embedding.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossmatch.errors import DataError, ModelError, install_hint
from crossmatch.files import atomic_write, write_text
from crossmatch.models.protocols import RunAttached, takes_boxes

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PREPROCESS_NAME = "preprocess.json"
TOKENIZER_NAME = "tokenizer.json"  # a Hugging Face `tokenizers` file (word-level or a text tower's own)
OPEN_CLIP_TOKENIZER_NAME = "open_clip_tokenizer.json"  # the spec of an open_clip tokenizer (data/clip_tokenizer.py)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageTextModel(nn.Module):
    """Base class of every registered model: the public face over the family's internal one."""

    pad_token_id = 0  # the id `encode_text` reads as padding (collate and the tokenizers pad with it)

    def __init__(self):
        super().__init__()
        if not isinstance(getattr(type(self), "logit_scale", None), property):  # ALBEF / ViLT derive theirs
            self.register_buffer("logit_scale", torch.zeros(()))  # () log 1: no learned scale yet
        self.register_buffer("logit_bias", None)  # SigLIP-trained models only

    # ---- open_clip's contract -------------------------------------------------------------------------

    def image_embedding(self, feats: dict[str, Tensor]) -> Tensor:
        """The first-stage embedding in `encode_image_features`' output: (B, E)."""
        return feats["embed"]

    def text_embedding(self, feats: dict[str, Tensor]) -> Tensor:
        """The first-stage embedding in `encode_text_features`' output: (B, E)."""
        return feats["embed"]

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        """Preprocessed images (B, 3, H, W) -> (B, E) first-stage embeddings (l2-normalised if `normalize`)."""
        if takes_boxes(self):
            raise ModelError(f"{type(self).__name__} reads object boxes with its images: use crossmatch evaluate")
        emb = self.image_embedding(self.encode_image_features({"image": images}))  # (B, E)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        """Token ids (B, L) padded with `pad_token_id` (what the model's tokenizer returns) -> (B, E).
        The attention mask and the caption lengths (GRU packing) are derived from the padding."""
        if tokens.ndim == 1:
            tokens = tokens[None]  # (1, L)
        mask = tokens != self.pad_token_id  # (B, L)
        emb = self.text_embedding(self.encode_text_features({"input_ids": tokens, "attention_mask": mask}))  # (B, E)
        return F.normalize(emb, dim=-1) if normalize else emb

    def forward(self, image: Tensor, text: Tensor) -> tuple[Tensor, ...]:
        """(B, 3, H, W), (B, L) -> (image_features (B, E), text_features (B, E), logit_scale.exp()) as open_clip
        returns them (l2-normalised), plus logit_bias for SigLIP-trained models."""
        img, txt = self.encode_image(image, normalize=True), self.encode_text(text, normalize=True)
        if self.logit_bias is not None:
            return img, txt, self.logit_scale.exp(), self.logit_bias
        return img, txt, self.logit_scale.exp()

    def share_contrastive_params(self, logit_scale: nn.Parameter, logit_bias: nn.Parameter | None) -> None:
        """Make the contrastive task's learned parameters the model's own (one tensor, two owners)."""
        self._buffers.pop("logit_scale", None)
        self.logit_scale = logit_scale
        if logit_bias is not None:
            self._buffers.pop("logit_bias", None)
            self.logit_bias = logit_bias

    # ---- weights --------------------------------------------------------------------------------------

    def training_only_keys(self) -> list[str]:
        """State-dict keys that only training reads (momentum copies, queues): `save_pretrained` leaves them out."""
        return []

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # Weights written before the model stored its scale (0.1.0) keep the current value; a SigLIP bias in
        # the weights gets its slot; training-only modules absent from a save_pretrained folder keep theirs.
        own = self.state_dict()
        if prefix + "logit_bias" in state_dict and self.logit_bias is None:
            self._buffers["logit_bias"] = torch.zeros(())
        if "logit_scale" in self._buffers and prefix + "logit_scale" not in state_dict:
            state_dict[prefix + "logit_scale"] = own["logit_scale"]
        train_only = self.training_only_keys()
        if train_only and not any(prefix + k in state_dict for k in train_only):
            state_dict.update({prefix + k: own[k] for k in train_only})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    # ---- sentence-transformers' encode ----------------------------------------------------------------

    @torch.no_grad()
    def encode(
        self,
        items: str | Any | Sequence[Any],
        batch_size: int = 32,
        device: str | torch.device | None = None,
        normalize_embeddings: bool = False,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray | Tensor | list[Tensor]:
        """Captions (str) or images (PIL images, pathlib.Path) -> embeddings, as sentence-transformers'
        `SentenceTransformer.encode`: one item gives one vector (E,), a list (N, E); `convert_to_tensor`
        gives one tensor, else `convert_to_numpy` a float32 array, else a list of (E,) tensors. `device`
        (default: where the model is) is where the model runs. One modality per call."""
        from tqdm import tqdm

        single = isinstance(items, (str, Path)) or _is_pil(items)
        batch = [items] if single else list(items)
        kinds = {
            "text" if isinstance(x, str) else "image" if isinstance(x, Path) or _is_pil(x) else None for x in batch
        }
        if None in kinds or len(kinds) > 1:
            got = sorted({type(x).__name__ for x in batch})
            raise DataError(
                f"encode takes captions (str) or images (PIL.Image, pathlib.Path), one kind per call; got {got}"
            )
        preprocess, tokenizer = (self.preprocess, self.tokenizer) if isinstance(self, RunAttached) else (None, None)
        if not callable(preprocess) or not callable(tokenizer):
            raise ModelError("model.encode needs the preprocessing and tokenizer of crossmatch.load / from_pretrained")
        if device is not None:
            self.to(device)
        dev, dtype = next(self.parameters()).device, next(self.parameters()).dtype
        if show_progress_bar is None:
            show_progress_bar = log.getEffectiveLevel() <= logging.INFO and logging.getLogger().level <= logging.INFO
        was_training = self.training
        self.eval()
        out = []
        try:
            for start in tqdm(range(0, len(batch), batch_size), desc="encode", disable=not show_progress_bar):
                part = batch[start : start + batch_size]
                if kinds == {"text"}:
                    emb = self.encode_text(tokenizer(part).to(dev), normalize=normalize_embeddings)  # (b, E)
                else:
                    pixels = torch.stack([preprocess(x) for x in part]).to(dev, dtype)  # (b, 3, H, W)
                    emb = self.encode_image(pixels, normalize=normalize_embeddings)  # (b, E)
                out.append(emb.float())
        finally:
            self.train(was_training)
        emb = torch.cat(out) if out else torch.zeros(0)  # (N, E)
        if convert_to_tensor:
            return emb[0] if single else emb
        if convert_to_numpy:
            arr = emb.cpu().numpy()
            return arr[0] if single else arr
        return emb[0] if single else list(emb)

    # ---- Hugging Face's files -------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write the folder `crossmatch.from_pretrained` reads: model.safetensors (inference weights: no
        momentum copies or queues), config.json (the run config), preprocess.json, the tokenizer file and
        a README.md model card. Returns the folder."""
        from safetensors.torch import save

        cfg, tokenizer = (self.run_config, self.tokenizer) if isinstance(self, RunAttached) else (None, None)
        if cfg is None or tokenizer is None or not hasattr(tokenizer, "to_str"):
            raise ModelError("save_pretrained needs a model from crossmatch.load / create_model_and_transforms")
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        skip = set(self.training_only_keys())
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items() if k not in skip}
        atomic_write(folder / WEIGHTS_NAME, lambda f: f.write(save(tensors, metadata={"format": "pt"})))
        config = dataclasses.asdict(cfg)  # the run config as checkpoints store it (models import no run config)
        write_text(folder / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
        pp = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(self.preprocess or {}).items()}
        write_text(folder / PREPROCESS_NAME, json.dumps(pp, indent=2, sort_keys=True) + "\n")
        text = tokenizer.to_str()
        from crossmatch.data.clip_tokenizer import is_spec

        for name in (TOKENIZER_NAME, OPEN_CLIP_TOKENIZER_NAME):
            (folder / name).unlink(missing_ok=True)  # a folder saved twice keeps one tokenizer file
        write_text(folder / (OPEN_CLIP_TOKENIZER_NAME if is_spec(text) else TOKENIZER_NAME), text)
        write_text(folder / "README.md", model_card(config, getattr(self, "card_metrics", None), len(tensors)))
        return folder

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None) -> str:
        """`save_pretrained` into a new or existing Hugging Face hub repository; returns its URL.
        Needs `huggingface_hub` (the `hub` extra) and a login or `token`."""
        try:
            from huggingface_hub import HfApi
        except ImportError as err:
            raise ModelError(f"push_to_hub needs huggingface_hub, {install_hint('hub')}") from err
        api = HfApi(token=token)
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            api.upload_folder(repo_id=repo_id, folder_path=self.save_pretrained(tmp), commit_message="crossmatch model")
        return str(url)


def _is_pil(x: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a core dependency
        return False
    return isinstance(x, Image.Image)


def model_card(config: dict[str, Any], metrics: dict[str, float] | None, n_tensors: int) -> str:
    """A README.md for a save_pretrained folder: family, data, metrics when known, how to load it."""
    model = config.get("model", {})
    data = config.get("data", {})
    name = model.get("name", "?")
    loss = config.get("loss", {}).get("name", "")
    lines = [
        "---",
        "library_name: crossmatch",
        "tags: [image-text-matching, cross-modal-retrieval, crossmatch]",
        "---",
        "",
        f"# crossmatch model: {name}",
        "",
        f"- family: `{name}`" + (f", trained with the `{loss}` loss" if loss else ""),
        f"- data: `{data.get('root', '?')}` ({data.get('format', '?')}), images {data.get('image_size', '?')} px, "
        f"tokenizer `{data.get('tokenizer', '?')}`",
        f"- files: {WEIGHTS_NAME} ({n_tensors} tensors), {CONFIG_NAME} (the run config), {PREPROCESS_NAME}, "
        "the tokenizer file",
        "",
    ]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
        lines.append("")
    lines += [
        "## How to load",
        "",
        "```python",
        "import crossmatch",
        "",
        'model, preprocess_train, preprocess = crossmatch.create_model_and_transforms("THIS_FOLDER_OR_HUB_ID")',
        'tokenizer = crossmatch.get_tokenizer("THIS_FOLDER_OR_HUB_ID")',
        'text = model.encode_text(tokenizer(["a red circle"]), normalize=True)  # (1, E)',
        "```",
        "",
    ]
    return "\n".join(lines)
