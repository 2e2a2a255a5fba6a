"""ALBEF, "Align before Fuse" (Li et al., NeurIPS 2021), for image-text retrieval.

An image encoder (a small ViT from scratch, or a CNN/ResNet grid as a hybrid ViT), a text encoder, and
a fusion encoder whose layers cross-attend from the text tokens to the image tokens. Training
(crossmatch.tasks.albef):
  - ITC: projected, l2-normalised [CLS] features, learnable temperature, all captions of an image are
    positives; optional momentum encoders with feature queues and momentum distillation.
  - ITM: a 2-way head on the fused [CLS], with hard negatives drawn from the in-batch ITC similarities.
  - MLM (optional): masked language modelling on the fusion output.
Retrieval: `similarity` is the cheap ITC cosine for all pairs; `score_pairs` re-ranks row-aligned pairs
with the ITM positive logit (optionally plus the ITC cosine, as LAVIS/BLIP do).

Legend: B batch, R image patches, L tokens (with [CLS]), D width, E embedding, H heads, V vocabulary.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from crossmatch.errors import ModelError
from crossmatch.fields import ranged
from crossmatch.models.face import ImageTextModel
from crossmatch.models.layers import l2norm
from crossmatch.models.registry import register_model
from crossmatch.models.transformer import Encoder, TextTransformer, VisionTransformer, build_patch_stem, prepend_cls


@dataclass
class AlbefConfig:
    vocab_size: int = 1000  # set at build time from the tokenizer
    image_tower: str = "vit"  # vit (patch embedding) | cnn | resnet18 | resnet50 (grid tokens, hybrid ViT)
    pretrained: bool = False  # ImageNet weights for the ResNet towers
    cnn_channels: tuple[int, ...] = (32, 32, 64)  # SmallCNN widths when image_tower == "cnn"
    image_size: int = ranged(64, min="patch_size")  # input side; fixes the number of image tokens R
    patch_size: int = ranged(8, min=1)  # ViT patch side (image_tower == "vit")
    width: int = ranged(256, min=1)  # D of every transformer (image, text, fusion)
    heads: int = ranged(4, min=1)  # attention heads H
    mlp_ratio: float = ranged(4.0, above=0)  # MLP hidden width = mlp_ratio * D
    dropout: float = ranged(0.1, min=0, max=1)  # dropout in embeddings, attention and MLPs
    vision_layers: int = ranged(4, min=0)  # ViT blocks
    text_layers: int = ranged(2, min=0)  # text-only blocks (the first half of ALBEF's BERT)
    fusion_layers: int = ranged(2, min=0)  # blocks with cross-attention to the image tokens (the second half)
    max_text_len: int = ranged(64, min=1)  # positions of the text embedding, [CLS] included
    embed_dim: int = ranged(256, min=1)  # ITC embedding E
    temp: float = ranged(0.07, above=0)  # initial ITC temperature (learned, clamped to [0.001, 0.5])
    momentum: bool = True  # momentum encoders, queues and momentum distillation
    momentum_decay: float = ranged(0.995, min=0, max=1)  # EMA factor of the momentum encoders
    queue_size: int = ranged(4096, min=0)  # momentum feature queue length Q (65,536 in the paper)
    mlm: bool = False  # build the MLM head (the task then adds mlm_loss, see loss.albef)
    rerank_score: str = "itm"  # score_pairs: itm (ALBEF) | itm+itc (LAVIS/BLIP: ITM logit + ITC cosine)


class ALBEF(ImageTextModel):
    """Unimodal encoders + fusion encoder; ITC projections, ITM head, optional momentum copies and queues.

    Momentum copies (`*_m`) have requires_grad False and are updated by EMA in `momentum_features`; the queues
    (`image_queue`, `text_queue`, `idx_queue`, `queue_ptr`) are buffers, so they are in the state_dict.
    """

    family = "albef"  # crossmatch.tasks.albef: its own objective

    def __init__(self, cfg: AlbefConfig):
        super().__init__()
        if cfg.rerank_score not in ("itm", "itm+itc"):
            raise ModelError(f"unknown rerank_score {cfg.rerank_score!r}; known: itm, itm+itc")
        self.config = cfg
        D, args = cfg.width, (cfg.heads, cfg.mlp_ratio, cfg.dropout)
        stem = build_patch_stem(cfg.image_tower, D, cfg.patch_size, cfg.pretrained, cfg.cnn_channels)
        self.visual_encoder = VisionTransformer(stem, cfg.image_size, D, cfg.vision_layers, *args)
        self.text_encoder = TextTransformer(cfg.vocab_size, cfg.max_text_len, D, cfg.text_layers, *args)
        self.fusion_encoder = Encoder(D, cfg.fusion_layers, *args, cross=True)
        self.vision_proj, self.text_proj = nn.Linear(D, cfg.embed_dim), nn.Linear(D, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        self.itm_head = nn.Linear(D, 2)
        if cfg.mlm:
            self.mlm_head = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.LayerNorm(D), nn.Linear(D, cfg.vocab_size))
        if cfg.momentum:
            self._init_momentum()

    momentum_names: tuple[str, ...] | list[str] = ("visual_encoder", "vision_proj", "text_encoder", "text_proj")

    def _init_momentum(self) -> None:
        """EMA copies (`NAME_m`) of the `momentum_names` modules, and the feature queues."""
        cfg = self.config
        for name in self.momentum_names:
            setattr(self, name + "_m", copy.deepcopy(getattr(self, name)).requires_grad_(False))
        # Random unit vectors with image id -1 (no positive) stand in for the not-yet-filled slots, as in ALBEF.
        self.register_buffer("image_queue", l2norm(torch.randn(cfg.queue_size, cfg.embed_dim)))  # (Q, E)
        self.register_buffer("text_queue", l2norm(torch.randn(cfg.queue_size, cfg.embed_dim)))  # (Q, E)
        self.register_buffer("idx_queue", torch.full((cfg.queue_size,), -1, dtype=torch.long))  # (Q,)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @property
    def logit_scale(self) -> Tensor:
        """() log of the ITC scale 1 / temp (open_clip's `logit_scale`), from the learned temperature."""
        return -self.temp.log()

    def training_only_keys(self) -> list[str]:
        """The momentum copies (`*_m`) and the feature queues: only training reads them."""
        queues = {"image_queue", "text_queue", "idx_queue", "queue_ptr"}
        return [k for k in self.state_dict() if k.split(".")[0].endswith("_m") or k in queues]

    def encode_image_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch["image"] (B, 3, H, W) -> {"embed": (B, E) l2-normalised, "tokens": (B, 1+R, D), "mask": (B, 1+R)}."""
        tokens = self.visual_encoder(batch["image"])  # (B, 1+R, D)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)  # (B, 1+R)
        return {"embed": l2norm(self.vision_proj(tokens[:, 0])), "tokens": tokens, "mask": mask}

    def encode_text_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch["input_ids"], batch["attention_mask"] (B, L) -> {"embed": (B, E), "tokens": (B, 1+L, D),
        "mask": (B, 1+L)}; a [CLS] is prepended."""
        ids, mask = prepend_cls(batch["input_ids"], batch["attention_mask"])  # (B, 1+L)
        tokens = self.text_encoder(ids, mask)  # (B, 1+L, D)
        return {"embed": l2norm(self.text_proj(tokens[:, 0])), "tokens": tokens, "mask": mask}

    def fuse(self, img: dict[str, Tensor], txt_tokens: Tensor, txt_mask: Tensor) -> Tensor:
        """Text tokens (B, L, D) cross-attending to row-aligned image tokens -> fused tokens (B, L, D)."""
        return self.fusion_encoder(txt_tokens, txt_mask, img["tokens"], img["mask"])

    def itm_logits(self, img: dict[str, Tensor], txt: dict[str, Tensor]) -> Tensor:
        """Row-aligned pairs -> (B, 2) ITM logits (index 1 = match) from the fused [CLS]."""
        return self.itm_head(self.fuse(img, txt["tokens"], txt["mask"])[:, 0])  # (B, D) -> (B, 2)

    def similarity(self, img: dict[str, Tensor], txt: dict[str, Tensor]) -> Tensor:
        """Stage 1, all pairs: (N_img, E) x (N_txt, E) -> (N_img, N_txt) ITC cosine."""
        return img["embed"] @ txt["embed"].t()

    def score_pairs(self, img: dict[str, Tensor], txt: dict[str, Tensor]) -> Tensor:
        """Stage 2, row-aligned pairs (image row b with caption row b) -> (B,) ITM positive logit
        (+ ITC cosine when rerank_score == "itm+itc")."""
        score = self.itm_logits(img, txt)[:, 1]  # (B,)
        if self.config.rerank_score == "itm+itc":
            score = score + (img["embed"] * txt["embed"]).sum(-1)
        return score

    def forward_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Both internal encoders and the all-pairs score of one batch (the internal face's forward)."""
        img, txt = self.encode_image_features(batch), self.encode_text_features(batch)
        return {
            "image_embed": img["embed"],
            "text_embed": txt["embed"],
            "scores": self.similarity(img, txt),
            "itm_logits": self.itm_logits(img, txt),
        }

    @torch.no_grad()
    def momentum_features(self, batch: dict[str, Tensor], update: bool = True) -> tuple[Tensor, Tensor]:
        """EMA-update the momentum copies (unless `update` is False), then encode the batch with them:
        (B, E), (B, E) l2-normalised image and text features."""
        m = self.config.momentum_decay
        if update:
            for name in ("visual_encoder", "vision_proj", "text_encoder", "text_proj"):
                own, ema = getattr(self, name).parameters(), getattr(self, name + "_m").parameters()
                for p, p_m in zip(own, ema, strict=True):
                    p_m.lerp_(p, 1 - m)  # p_m = m * p_m + (1 - m) * p
        img_feat = l2norm(self.vision_proj_m(self.visual_encoder_m(batch["image"])[:, 0]))  # (B, E)
        ids, mask = prepend_cls(batch["input_ids"], batch["attention_mask"])  # (B, 1+L)
        txt_feat = l2norm(self.text_proj_m(self.text_encoder_m(ids, mask)[:, 0]))  # (B, E)
        return img_feat, txt_feat

    @torch.no_grad()
    def enqueue(self, image_feat: Tensor, text_feat: Tensor, image_idx: Tensor) -> None:
        """Write (N, E), (N, E), (N,) into the ring-buffer queues at queue_ptr (the last Q if N > Q)."""
        Q = self.image_queue.shape[0]
        n, ptr = min(len(image_idx), Q), int(self.queue_ptr)
        slots = (ptr + torch.arange(n, device=image_idx.device)) % Q  # (n,)
        self.image_queue[slots] = image_feat[-n:].to(self.image_queue.dtype)
        self.text_queue[slots] = text_feat[-n:].to(self.text_queue.dtype)
        self.idx_queue[slots] = image_idx[-n:]
        self.queue_ptr.fill_((ptr + n) % Q)


@register_model(AlbefConfig)
def albef_small(cfg: AlbefConfig) -> ALBEF:
    """ALBEF with a ViT (patch 8 on 64 px), width 256, 4 vision + 2 text + 2 fusion layers.

    For CPU training from scratch, configs/albef_shapes.yaml narrows it (width 64, CNN stem, 16 tokens,
    no momentum)."""
    return ALBEF(cfg)


TINY = {
    "image_size": 32,
    "patch_size": 8,
    "width": 16,
    "heads": 2,
    "mlp_ratio": 2.0,
    "vision_layers": 1,
    "text_layers": 1,
    "fusion_layers": 1,
    "max_text_len": 16,
    "embed_dim": 8,
    "queue_size": 16,
}


@register_model(AlbefConfig, TINY)
def tiny_albef(cfg: AlbefConfig) -> ALBEF:
    """A few thousand parameters (plus vocab_size * 16 word embeddings), for tests."""
    return ALBEF(cfg)
