"""Fusion models from pretrained weights, as the papers start them.

- `albef_minilm`: ALBEF (Li et al., "Align before Fuse", NeurIPS 2021). The text encoder is the first half of a
  BERT-family checkpoint's layers, the fusion encoder the second half with a freshly initialised
  cross-attention in each layer (MiniLM-L6: layers 0-2 text, 3-5 fusion, width 384). Image side: a pretrained
  CNN's feature map as tokens (its global average first, then its h*w cells), a new linear projection to the
  width and optional new self-attention layers. Momentum distillation is on, as in the paper.
- `vilt_minilm`: ViLT (Kim et al., ICML 2021) whose single-stream encoder is all of a BERT-family model's
  layers; the patch (or CNN-cell) embeddings and the modality-type embeddings are new.

Both train with the families' own tasks (tasks/albef.py, tasks/vilt.py) and take the checkpoint's WordPiece
tokenizer (`data.tokenizer=minilm`), whose ids carry [CLS] ... [SEP] themselves. Loading is strict and
reported (models/bert.py): `model.init_report` lists every checkpoint tensor used and where it went, every
tensor from the image tower, every new tensor and every momentum copy; the run header prints its summary.

Legend: B batch, C CNN channels, h/w feature-map height/width, R image tokens (h*w), L tokens, D width,
E embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from crossmatch.errors import ModelError
from crossmatch.fields import ranged
from crossmatch.models.albef import ALBEF
from crossmatch.models.bert import (
    BertEmbeddings,
    BertShape,
    BertStack,
    BertText,
    InitReport,
    complete_report,
    embedding_map,
    layer_map,
    load_mapped,
    log_report,
    pooler_map,
    read_checkpoint,
)
from crossmatch.models.frozen_cache import OutputCache, input_key, tower_cache
from crossmatch.models.layers import feature_map_to_regions, l2norm
from crossmatch.models.pretrained import ImageTower, depths_by_blocks
from crossmatch.models.registry import register_model
from crossmatch.models.transformer import ImageEmbedding, PatchEmbed, initial_positions
from crossmatch.models.vilt import ViLT


class TowerFeatures(nn.Module):
    """A pretrained image tower's spatial output: a CNN's feature map (B, C, h, w), or a timm ViT's tokens
    (B, N, C). A frozen tower runs without gradients, and its output for the last batch is kept (the momentum
    encoders read the same images right after), and with `cache` every image's by content, in memory (exact: a
    frozen tower is in eval mode, so an image's output does not depend on its batch; `frozen_cache.tower_cache`,
    the cache vse_pretrained's towers get too)."""

    def __init__(self, name: str, pretrained: bool, freeze: bool, cache: bool = False):
        super().__init__()
        self.tower = ImageTower(name, pretrained, freeze)
        self.cache: OutputCache | None = tower_cache(self.tower, name) if cache and freeze else None
        self._last: tuple[Tensor, Tensor] | None = None

    def spatial(self, image: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, C, h, w) feature map or (B, N, C) tokens."""
        return self.tower.body.forward_features(image) if self.tower.is_timm else self.tower.feature_map(image)

    @torch.no_grad()
    def grid_size(self, image_size: int) -> int:
        """R, the cells (h * w) or tokens (N) of a square image of side `image_size` (a dry run in eval mode,
        so BatchNorm statistics stay)."""
        was = self.tower.training
        self.tower.eval()
        out = self.spatial(torch.zeros(1, 3, image_size, image_size))
        self.tower.train(was)
        return out.shape[2] * out.shape[3] if out.ndim == 4 else out.shape[1]

    def forward(self, image: Tensor) -> Tensor:
        if not self.tower.frozen:
            return self.spatial(image)
        if self._last is not None and self._last[0] is image:
            return self._last[1]
        with torch.no_grad():
            if self.cache is not None:
                out = self.cache([input_key(x) for x in image], lambda rows: self.spatial(image[rows]))
            else:
                out = self.spatial(image)  # (B, C, h, w) or (B, N, C)
        self._last = (image, out)
        return out


class ImageTokens(nn.Module):
    """A feature map as tokens: [global average; h*w cells] -> Linear(C, D) + learned positions, LayerNorm,
    then `depth` new BERT-shaped self-attention layers. (B, C, h, w) -> (B, 1+R, D); token 0 stands for the
    whole image (ALBEF's image [CLS]). A ViT's (B, N, C) tokens go the same way ([their mean; the N tokens]).
    `pos_init` is where the learned positions start (`initial_positions`)."""

    def __init__(self, channels: int, n_tokens: int, shape: BertShape, depth: int, dropout: float,
                 pos_init: str = "normal"):  # fmt: skip
        super().__init__()
        D = shape.width
        self.n_tokens = n_tokens
        self.proj = nn.Linear(channels, D)
        self.pos = nn.Parameter(initial_positions(n_tokens, D, pos_init))
        self.norm, self.drop = nn.LayerNorm(D, eps=shape.eps), nn.Dropout(dropout)
        self.layers = BertStack(shape, depth, dropout)

    def forward(self, fmap: Tensor) -> Tensor:
        regions = feature_map_to_regions(fmap) if fmap.ndim == 4 else fmap  # (B, C, h, w) -> (B, R, C)
        if regions.shape[1] != self.n_tokens:
            raise ModelError(f"image gives {regions.shape[1]} tokens but the model was built for {self.n_tokens}")
        x = torch.cat([regions.mean(1, keepdim=True), regions], 1)  # (B, 1+R, C): global average first
        return self.layers(self.drop(self.norm(self.proj(x) + self.pos)))  # (B, 1+R, D)


class CnnImageEmbed(nn.Module):
    """TowerFeatures + ImageTokens without layers: (B, 3, H, W) -> (B, 1+R, D) (ViLT's image input)."""

    def __init__(self, features: TowerFeatures, tokens: ImageTokens):
        super().__init__()
        self.features, self.tokens = features, tokens

    def forward(self, image: Tensor) -> Tensor:
        return self.tokens(self.features(image))


def _check_vocab(vocab_size: int, shape: BertShape, name: str) -> None:
    if vocab_size and vocab_size != shape.vocab_size:
        raise ModelError(
            f"the tokenizer has {vocab_size} ids but text checkpoint {name!r} has {shape.vocab_size}: "
            f"set data.tokenizer to the checkpoint's own (e.g. data.tokenizer={name})"
        )


def _tower_depths(prefix: str, features: TowerFeatures) -> dict[str, tuple[int, int]]:
    """A trainable pretrained image tower's `layer_depths` (its own depth scale); none for a frozen one."""
    tower = features.tower
    if tower.frozen:
        return {}
    return depths_by_blocks([(prefix + n, p) for n, p in tower.named_parameters()], tower.blocks())


def _text_tokens(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The caption ids as the WordPiece tokenizer made them ([CLS] first) and the mask: (B, L), (B, L) bool."""
    return batch["input_ids"], batch["attention_mask"].bool()


@dataclass
class AlbefPretrainedConfig:
    text_checkpoint: str = "minilm"  # BERT-family checkpoint folder, packaged short name or hub id
    # layers of the text encoder; 0 = the first half (ALBEF); the rest are fusion layers
    text_layers: int = ranged(0, min=0)
    image_tower: str = "efficientnet_lite0"  # tower whose feature map (or ViT tokens) gives the image tokens:
    # efficientnet_lite0 (packaged) | torchvision.resnet18/50 | any timm name (its weights are downloaded)
    # new BERT-shaped self-attention layers over the projected image tokens (0: none)
    image_layers: int = ranged(1, min=0)
    image_pos_init: str = "normal"  # the learned image positions start at: normal (N(0, 0.02), ALBEF's ViT) |
    # sincos (MAE's 2D sine-cosine of each cell's row and column, at the scale of the content; square grids)
    freeze_image: bool = True  # the CNN stays fixed in eval mode (on CPU its backward would dominate a step)
    freeze_text: bool = False  # True: text embeddings + text layers fixed (the fusion layers still train)
    pretrained: bool = True  # load the checkpoint and CNN weights (False: the architectures, randomly initialised)
    image_size: int = ranged(128, min=1)  # input side; fixes R (EfficientNet-Lite0, stride 32: 128 px -> 4 x 4 cells)
    embed_dim: int = ranged(256, min=1)  # ITC embedding E
    dropout: float = ranged(0.1, min=0, max=1)  # BERT's hidden and attention dropout
    temp: float = ranged(0.07, above=0)  # initial ITC temperature (learned, clamped to [0.001, 0.5])
    text_pool: str = "cls"  # ITC text feature: cls (ALBEF: the text half's [CLS]) | mean (of the real tokens, the
    # pooling MiniLM was trained with: its layer-2 [CLS] is nearly one vector for every caption, see the recipe)
    momentum: bool = True  # momentum encoders, queues and momentum distillation (on, as the paper starts)
    momentum_decay: float = ranged(0.995, min=0, max=1)  # EMA factor of the momentum encoders
    queue_size: int = ranged(4096, min=0)  # momentum feature queue length (65,536 in the paper)
    rerank_score: str = "itm"  # score_pairs: itm (ALBEF) | itm+itc (LAVIS/BLIP)
    cross_attn_lr: str = "new"  # the new cross-attention inside the pretrained fusion layers trains at: new
    # (train.lr, with the other new tensors) | tower (train.tower_lr and layer_decay of its layer, as the paper
    # trains every fusion tensor at one lr); at train.lr 1e-3 it grows until the fused [CLS] ignores the caption
    cache_frozen: bool = False  # keep the frozen CNN's per-image feature maps in memory (with data.augment=false)
    vocab_size: int = 0  # set at build time from the tokenizer; must be the checkpoint's (0: unchecked)
    mlm: bool = False  # not supported here: the MLM task masks with the word-level tokenizer's special ids


class AlbefPretrained(ALBEF):
    """ALBEF with BERT-family text/fusion layers and a pretrained CNN image tower (see the module docstring).

    Frozen by default: the CNN (`freeze_image`); trainable: the text embeddings and layers, the fusion layers with
    their new cross-attention, the image projection and image layers, the ITC projections and the ITM head.
    The momentum copies (`*_m`) are of the trainable encoders; a frozen CNN is shared by both.
    `init_report` (an InitReport) says where every tensor came from.
    """

    def __init__(self, cfg: AlbefPretrainedConfig, load_weights: bool = True):
        nn.Module.__init__(self)  # ALBEF's own constructor builds the from-scratch towers
        if cfg.rerank_score not in ("itm", "itm+itc"):
            raise ModelError(f"unknown rerank_score {cfg.rerank_score!r}; known: itm, itm+itc")
        if cfg.text_pool not in ("cls", "mean"):
            raise ModelError(f"unknown text_pool {cfg.text_pool!r}; known: cls, mean")
        if cfg.cross_attn_lr not in ("new", "tower"):
            raise ModelError(f"unknown cross_attn_lr {cfg.cross_attn_lr!r}; known: new, tower")
        if cfg.mlm:
            raise ModelError("model.mlm is not supported for albef_minilm (MLM masks with word-level special ids)")
        self.config = cfg
        load = load_weights and cfg.pretrained
        shape, state, source = read_checkpoint(cfg.text_checkpoint, load)
        _check_vocab(cfg.vocab_size, shape, cfg.text_checkpoint)
        n_text = cfg.text_layers or shape.layers // 2
        if not 0 < n_text < shape.layers:
            raise ModelError(f"model.text_layers={n_text}: the checkpoint has {shape.layers} layers, fusion needs >= 1")
        D, p = shape.width, cfg.dropout
        self.image_tower = TowerFeatures(cfg.image_tower, load, cfg.freeze_image, cfg.cache_frozen)
        self.preprocess = self.image_tower.tower.preprocess  # filled into data.* by runs.resolve_preprocess
        n_cells = self.image_tower.grid_size(cfg.image_size)
        self.visual_encoder = ImageTokens(
            self.image_tower.tower.out_dim, n_cells, shape, cfg.image_layers, p, cfg.image_pos_init
        )
        self.text_encoder = BertText(shape, n_text, p)
        self.fusion_encoder = BertStack(shape, shape.layers - n_text, p, cross=True)
        self.vision_proj, self.text_proj = nn.Linear(D, cfg.embed_dim), nn.Linear(D, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        self.itm_pooler = nn.Sequential(nn.Linear(D, D), nn.Tanh())  # BERT's pooler: its NSP head is pair matching
        self.itm_head = nn.Linear(D, 2)
        if state is not None:
            mapping = embedding_map("text_encoder.embeddings") | pooler_map("itm_pooler.0")
            for i in range(shape.layers):
                dst = f"text_encoder.encoder.layers.{i}" if i < n_text else f"fusion_encoder.layers.{i - n_text}"
                mapping |= layer_map(i, dst)
            report = load_mapped(self, state, mapping, source)
        else:
            report = InitReport(f"{source} (architecture only: weights not loaded)")
        if cfg.freeze_text:
            self.text_encoder.requires_grad_(False)
        self.momentum_names = ["visual_encoder", "vision_proj", "text_encoder", "text_proj"]
        if not cfg.freeze_image:
            self.momentum_names.append("image_tower")
        if cfg.momentum:
            self._init_momentum()
        image_src = f"{cfg.image_tower} pretrained weights" if load else f"{cfg.image_tower} (random init)"
        copies = {f"{n}_m.": f"{n}." for n in self.momentum_names}
        other = {"image_tower.": image_src} if load else {}
        self.init_report = complete_report(report, self, other, copies)
        log_report("albef_minilm", self.init_report)

    def layer_depths(self) -> dict[str, tuple[int, int]]:
        """Pretrained parameter name -> (depth, n + 1), n the checkpoint's layers, for `train.tower_lr` and
        `train.layer_decay` (engine/optim.py): embeddings 0, checkpoint layer i at i + 1 (MiniLM-L6: text layers
        0-2 at 1-3, fusion layers 3-5 at 4-6, without their new cross-attention unless `cross_attn_lr` is tower),
        BERT's pooler n + 1 (the top). A trainable image tower (freeze_image=False) has its own scale, as in
        vse_pretrained. Not listed, so at train.lr: the new tensors (cross-attention by default, image projection
        and layers, ITC projections, ITM head, temp)."""
        text, fusion = self.text_encoder, self.fusion_encoder
        keep_cross = self.config.cross_attn_lr == "tower"
        named = [(f"text_encoder.{n}", p) for n, p in text.named_parameters()]
        fused = fusion.named_parameters()
        named += [(f"fusion_encoder.{n}", p) for n, p in fused if keep_cross or ".cross_" not in f".{n}"]
        named += [(f"itm_pooler.{n}", p) for n, p in self.itm_pooler.named_parameters()]
        return depths_by_blocks(named, [*text.encoder.layers, *fusion.layers]) | _tower_depths(
            "image_tower.tower.", self.image_tower
        )

    def encode_image_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch["image"] (B, 3, H, W) -> {"embed": (B, E) l2-normalised, "tokens": (B, 1+R, D), "mask": (B, 1+R)}."""
        tokens = self.visual_encoder(self.image_tower(batch["image"]))  # (B, 1+R, D)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)  # (B, 1+R)
        return {"embed": l2norm(self.vision_proj(tokens[:, 0])), "tokens": tokens, "mask": mask}

    def encode_text_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch["input_ids"], batch["attention_mask"] (B, L), [CLS] first -> {"embed": (B, E), "tokens": (B, L, D),
        "mask": (B, L)}."""
        ids, mask = _text_tokens(batch)
        tokens = self.text_encoder(ids, mask)  # (B, L, D)
        return {"embed": l2norm(self.text_proj(self.text_feature(tokens, mask))), "tokens": tokens, "mask": mask}

    def text_feature(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """The ITC text feature of the text half's tokens (B, L, D) with mask (B, L): (B, D), by `text_pool`."""
        if self.config.text_pool == "cls":
            return tokens[:, 0]
        m = mask[..., None].to(tokens.dtype)  # (B, L, 1)
        return (tokens * m).sum(1) / m.sum(1).clamp_min(1)  # (B, D)

    def itm_logits(self, img: dict[str, Tensor], txt: dict[str, Tensor]) -> Tensor:
        """Row-aligned pairs -> (B, 2) ITM logits (index 1 = match) from the pooled fused [CLS]."""
        fused = self.fuse(img, txt["tokens"], txt["mask"])  # (B, L, D)
        return self.itm_head(self.itm_pooler(fused[:, 0]))  # (B, D) -> (B, 2)

    @torch.no_grad()
    def momentum_features(self, batch: dict[str, Tensor], update: bool = True) -> tuple[Tensor, Tensor]:
        """EMA-update the momentum copies (unless `update` is False), then encode the batch with them:
        (B, E), (B, E) l2-normalised image and text features."""
        m = self.config.momentum_decay
        if update:
            for name in self.momentum_names:
                own, ema = getattr(self, name).parameters(), getattr(self, name + "_m").parameters()
                for p, p_m in zip(own, ema, strict=True):
                    p_m.lerp_(p, 1 - m)  # p_m = m * p_m + (1 - m) * p
        tower = self.image_tower_m if "image_tower" in self.momentum_names else self.image_tower
        img_feat = l2norm(self.vision_proj_m(self.visual_encoder_m(tower(batch["image"]))[:, 0]))  # (B, E)
        ids, mask = _text_tokens(batch)
        txt_feat = l2norm(self.text_proj_m(self.text_feature(self.text_encoder_m(ids, mask), mask)))  # (B, E)
        return img_feat, txt_feat


@dataclass
class ViltPretrainedConfig:
    text_checkpoint: str = "minilm"  # BERT-family checkpoint folder, packaged short name or hub id
    image_tower: str = "patch"  # patch: ViLT's linear patch embedding (new) | a CNN whose feature map gives tokens
    patch_size: int = ranged(16, min=1)  # patch side (image_tower == "patch")
    freeze_image: bool = True  # a CNN image tower stays fixed in eval mode
    image_pos_init: str = "normal"  # the learned patch / cell positions start at: normal | sincos (as albef_minilm)
    pretrained: bool = True  # load the checkpoint (and CNN) weights (False: the architecture, random init)
    image_size: int = ranged(64, min=1)  # input side; fixes R
    embed_dim: int = ranged(256, min=1)  # E of the cheap first-stage embedding head
    dropout: float = ranged(0.1, min=0, max=1)  # BERT's hidden and attention dropout
    temp: float = ranged(0.07, above=0)  # initial ITC temperature of the cheap head (learned, clamped to [0.001, 0.5])
    cache_frozen: bool = False  # keep a frozen CNN's per-image feature maps in memory (with data.augment=false)
    vocab_size: int = 0  # set at build time from the tokenizer; must be the checkpoint's (0: unchecked)


class ViltPretrained(ViLT):
    """ViLT whose single-stream encoder is every layer of a BERT-family checkpoint (embeddings and pooler
    too); the image embedding, the modality-type embedding, the ITM head and the cheap head are new.
    Everything trains, except a CNN image tower with `freeze_image`. `init_report` says where every
    tensor came from."""

    def __init__(self, cfg: ViltPretrainedConfig, load_weights: bool = True):
        nn.Module.__init__(self)  # ViLT's own constructor builds the from-scratch encoder
        self.config = cfg
        load = load_weights and cfg.pretrained
        shape, state, source = read_checkpoint(cfg.text_checkpoint, load)
        _check_vocab(cfg.vocab_size, shape, cfg.text_checkpoint)
        D, p = shape.width, cfg.dropout
        if cfg.image_tower == "patch":
            self.image_embed = ImageEmbedding(PatchEmbed(cfg.patch_size, D), cfg.image_size, D, p, cfg.image_pos_init)
            self.preprocess = None  # pixels as the data section says (no pretrained image statistics)
        else:
            features = TowerFeatures(cfg.image_tower, load, cfg.freeze_image, cfg.cache_frozen)
            n_cells = features.grid_size(cfg.image_size)
            tokens = ImageTokens(features.tower.out_dim, n_cells, shape, 0, p, cfg.image_pos_init)
            self.image_embed = CnnImageEmbed(features, tokens)
            self.preprocess = features.tower.preprocess
        self.text_embed = BertEmbeddings(shape, p)
        self.type_embed = nn.Embedding(2, D)  # modality type: 0 text, 1 image (new, as in ViLT)
        nn.init.normal_(self.type_embed.weight, std=0.02)
        self.encoder = BertStack(shape, shape.layers, p)
        self.pooler = nn.Sequential(nn.Linear(D, D), nn.Tanh())  # BERT's pooler on the first token
        self.itm_head = nn.Linear(D, 2)
        self.image_proj, self.text_proj = nn.Linear(D, cfg.embed_dim), nn.Linear(D, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        if state is not None:
            mapping = embedding_map("text_embed") | pooler_map("pooler.0")
            for i in range(shape.layers):
                mapping |= layer_map(i, f"encoder.layers.{i}")
            report = load_mapped(self, state, mapping, source)
        else:
            report = InitReport(f"{source} (architecture only: weights not loaded)")
        cnn = cfg.image_tower != "patch" and load
        other = {"image_embed.features.": f"{cfg.image_tower} pretrained weights"} if cnn else {}
        self.init_report = complete_report(report, self, other, {})
        log_report("vilt_minilm", self.init_report)

    def encode_text_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch["input_ids"], batch["attention_mask"] (B, L), [CLS] first -> {"embed": (B, E), "tokens": (B, L, D)
        embedded words (input of the joint pass), "mask": (B, L)}."""
        ids, mask = _text_tokens(batch)
        tokens = self.text_embed(ids) + self.type_embed.weight[0]  # (B, L, D)
        pooled = self.encoder(tokens, mask)[:, 0]  # (B, D): text-only pass, text [CLS]
        return {"embed": l2norm(self.text_proj(pooled)), "tokens": tokens, "mask": mask}

    def layer_depths(self) -> dict[str, tuple[int, int]]:
        """Pretrained parameter name -> (depth, n + 1) for `train.tower_lr` and `train.layer_decay` (engine/optim.py):
        BERT's embeddings 0, layer i of n at i + 1, its pooler n + 1 (the top); a trainable CNN image tower has its own
        scale. Not listed, so at train.lr: the new tensors (image embedding, modality-type embedding, ITM head,
        the cheap head's projections and temperature)."""
        named = [(f"text_embed.{n}", p) for n, p in self.text_embed.named_parameters()]
        named += [(f"encoder.{n}", p) for n, p in self.encoder.named_parameters()]
        named += [(f"pooler.{n}", p) for n, p in self.pooler.named_parameters()]
        out = depths_by_blocks(named, list(self.encoder.layers))
        if isinstance(self.image_embed, CnnImageEmbed):
            out |= _tower_depths("image_embed.features.tower.", self.image_embed.features)
        return out

    # encode_image_features, itm_logits, similarity, score_pairs and forward come from ViLT.


@register_model(AlbefPretrainedConfig, loads_weights=True)
def albef_minilm(cfg: AlbefPretrainedConfig, load_weights: bool) -> AlbefPretrained:
    """ALBEF from MiniLM-L6 (layers 0-2 text, 3-5 fusion + new cross-attention) and a frozen EfficientNet-Lite0
    feature map as image tokens; momentum distillation on. Train with `data.tokenizer=minilm`."""
    return AlbefPretrained(cfg, load_weights)


@register_model(ViltPretrainedConfig, loads_weights=True)
def vilt_minilm(cfg: ViltPretrainedConfig, load_weights: bool) -> ViltPretrained:
    """ViLT whose single-stream encoder is MiniLM-L6's 6 layers; patch and modality-type embeddings new.
    Train with `data.tokenizer=minilm`."""
    return ViltPretrained(cfg, load_weights)
