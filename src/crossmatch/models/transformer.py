"""Transformer blocks shared by the fusion families (ALBEF, ViLT): pre-norm blocks with optional
cross-attention, an MLP, patch and grid embeddings, a small ViT (Dosovitskiy et al., ICLR 2021) and a
small BERT-style text transformer (Devlin et al., NAACL 2019), all written for training from scratch.

Padding convention: a bool mask is True on real tokens; attention never reads a masked key.

Legend: B batch, R patches/regions, L tokens (queries), M context tokens (keys), D width, H heads,
Dh head width (D / H), C channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossmatch.data.tokenizer import CLS_ID
from crossmatch.errors import ModelError
from crossmatch.models.layers import build_image_tower, feature_map_to_regions


class Mlp(nn.Module):
    """Linear -> GELU -> Linear, with dropout after each: (..., D) -> (..., D)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head attention of queries x over a context (x itself for self-attention)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ModelError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.out_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        """x (B, L, D), context (B, M, D) or None, context_mask (B, M) bool -> (B, L, D)."""
        context = x if context is None else context
        B, L, D = x.shape
        M, H = context.shape[1], self.heads
        q = self.q(x).view(B, L, H, D // H).transpose(1, 2)  # (B, H, L, Dh)
        k, v = self.kv(context).view(B, M, 2, H, D // H).permute(2, 0, 3, 1, 4)  # 2 x (B, H, M, Dh)
        mask = None if context_mask is None else context_mask[:, None, None, :]  # (B, 1, 1, M): True = attend
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, L, Dh)
        return self.out_drop(self.out(y.transpose(1, 2).reshape(B, L, D)))  # (B, L, D)


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention over a context, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, cross: bool = False):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, dropout)
        self.cross = cross
        if cross:
            self.norm_x, self.cross_attn = nn.LayerNorm(dim), Attention(dim, heads, dropout)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio), dropout)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:
        """x (B, L, D) with mask (B, L); context (B, M, D) with context_mask (B, M) -> (B, L, D)."""
        h = self.norm1(x)
        x = x + self.attn(h, h, mask)  # (B, L, D)
        if self.cross:
            x = x + self.cross_attn(self.norm_x(x), context, context_mask)  # (B, L, D): L queries read M keys
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """A stack of `depth` blocks and a final LayerNorm (needed after pre-norm blocks)."""

    def __init__(
        self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, cross: bool = False
    ):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout, cross) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:
        """x (B, L, D), mask (B, L) bool; context (B, M, D), context_mask (B, M) -> (B, L, D)."""
        for block in self.blocks:
            x = block(x, mask, context, context_mask)
        return self.norm(x)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> linear: (B, 3, H, W) -> (B, R, D), R = (H / patch) * (W / patch)."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)  # a linear map of each flattened patch

    def forward(self, x: Tensor) -> Tensor:
        return feature_map_to_regions(self.proj(x))  # (B, D, h, w) -> (B, R, D)


class GridEmbed(nn.Module):
    """A CNN tower's grid features as tokens (the hybrid ViT): (B, 3, H, W) -> (B, R=h*w, D)."""

    def __init__(self, tower: str, dim: int, pretrained: bool = False, cnn_channels: tuple[int, ...] = (32, 32, 64)):
        super().__init__()
        self.tower = build_image_tower(tower, pretrained, cnn_channels)
        self.proj = nn.Linear(self.tower.out_channels, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(feature_map_to_regions(self.tower(x)))  # (B, C, h, w) -> (B, R, C) -> (B, R, D)


def build_patch_stem(
    tower: str, dim: int, patch_size: int, pretrained: bool = False, cnn_channels: tuple[int, ...] = (32, 32, 64)
) -> nn.Module:
    """`vit`: a PatchEmbed of `patch_size`; `cnn` | `resnet18` | `resnet50`: a GridEmbed of that tower."""
    return PatchEmbed(patch_size, dim) if tower == "vit" else GridEmbed(tower, dim, pretrained, cnn_channels)


@torch.no_grad()
def count_tokens(stem: nn.Module, image_size: int) -> int:
    """Number of tokens R the stem makes from a square image (a dry run in eval mode, so BN stats stay)."""
    was_training = stem.training
    n = stem.eval()(torch.zeros(1, 3, image_size, image_size)).shape[1]
    stem.train(was_training)
    return n


def initial_positions(n_tokens: int, width: int, init: str) -> Tensor:
    """The start of the learned image positions, (1, 1+R, D). `normal`: N(0, 0.02) (ViT, ALBEF). `sincos`: the
    2D sine-cosine embedding of the cells' (row, column) on a square sqrt(R) x sqrt(R) grid, row-major as the
    cells are flattened (MAE, Table 1 of He et al. 2022), each cell's vector of norm sqrt(D/2), about the scale of
    the projected content; token 0 ([CLS] or the global average) gets zeros. At N(0, 0.02) a cell's position is ~4% of
    its token's norm (EfficientNet-Lite0 at 128 px), so which cell holds which object starts nearly unreadable."""
    if init == "normal":
        return torch.randn(1, 1 + n_tokens, width) * 0.02
    if init != "sincos":
        raise ModelError(f"unknown image_pos_init {init!r}; known: normal, sincos")
    side = math.isqrt(n_tokens)
    if side * side != n_tokens or width % 4:
        raise ModelError(f"image_pos_init sincos needs a square grid and a width divisible by 4: {n_tokens} tokens, "
                         f"width {width}")  # fmt: skip
    from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

    cells = build_sincos2d_pos_embed([side, side], width)  # (R, D), row-major over (row, column)
    return torch.cat([torch.zeros(1, width), cells]).unsqueeze(0)


class ImageEmbedding(nn.Module):
    """Stem tokens + a learned [CLS] + learned positions (starting at `initial_positions(pos_init)`):
    (B, 3, H, W) -> (B, 1+R, D)."""

    def __init__(self, stem: nn.Module, image_size: int, dim: int, dropout: float = 0.0, pos_init: str = "normal"):
        super().__init__()
        self.stem = stem
        self.n_tokens = count_tokens(stem, image_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(initial_positions(self.n_tokens, dim, pos_init))
        self.drop = nn.Dropout(dropout)

    def forward(self, image: Tensor) -> Tensor:
        x = self.stem(image)  # (B, R, D)
        B, R, D = x.shape
        if R != self.n_tokens:
            raise ModelError(f"image gives {R} tokens but the model was built for {self.n_tokens}: check image_size")
        x = torch.cat([self.cls.expand(B, 1, D), x], dim=1)  # (B, 1+R, D)
        return self.drop(x + self.pos)


class TextEmbedding(nn.Module):
    """BERT-style word + position embeddings, LayerNorm, dropout: ids (B, L) -> (B, L, D)."""

    def __init__(self, vocab_size: int, max_len: int, dim: int, dropout: float = 0.0):
        super().__init__()
        self.word = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        self.norm, self.drop = nn.LayerNorm(dim), nn.Dropout(dropout)
        nn.init.normal_(self.word.weight, std=0.02)

    def forward(self, input_ids: Tensor) -> Tensor:
        L = input_ids.shape[1]
        if L > self.pos.shape[1]:
            raise ModelError(f"{L} tokens (with [CLS]) exceed max_text_len={self.pos.shape[1]}")
        return self.drop(self.norm(self.word(input_ids) + self.pos[:, :L]))  # (B, L, D)


def prepend_cls(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Prepend the [CLS] id: ids (B, L), mask (B, L) -> (B, 1+L), (B, 1+L) with the [CLS] real."""
    B = input_ids.shape[0]
    cls = torch.full((B, 1), CLS_ID, dtype=input_ids.dtype, device=input_ids.device)
    ones = torch.ones(B, 1, dtype=torch.bool, device=input_ids.device)
    return torch.cat([cls, input_ids], 1), torch.cat([ones, attention_mask.bool()], 1)


class VisionTransformer(nn.Module):
    """A small ViT (or hybrid ViT over a CNN grid): (B, 3, H, W) -> tokens (B, 1+R, D), [CLS] first."""

    def __init__(
        self,
        stem: nn.Module,
        image_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.embed = ImageEmbedding(stem, image_size, dim, dropout)
        self.encoder = Encoder(dim, depth, heads, mlp_ratio, dropout)

    def forward(self, image: Tensor) -> Tensor:
        return self.encoder(self.embed(image))  # (B, 1+R, D); every image token is real, so no mask


class TextTransformer(nn.Module):
    """A small BERT-style encoder: ids (B, L) with mask (B, L) -> tokens (B, L, D). Ids include [CLS]."""

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.embed = TextEmbedding(vocab_size, max_len, dim, dropout)
        self.encoder = Encoder(dim, depth, heads, mlp_ratio, dropout)

    def forward(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        return self.encoder(self.embed(input_ids), mask)  # (B, L, D)
