"""CLIP-family dual encoders from open_clip (Radford et al., "Learning Transferable Visual Models From
Natural Language Supervision", ICML 2021; Ilharco et al., OpenCLIP, 2021; Cherti et al., "Reproducible
scaling laws for contrastive language-image learning", CVPR 2023): any open_clip architecture (CLIP,
SigLIP, CoCa towers, ...) behind crossmatch's retrieval interface.

`model.name=clip model.arch=ViT-B-32 model.pretrained=laion2b_s34b_b79k` builds open_clip's architecture and
loads the tag's weights (they download from the Hugging Face hub the first time). `model.arch_config` takes
a custom open_clip model config instead ({embed_dim, vision_cfg, text_cfg}, as open_clip's JSON files),
which is how the tests and the CPU recipe build small random-initialised models offline.

The model brings its own tokenizer (crossmatch.data.clip_tokenizer, saved with the run) and image
preprocessing (`preprocess`: size, mean/std, interpolation, resize mode from open_clip's pretrained config),
which a run resolves into its `data` section. open_clip's own temperature stays frozen: the contrastive
objective (tasks/contrastive.py) learns the model's `logit_scale`, starting from the pretrained one
(`contrastive_init`). `pad_token_id` is the tokenizer's pad id, which `encode_text` reads as padding.

Partial training: `lock_image` / `lock_text` freeze a tower (LiT, Zhai et al., CVPR 2022), except its last
`unlocked_image_groups` layer groups / `unlocked_text_layers` layers (open_clip's --lock-image-unlocked-groups,
--lock-text-unlocked-layers); `layer_depths` feeds layer-wise lr decay (`train.layer_decay`, engine/optim.py).

Legend: B batch, C context length, L tokens of a caption, D width, E embedding, h/w patch grid.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from crossmatch.data.clip_tokenizer import OpenClipTokenizer, open_clip_module
from crossmatch.errors import ModelError
from crossmatch.fields import ranged
from crossmatch.models.dual_encoder import JointEmbedding
from crossmatch.models.hub import hub_error, short_hub_timeouts
from crossmatch.models.layers import l2norm
from crossmatch.models.registry import model_config, register_model, register_tokenizer

# open_clip's preprocessing -> crossmatch's data.resize (open_clip's 'longest' pads: not offered here)
RESIZE = {"shortest": "shortest", "squash": "squash"}
SCHEMAS = ("hf-hub:", "local-dir:")  # open_clip's model names that model.arch takes besides its built-in ones


@dataclass
class ClipConfig:
    arch: str = (
        "ViT-B-32"  # an open_clip architecture name (open_clip.list_models()), hf-hub:org/repo or local-dir:/path
    )
    pretrained: str = ""  # an open_clip pretrained tag of `arch` (e.g. laion2b_s34b_b79k) or a weights file; "" random
    arch_config: dict | None = None  # a custom open_clip model config {embed_dim, vision_cfg, text_cfg}; replaces arch
    lock_image: bool = False  # freeze the image tower (LiT) ...
    unlocked_image_groups: int = ranged(0, min=0)  # ... except its last N layer groups (the last one is the projection)
    lock_text: bool = False  # freeze the text tower ...
    unlocked_text_layers: int = ranged(0, min=0)  # ... except its last N layer groups
    pad_id: int = 0  # set at build time from the tokenizer: captions are padded to the context length with it


def tokenizer_spec(cfg: ClipConfig) -> tuple[str, dict[str, Any]]:
    """(arch, text_cfg) that determine the tokenizer of a config."""
    if cfg.arch.startswith(SCHEMAS) and not cfg.arch_config:
        return "", dict(schema_source(cfg.arch)[0].get("text_cfg", {}))
    if cfg.arch_config:
        return "", dict(cfg.arch_config.get("text_cfg", {}))
    model_cfg = open_clip_module().get_model_config(cfg.arch)
    if model_cfg is None:
        raise unknown_arch(cfg.arch)
    return cfg.arch, dict(model_cfg.get("text_cfg", {}))


def unknown_arch(arch: str) -> ModelError:
    return ModelError(f"unknown open_clip arch {arch!r}; known: {', '.join(open_clip_module().list_models())}")


@contextlib.contextmanager
def _quiet(level: int):
    """Silence open_clip's root-logger records up to `level`: its 'initialized randomly' warning is not
    true when a checkpoint follows, and its download errors are reported here in one line."""
    previous = logging.root.manager.disable
    logging.disable(max(level, previous))
    try:
        yield
    finally:
        logging.disable(previous)


def _preprocess(open_clip, model: nn.Module, extra: dict | None = None) -> dict[str, Any]:
    """open_clip's preprocessing of a built model (plus a pretrained tag's) -> crossmatch's data fields."""
    pp = {**open_clip.get_model_preprocess_cfg(model), **{k: v for k, v in (extra or {}).items() if v is not None}}
    size = pp.get("size", 224)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ModelError(f"open_clip input size {tuple(size)} is not square; crossmatch feeds square images")
        size = size[0]
    interpolation = pp.get("interpolation", "bicubic")
    return {
        "size": int(size),
        "mean": [float(v) for v in pp.get("mean", open_clip.OPENAI_DATASET_MEAN)],
        "std": [float(v) for v in pp.get("std", open_clip.OPENAI_DATASET_STD)],
        "interpolation": interpolation if interpolation in ("bilinear", "bicubic") else "bicubic",
        "resize": RESIZE.get(pp.get("resize_mode", "shortest"), "shortest"),
    }


def build_open_clip(cfg: ClipConfig, load_weights: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The open_clip model of a config and its preprocessing.

    Raises:
        ModelError: unknown arch or pretrained tag (listing what exists), or weights that cannot be fetched.
    """
    open_clip = open_clip_module()
    if cfg.arch.startswith(SCHEMAS) and not cfg.arch_config:
        model_cfg, pp_cfg, weights = schema_source(cfg.arch)
        cfg.arch_config = model_cfg  # the architecture travels with the run: rebuilding it needs no download
        model, _ = build_open_clip(cfg, load_weights)
        if load_weights and weights:
            open_clip.load_checkpoint(model, weights)
        open_clip.set_model_preprocess_cfg(
            model, {**_default_preprocess(open_clip), "size": model.visual.image_size, **pp_cfg}
        )
        return model, _preprocess(open_clip, model)
    if cfg.arch_config:
        model_cfg = copy.deepcopy(dict(cfg.arch_config))
        custom_text = model_cfg.pop("custom_text", False) or "hf_model_name" in model_cfg.get("text_cfg", {})
        cls = (
            open_clip.CoCa
            if "multimodal_cfg" in model_cfg
            else open_clip.CustomTextCLIP
            if custom_text
            else open_clip.CLIP
        )
        try:
            model = cls(**model_cfg)
        except (TypeError, ValueError, AssertionError) as err:
            raise ModelError(f"model.arch_config is not an open_clip model config: {err}") from err
        open_clip.set_model_preprocess_cfg(model, {**_default_preprocess(open_clip), "size": model.visual.image_size})
        return model, _preprocess(open_clip, model)
    if open_clip.get_model_config(cfg.arch) is None:
        raise unknown_arch(cfg.arch)
    tag_cfg = {}
    if cfg.pretrained and not Path(cfg.pretrained).is_file():
        tags = open_clip.list_pretrained_tags_by_model(cfg.arch)
        if cfg.pretrained not in tags:
            known = ", ".join(tags) or "none (random init only)"
            raise ModelError(f"unknown open_clip pretrained tag {cfg.pretrained!r} for {cfg.arch}; known: {known}")
        pc = open_clip.get_pretrained_cfg(cfg.arch, cfg.pretrained)
        tag_cfg = {k: pc.get(k) for k in ("mean", "std", "interpolation", "resize_mode")}
    if not (load_weights and cfg.pretrained):
        with _quiet(logging.NOTSET if load_weights else logging.WARNING):
            model = open_clip.create_model(cfg.arch, pretrained=None)
        return model, _preprocess(open_clip, model, tag_cfg)
    with _quiet(logging.ERROR), short_hub_timeouts() as hub:
        try:
            model = open_clip.create_model(cfg.arch, pretrained=cfg.pretrained)
        except Exception as err:  # open_clip wraps hub errors in RuntimeError; the HTTP clients raise their own
            raise ModelError(hub_error(f"open_clip weights {cfg.arch}/{cfg.pretrained}", err, hub.offline)) from err
    return model, _preprocess(open_clip, model, tag_cfg)


def schema_source(arch: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """open_clip's `hf-hub:org/repo` or `local-dir:/path` name -> (model_cfg, preprocess_cfg, weights file or "").
    A hub repository's files download (once) as open_clip fetches them: open_clip_config.json and the weights.

    Raises:
        ModelError: a folder without open_clip_config.json, or a hub repository that cannot be fetched.
    """
    open_clip = open_clip_module()
    schema, ident = arch.split(":", 1)
    if schema == "local-dir":
        folder = Path(ident)
        config_file = folder / "open_clip_config.json"
        if not config_file.is_file():
            raise ModelError(f"model.arch={arch}: no open_clip_config.json in {folder}")
        spec = json.loads(config_file.read_text())
        weights = next(
            (
                str(p)
                for p in sorted(folder.glob("open_clip_model.safetensors"))
                + sorted(folder.glob("open_clip_pytorch_model.bin"))
            ),
            "",
        )
    else:
        with short_hub_timeouts() as hub:
            try:
                spec = open_clip.factory._get_hf_config(ident)
                weights = str(open_clip.pretrained.download_pretrained_from_hf(ident))
            except Exception as err:  # huggingface_hub raises many kinds (offline, timeouts, 401, 404, ...)
                raise ModelError(hub_error(f"open_clip model {arch}", err, hub.offline)) from err
    if "model_cfg" not in spec:
        raise ModelError(f"model.arch={arch}: its open_clip_config.json has no model_cfg")
    return spec["model_cfg"], spec.get("preprocess_cfg", {}), weights


def _default_preprocess(open_clip) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(open_clip.transform.PreprocessCfg())


class ClipImageTower(nn.Module):
    """What `crossmatch features` reads of an open_clip ViT: the last block's patch tokens as a (B, D, h, w) map."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "conv1"):
            raise ModelError("this open_clip image tower is not a ViT with a patch grid (features need one)")
        self.visual = visual

    def feature_map(self, image: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, D, h, w)."""
        out = self.visual.forward_intermediates(image, indices=1, intermediates_only=True, output_fmt="NCHW")
        return out["image_intermediates"][-1]

    def forward(self, image: Tensor) -> Tensor:
        return self.feature_map(image).mean((2, 3))  # (B, D)


class ClipModel(JointEmbedding):
    """An open_clip model: encode_image_features / encode_text_features -> {"embed": (B, E)} l2-normalised;
    score = cosine. Public face: open_clip's own `encode_image` / `encode_text` of the wrapped model, normalised."""

    def __init__(self, cfg: ClipConfig, load_weights: bool = True):
        super().__init__()
        self.config = cfg
        self.clip, self.preprocess = build_open_clip(cfg, load_weights)
        # The objective learns its own temperature (tasks/contrastive.py); open_clip's stays as loaded.
        self.contrastive_init = {}
        for name in ("logit_scale", "logit_bias"):
            p = getattr(self.clip, name, None)
            if isinstance(p, nn.Parameter):
                p.requires_grad_(False)
                if cfg.pretrained:
                    self.contrastive_init[name] = float(p.detach().reshape(-1)[0])
        # open_clip's `logit_scale` / `logit_bias` on the public face: the pretrained values until trained
        for name, value in self.contrastive_init.items():
            setattr(self, name, torch.tensor(value))
        self.context_length = int(getattr(self.clip, "context_length", 0) or self.clip.text.context_length)
        if cfg.lock_image:
            self.clip.lock_image_tower(unlocked_groups=cfg.unlocked_image_groups)
        if cfg.lock_text:
            self.clip.lock_text_tower(unlocked_layers=cfg.unlocked_text_layers)

    @property
    def pad_token_id(self) -> int:
        return self.config.pad_id

    def encode_image_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch["image"] (B, 3, S, S), preprocessed as `preprocess` says -> {"embed": (B, E)}."""
        return {"embed": l2norm(self.clip.encode_image(batch["image"]))}

    def encode_text_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch["input_ids"], batch["attention_mask"] (B, L), L <= C -> {"embed": (B, E)}. Captions are
        re-padded with the tokenizer's pad id to the context length C the text tower was built for."""
        ids, mask = batch["input_ids"], batch["attention_mask"]  # (B, L)
        B, L = ids.shape
        if L > self.context_length:
            raise ModelError(f"captions of {L} tokens exceed the text tower's context length {self.context_length}")
        full = ids.new_full((B, self.context_length), self.config.pad_id)  # (B, C)
        full[:, :L] = ids.masked_fill(~mask.bool(), self.config.pad_id)
        return {"embed": l2norm(self.clip.encode_text(full))}  # (B, E)

    # similarity and forward come from JointEmbedding.

    def make_tokenizer(self) -> OpenClipTokenizer:
        return OpenClipTokenizer(*tokenizer_spec(self.config))

    @property
    def image_tower(self) -> ClipImageTower:
        return ClipImageTower(self.clip.visual)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.clip.set_grad_checkpointing(enable)

    def layer_depths(self) -> dict[str, tuple[int, int]]:
        """Parameter name -> (depth, tower depth) for layer-wise lr decay: embeddings 0, block i -> i + 1,
        the tower's final norm and projection n + 1 (full lr). Image tower: names under clip.visual."""
        block = re.compile(r"\.(?:resblocks|blocks|layers|layer)\.(\d+)\.")
        embed = re.compile(r"(embed|conv1|ln_pre|cls_token|class_embedding|patch_embed|pos_embed)")
        towers: dict[str, dict[str, int | None]] = {"image": {}, "text": {}}
        for name, _ in self.named_parameters():
            tower = "image" if name.startswith("clip.visual.") else "text"
            m = block.search(name)
            towers[tower][name] = int(m.group(1)) + 1 if m else (0 if embed.search(name) else None)
        out = {}
        for names in towers.values():
            top = max((d for d in names.values() if d is not None), default=0) + 1
            out.update({n: (top if d is None else d, top) for n, d in names.items()})
        return out


TINY_ARCH = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}


@register_model(ClipConfig, loads_weights=True)
def clip(cfg: ClipConfig, load_weights: bool) -> ClipModel:
    """Any open_clip architecture (`model.arch`, default ViT-B-32) and pretrained tag (`model.pretrained`)."""
    return ClipModel(cfg, load_weights)


@register_model(ClipConfig, {"arch": "", "arch_config": TINY_ARCH}, loads_weights=True)
def tiny_clip(cfg: ClipConfig, load_weights: bool) -> ClipModel:
    """A two-block ViT (32 px, patch 8) and a two-layer text transformer (CLIP's BPE, 16 tokens), for tests."""
    return ClipModel(cfg, load_weights)


@register_tokenizer("clip", "tiny_clip")
def clip_tokenizer(name: str, **overrides) -> OpenClipTokenizer:
    """open_clip's tokenizer for the architecture a config names (no model is built)."""
    return OpenClipTokenizer(*tokenizer_spec(model_config(name, **overrides)))
