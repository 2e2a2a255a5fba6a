"""A part-based dual encoder for text-based person search in the spirit of TIPCB (Chen et al., "TIPCB: A
Simple but Effective Part-based Convolutional Baseline for Text-based Person Search", Neurocomputing 2022),
trained with CMPM (Zhang & Lu, ECCV 2018) or IRRA's SDM (Jiang & Ye, CVPR 2023); see tasks/identity.py.

Image branch: a backbone map -> a global feature (average pool) and K horizontal stripes (the map
average-pooled into K rows: head, torso, legs, ...), each with its own projection to E.
Text branch: word embedding -> bi-GRU -> a global feature (the sentence state) and K part features,
each an attention pooling over the words with its own learned query, then its own projection to E.
Unlike TIPCB we keep one level of features and a GRU instead of BERT: the structure, not the scale.

Score of a pair = cos(global_img, global_txt) + mean_k cos(part_img_k, part_txt_k), in [-2, 2].
The loss is applied the same way: loss(global) + mean_k loss(part_k), relevance by person identity
(batch["pid"], or batch["image_idx"] when the data has no identities). `num_parts=0` is the same model with
its global feature only (score = the global cosine, loss = loss(global)): the ablation that shows what the
parts add.

Legend: B batch, C channels, h/w feature-map height/width, K parts, L tokens, D GRU width, E embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossmatch.errors import ModelError
from crossmatch.fields import ranged
from crossmatch.models.face import ImageTextModel
from crossmatch.models.layers import GRUTextEncoder, build_image_tower, l2norm
from crossmatch.models.registry import register_model


@dataclass
class TipcbConfig:
    vocab_size: int = 1000  # set at build time from the tokenizer
    image_tower: str = "resnet50"  # cnn | resnet18 | resnet50 (TIPCB: ResNet-50)
    pretrained: bool = False  # ImageNet weights for the ResNet towers (needs internet the first time)
    cnn_channels: tuple[int, ...] = (32, 32, 64)  # SmallCNN conv widths (image_tower=cnn)
    # input side or [H, W] it is trained at (informational: stripes pool any map)
    image_size: int | list[int] = ranged(224, check="size")
    word_dim: int = ranged(300, min=1)  # word embedding width
    text_hidden: int = ranged(1024, min=1)  # bi-GRU width D (the two directions are averaged)
    embed_dim: int = ranged(1024, min=1)  # joint embedding width E (TIPCB: 2048)
    num_parts: int = ranged(6, min=0)  # K horizontal stripes / text parts (TIPCB: 6; 0: global feature only)


class PartProjection(nn.Module):
    """K independent linear maps, applied part-wise: (B, K, C) -> (B, K, E)."""

    def __init__(self, num_parts: int, dim_in: int, dim_out: int):
        super().__init__()
        bound = 1 / math.sqrt(dim_in)  # nn.Linear's default initialisation, per part
        self.weight = nn.Parameter(torch.empty(num_parts, dim_in, dim_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_parts, dim_out).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bkc,kce->bke", x, self.weight) + self.bias  # (B, K, E)


class AttentionParts(nn.Module):
    """K learned queries, each a softmax attention over the real (unpadded) words: (B, L, D) -> (B, K, D)."""

    def __init__(self, num_parts: int, dim: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_parts, dim) / math.sqrt(dim))

    def forward(self, words: Tensor, mask: Tensor) -> Tensor:
        B, L, D = words.shape
        logits = torch.einsum("bld,kd->bkl", words, self.queries) / math.sqrt(D)  # (B, K, L)
        logits = logits.masked_fill(~mask[:, None, :L], float("-inf"))
        return logits.softmax(-1) @ words  # (B, K, D)


class Tipcb(ImageTextModel):
    """Global + part features for images and captions; score = global cosine + mean part cosine."""

    family = "tipcb"  # crossmatch.tasks.identity: CMPM or SDM

    def __init__(self, cfg: TipcbConfig):
        super().__init__()
        if cfg.num_parts < 0:
            raise ModelError(f"model.num_parts must be >= 0, got {cfg.num_parts}")
        self.config = cfg
        K, E = cfg.num_parts, cfg.embed_dim
        self.image_tower = build_image_tower(cfg.image_tower, cfg.pretrained, cfg.cnn_channels)
        C = self.image_tower.out_channels
        self.image_global = nn.Linear(C, E)
        self.image_parts = PartProjection(K, C, E)
        self.text_tower = GRUTextEncoder(cfg.vocab_size, cfg.word_dim, cfg.text_hidden, bidirectional=True)
        self.text_global = nn.Linear(cfg.text_hidden, E)
        self.text_attention = AttentionParts(K, cfg.text_hidden)
        self.text_parts = PartProjection(K, cfg.text_hidden, E)

    def image_features(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """batch["image"] (B, 3, H, W) -> raw global (B, E) and part (B, K, E) features."""
        fmap = self.image_tower(batch["image"])  # (B, C, h, w)
        pooled = fmap.mean((2, 3))  # (B, C)
        stripes = F.adaptive_avg_pool2d(fmap, (self.config.num_parts, 1)).flatten(2).transpose(1, 2)  # (B, K, C)
        return self.image_global(pooled), self.image_parts(stripes)  # (B, E), (B, K, E)

    def text_features(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """batch["input_ids"], batch["attention_mask"] (B, L) -> raw global (B, E) and part (B, K, E) features."""
        mask = batch["attention_mask"].bool()
        words, sentence = self.text_tower(batch["input_ids"], mask)  # (B, L, D), (B, D)
        parts = self.text_attention(words, mask)  # (B, K, D)
        return self.text_global(sentence), self.text_parts(parts)  # (B, E), (B, K, E)

    def encode_image_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """-> {"embed": (B, E), "parts": (B, K, E)}, each vector l2-normalised."""
        g, p = self.image_features(batch)
        return {"embed": l2norm(g), "parts": l2norm(p)}

    def encode_text_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """-> {"embed": (B, E), "parts": (B, K, E)}, each vector l2-normalised."""
        g, p = self.text_features(batch)
        return {"embed": l2norm(g), "parts": l2norm(p)}

    def similarity(self, img: dict[str, Tensor], txt: dict[str, Tensor]) -> Tensor:
        """All pairs: global cosine + mean over parts of the part cosines -> (N_img, N_txt); the global cosine
        alone when K = 0."""
        glob = img["embed"] @ txt["embed"].t()  # (N_img, N_txt)
        if img["parts"].shape[1] == 0:
            return glob
        parts = torch.einsum("ike,tke->it", img["parts"], txt["parts"]) / img["parts"].shape[1]  # (N_img, N_txt)
        return glob + parts

    def forward_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Both internal encoders and the all-pairs score of one batch (the internal face's forward)."""
        img, txt = self.encode_image_features(batch), self.encode_text_features(batch)
        return {
            "image_embed": img["embed"],
            "image_parts": img["parts"],
            "text_embed": txt["embed"],
            "text_parts": txt["parts"],
            "scores": self.similarity(img, txt),
        }


@register_model(TipcbConfig)
def tipcb_resnet50(cfg: TipcbConfig) -> Tipcb:
    """The TIPCB-like setting: ResNet-50 stripes, 6 parts, bi-GRU text branch."""
    return Tipcb(cfg)


@register_model(TipcbConfig, {"image_tower": "resnet18", "text_hidden": 512, "embed_dim": 512})
def tipcb_small(cfg: TipcbConfig) -> Tipcb:
    """ResNet-18 and 512-wide embeddings: a quick baseline on one GPU."""
    return Tipcb(cfg)


TINY = {
    "image_tower": "cnn",
    "cnn_channels": (4, 4, 8),
    "word_dim": 8,
    "text_hidden": 16,
    "embed_dim": 16,
    "num_parts": 3,
}


@register_model(TipcbConfig, TINY)
def tiny_tipcb(cfg: TipcbConfig) -> Tipcb:
    """A few thousand parameters, for tests."""
    return Tipcb(cfg)
