"""IRRA (Jiang & Ye, "Cross-Modal Implicit Relation Reasoning and Aligning for Text-to-Image Person
Retrieval", CVPR 2023): a CLIP dual encoder for text-based person search, plus a cross-modal encoder that
only training uses.

Retrieval face: the open_clip towers of the clip family (models/clip.py, the same builder), so
`encode_image` / `encode_text` are open_clip's and the embeddings are the l2-normalised projected [CLS] /
[EOT] outputs; the score of a pair is their cosine. Any open_clip ViT works (`model.arch`, `model.pretrained`,
`model.arch_config`); IRRA's is ViT-B-16 with OpenAI's weights.

Non-square input: person crops are tall (IRRA: 384 x 128), so the ViT's square grid of position embeddings
is interpolated bilinearly to the new grid once, when the model is built (`resize_pos_embed`), as IRRA does;
the model's preprocessing then squashes images to `image_size` (H, W), which a run takes from data.image_size.

Implicit relation reasoning (training only): the caption, masked as BERT does (tasks/masking.py), runs
through the text tower; its projected token features attend to the image's projected tokens in one
cross-attention layer, then `cross_layers` transformer blocks, and an MLM head (dense -> QuickGELU ->
LayerNorm -> linear to the vocabulary, untied from the token embedding) predicts the masked tokens.
`training_only_keys` lists these modules, so `save_pretrained`, `encode_*` and the ONNX export leave them out;
a training checkpoint (`best.pt`) keeps them, and the model loads from either.

Legend: B batch, C context length, L tokens of a caption, R image tokens (1 + h*w, the class token first),
D tower width, E embedding (the cross-modal width), H heads, V vocabulary, h/w patch grid.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossmatch.data.clip_tokenizer import open_clip_module
from crossmatch.errors import ModelError
from crossmatch.fields import image_hw, ranged
from crossmatch.models.clip import TINY_ARCH, ClipConfig, ClipModel, clip_tokenizer
from crossmatch.models.layers import l2norm
from crossmatch.models.registry import register_model, register_tokenizer


@dataclass
class IrraConfig(ClipConfig):
    arch: str = "ViT-B-16"  # the open_clip architecture (a ViT: its position grid is resized to image_size)
    image_size: int | list[int] = ranged(factory=lambda: [384, 128], check="size")  # input side or [H, W]; from data
    mlm: bool = True  # build the cross-modal encoder and MLM head (implicit relation reasoning)
    cross_heads: int = ranged(8, min=1)  # heads of the cross attention and the blocks (IRRA: E // 64)
    cross_layers: int = ranged(4, min=1)  # transformer blocks after the cross attention (IRRA: 4)
    # the id that replaces 80% of the masked tokens: IRRA's <|mask|>, which takes the slot of CLIP BPE's last
    # merge (49405; 49406 / 49407 are [SOT] / [EOT]); random replacements are drawn from [1, mask_id)
    mask_id: int = ranged(49405, min=1)


def resize_pos_embed(pos: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """A ViT's position embeddings (1 + h*w, D) on a new patch grid (1 + gh*gw, D): the class token's row is kept,
    the grid (1, D, h, w) is interpolated bilinearly to (gh, gw) (align_corners=False, F.interpolate's default,
    which IRRA's resize_pos_embed uses)."""
    (h, w), (gh, gw) = old_grid, new_grid
    _, D = pos.shape
    cls_row, grid = pos[:1], pos[1:]  # (1, D), (h*w, D)
    grid = grid.reshape(1, h, w, D).permute(0, 3, 1, 2)  # (1, D, h, w)
    grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)  # (1, D, gh, gw)
    return torch.cat([cls_row, grid.permute(0, 2, 3, 1).reshape(gh * gw, D)])  # (1 + gh*gw, D)


def set_input_size(visual: nn.Module, size: tuple[int, int]) -> None:
    """Make an open_clip ViT take (H, W) images: its position grid is resized to (H // p, W // p).

    Raises:
        ModelError: the tower is not a ViT with a learnable position grid.
    """
    pos = getattr(visual, "positional_embedding", None)
    if not isinstance(pos, nn.Parameter) or not hasattr(visual, "grid_size") or pos.ndim != 2:
        raise ModelError(f"irra needs an open_clip ViT image tower with a position grid, not {type(visual).__name__}")
    (H, W), (ph, pw) = size, visual.patch_size
    new_grid = (H // ph, W // pw)
    if min(new_grid) < 1:
        raise ModelError(f"image size {H}x{W} is smaller than one {ph}x{pw} patch")
    if tuple(new_grid) == tuple(visual.grid_size):
        return
    with torch.no_grad():
        resized = resize_pos_embed(pos.detach(), tuple(visual.grid_size), new_grid)
    visual.positional_embedding = nn.Parameter(resized, requires_grad=pos.requires_grad)
    visual.image_size, visual.grid_size = (H, W), new_grid


def _project(x: Tensor, proj: nn.Module | Tensor | None) -> Tensor:
    """Tower tokens (B, N, D) -> (B, N, E) through the tower's own output projection (a matrix or a Linear)."""
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Module) else x @ proj


class QuickGELU(nn.Module):
    """CLIP's GELU approximation x * sigmoid(1.702 x), used by IRRA's blocks and head."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class CrossModalEncoder(nn.Module):
    """Masked caption tokens attend to image tokens (one cross-attention layer), then `layers` transformer
    blocks over the caption, then a final LayerNorm: (B, L, E), (B, R, E) -> (B, L, E)."""

    def __init__(self, width: int, heads: int, layers: int):
        super().__init__()
        if width % heads:
            raise ModelError(f"model.cross_heads={heads} does not divide the embedding width {width}")
        self.heads = heads
        self.ln_text, self.ln_image = nn.LayerNorm(width), nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        Transformer = open_clip_module().transformer.Transformer
        self.blocks = Transformer(width, layers, heads, act_layer=QuickGELU)
        self.ln_post = nn.LayerNorm(width)
        # IRRA's initialisation (CLIP's): attention and MLP inputs by width, output projections also by depth
        attn_std, proj_std, fc_std = width**-0.5, width**-0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5
        for block in self.blocks.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.cross_attn.in_proj_weight, std=attn_std)
        nn.init.normal_(self.cross_attn.out_proj.weight, std=proj_std)

    def forward(self, text: Tensor, image: Tensor, text_mask: Tensor) -> Tensor:
        """text (B, L, E) with text_mask (B, L) True on real tokens, image (B, R, E) -> (B, L, E)."""
        B, L, _ = text.shape
        x = self.cross_attn(self.ln_text(text), self.ln_image(image), self.ln_image(image), need_weights=False)[0]
        # padding is never a key of the blocks' self-attention (IRRA attends over its 77 padded slots)
        keys = torch.zeros(B, 1, 1, L, dtype=x.dtype, device=x.device).masked_fill(
            ~text_mask[:, None, None, :], float("-inf")
        )  # (B, 1, 1, L)
        attn_mask = keys.expand(B, self.heads, L, L).reshape(B * self.heads, L, L)  # (B*H, L, L)
        return self.ln_post(self.blocks(x, attn_mask=attn_mask))  # (B, L, E)


def mlm_head(width: int, vocab_size: int) -> nn.Sequential:
    """IRRA's untied MLM head: (n, E) -> (n, V)."""
    head = nn.Sequential(
        OrderedDict(
            dense=nn.Linear(width, width), gelu=QuickGELU(), ln=nn.LayerNorm(width), fc=nn.Linear(width, vocab_size)
        )
    )
    nn.init.normal_(head.dense.weight, std=(2 * width) ** -0.5)
    nn.init.normal_(head.fc.weight, std=width**-0.5)
    return head


class IrraModel(ClipModel):
    """An open_clip dual encoder at a (H, W) input (retrieval) + a cross-modal encoder and MLM head (training)."""

    family = "irra"  # crossmatch.tasks.irra: SDM + IRR (masked-token prediction)

    def __init__(self, cfg: IrraConfig, load_weights: bool = True):
        super().__init__(cfg, load_weights)
        H, W = image_hw(cfg.image_size)
        set_input_size(self.clip.visual, (H, W))
        # person crops are squashed to (H, W) as IRRA does (T.Resize((384, 128)))
        self.preprocess = {**self.preprocess, "size": [H, W], "resize": "squash"}
        embed_dim = int(self.clip.text_projection.shape[-1] if self.clip.text_projection is not None else 0)
        self.embed_dim = embed_dim or int(self.clip.transformer.width)
        self.vocab_size = int(self.clip.vocab_size)
        if cfg.mask_id >= self.vocab_size:
            raise ModelError(f"model.mask_id={cfg.mask_id} is outside the text tower's {self.vocab_size} ids")
        if cfg.mlm:
            self.cross_encoder = CrossModalEncoder(self.embed_dim, cfg.cross_heads, cfg.cross_layers)
            self.mlm_head = mlm_head(self.embed_dim, self.vocab_size)

    def training_only_keys(self) -> list[str]:
        """The cross-modal encoder and MLM head: retrieval never reads them."""
        return [k for k in self.state_dict() if k.startswith(("cross_encoder.", "mlm_head."))]

    def layer_depths(self) -> dict[str, tuple[int, int]]:
        """The towers' parameters only: the cross-modal encoder and MLM head are new (train.lr)."""
        return {k: v for k, v in super().layer_depths().items() if k.startswith("clip.")}

    def _padded(self, ids: Tensor, mask: Tensor) -> Tensor:
        """(B, L) ids, mask -> (B, C) re-padded with the pad id to the tower's context length."""
        B, L = ids.shape
        if L > self.context_length:
            raise ModelError(f"captions of {L} tokens exceed the text tower's context length {self.context_length}")
        full = ids.new_full((B, self.context_length), self.config.pad_id)  # (B, C)
        full[:, :L] = ids.masked_fill(~mask.bool(), self.config.pad_id)
        return full

    def image_tokens(self, image: Tensor) -> dict[str, Tensor]:
        """(B, 3, H, W) -> {"embed": (B, E) l2-normalised, "tokens": (B, R, E)}: one pass gives both the
        retrieval embedding and the projected tokens ([CLS] first) the cross-modal encoder attends to."""
        visual = self.clip.visual
        out = visual.forward_intermediates(
            image, indices=1, normalize_intermediates=True, output_fmt="NLC", output_extra_tokens=True
        )
        tokens = torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], 1)  # (B, R, D)
        return {"embed": l2norm(out["image_features"]), "tokens": _project(tokens, visual.proj)}  # (B, E), (B, R, E)

    def text_tokens(self, ids: Tensor, mask: Tensor) -> Tensor:
        """(B, L) ids and mask -> (B, L, E): the text tower's projected output at every position."""
        L = ids.shape[1]
        out = self.clip.forward_intermediates(
            text=self._padded(ids, mask), text_indices=1, normalize_intermediates=True, intermediates_only=True
        )
        return _project(out["text_intermediates"][-1][:, :L], self.clip.text_projection)  # (B, L, E)

    def relation_features(self, image_tokens: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """Implicit relation reasoning: (masked) caption ids, mask (B, L) and image tokens (B, R, E) -> the
        cross-modal features (B, L, E) of every caption position, for `mlm_head`."""
        if not self.config.mlm:
            raise ModelError("this irra model was built with model.mlm=false: it has no cross-modal encoder")
        return self.cross_encoder(self.text_tokens(ids, mask), image_tokens, mask.bool())


def _tiny_arch() -> dict:
    arch = copy.deepcopy(TINY_ARCH)
    arch["text_cfg"]["context_length"] = 32  # person captions run to ~25 BPE tokens
    return arch


@register_model(IrraConfig, loads_weights=True)
def irra(cfg: IrraConfig, load_weights: bool) -> IrraModel:
    """IRRA: an open_clip ViT (default ViT-B-16; model.pretrained=openai) at data.image_size, SDM + IRR."""
    return IrraModel(cfg, load_weights)


@register_model(
    IrraConfig, {"arch": "", "arch_config": _tiny_arch(), "cross_heads": 2, "cross_layers": 2}, loads_weights=True
)
def tiny_irra(cfg: IrraConfig, load_weights: bool) -> IrraModel:
    """tiny_clip's towers (CLIP's BPE, 32 tokens) with a two-block cross-modal encoder, for tests."""
    return IrraModel(cfg, load_weights)


register_tokenizer("irra", "tiny_irra")(clip_tokenizer)
