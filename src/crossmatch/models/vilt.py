"""ViLT, "Vision-and-Language Transformer Without Convolution or Region Supervision" (Kim et al., ICML 2021),
for image-text retrieval.

One transformer reads the concatenation [text tokens; image tokens], each with its own position and a
modality-type embedding; the pooled first token ([CLS] of the text) feeds a 2-way ITM head. The joint
pass costs one transformer run per (image, caption) pair, so retrieval needs a cheap first stage: the
same transformer run on the image alone and on the text alone, [CLS]-pooled, projected and l2-normalised
(trained with an ITC loss). `similarity` is that cosine; `score_pairs` re-ranks with the ITM logit.

Training (crossmatch.tasks.vilt): ranking loss (cross-entropy over one positive and n_negatives random captions of
other images, as in ViLT's retrieval fine-tuning) + ITM loss + ITC loss for the cheap head.

Legend: B batch, R image patches, L tokens (with [CLS]), D width, E embedding, H heads, K negatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from crossmatch.fields import ranged
from crossmatch.models.face import ImageTextModel
from crossmatch.models.layers import l2norm
from crossmatch.models.registry import register_model
from crossmatch.models.transformer import Encoder, ImageEmbedding, PatchEmbed, TextEmbedding, prepend_cls

TEXT_TYPE, IMAGE_TYPE = 0, 1  # rows of the modality-type embedding


@dataclass
class ViltConfig:
    vocab_size: int = 1000  # set at build time from the tokenizer
    image_size: int = ranged(64, min="patch_size")  # input side; fixes the number of patches R
    patch_size: int = ranged(8, min=1)  # patch side (32 in the paper, at 384 px)
    width: int = ranged(256, min=1)  # transformer width D
    heads: int = ranged(4, min=1)  # attention heads H
    layers: int = ranged(4, min=0)  # transformer blocks (12 in the paper)
    mlp_ratio: float = ranged(4.0, above=0)  # MLP hidden width = mlp_ratio * D
    dropout: float = ranged(0.1, min=0, max=1)  # dropout in embeddings, attention and MLPs
    max_text_len: int = ranged(64, min=1)  # positions of the text embedding, [CLS] included
    embed_dim: int = ranged(256, min=1)  # E of the cheap first-stage embedding head
    temp: float = ranged(0.07, above=0)  # initial ITC temperature of the cheap head (learned, clamped to [0.001, 0.5])


class ViLT(ImageTextModel):
    """Single-stream transformer over [text; image] tokens with an ITM head and a cheap embedding head."""

    family = "vilt"  # crossmatch.tasks.vilt: its own objective

    def __init__(self, cfg: ViltConfig):
        super().__init__()
        self.config = cfg
        D = cfg.width
        self.image_embed = ImageEmbedding(PatchEmbed(cfg.patch_size, D), cfg.image_size, D, cfg.dropout)
        self.text_embed = TextEmbedding(cfg.vocab_size, cfg.max_text_len, D, cfg.dropout)
        self.type_embed = nn.Embedding(2, D)  # modality type: 0 text, 1 image
        self.encoder = Encoder(D, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.dropout)
        self.pooler = nn.Sequential(nn.Linear(D, D), nn.Tanh())  # BERT's pooler on the first token
        self.itm_head = nn.Linear(D, 2)
        self.image_proj, self.text_proj = nn.Linear(D, cfg.embed_dim), nn.Linear(D, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        nn.init.normal_(self.type_embed.weight, std=0.02)

    @property
    def logit_scale(self) -> Tensor:
        """() log of the ITC scale 1 / temp (open_clip's `logit_scale`), from the learned temperature."""
        return -self.temp.log()

    def encode_image_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch["image"] (B, 3, H, W) -> {"embed": (B, E) cheap-head embedding, "tokens": (B, 1+R, D)
        embedded patches (input of the joint pass), "mask": (B, 1+R)}."""
        tokens = self.image_embed(batch["image"]) + self.type_embed.weight[IMAGE_TYPE]  # (B, 1+R, D)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)  # (B, 1+R)
        pooled = self.encoder(tokens, mask)[:, 0]  # (B, D): image-only pass, image [CLS]
        return {"embed": l2norm(self.image_proj(pooled)), "tokens": tokens, "mask": mask}

    def encode_text_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch["input_ids"], batch["attention_mask"] (B, L) -> {"embed": (B, E), "tokens": (B, 1+L, D)
        embedded words with a [CLS] prepended, "mask": (B, 1+L)}."""
        ids, mask = prepend_cls(batch["input_ids"], batch["attention_mask"])  # (B, 1+L)
        tokens = self.text_embed(ids) + self.type_embed.weight[TEXT_TYPE]  # (B, 1+L, D)
        pooled = self.encoder(tokens, mask)[:, 0]  # (B, D): text-only pass, text [CLS]
        return {"embed": l2norm(self.text_proj(pooled)), "tokens": tokens, "mask": mask}

    def itm_logits(self, img: dict[str, Tensor], txt: dict[str, Tensor]) -> Tensor:
        """Row-aligned pairs -> (B, 2) ITM logits (index 1 = match) from the joint pass."""
        x = torch.cat([txt["tokens"], img["tokens"]], 1)  # (B, 1+L + 1+R, D)
        mask = torch.cat([txt["mask"], img["mask"]], 1)  # (B, 1+L + 1+R)
        pooled = self.pooler(self.encoder(x, mask)[:, 0])  # (B, D): the text [CLS] after joint attention
        return self.itm_head(pooled)  # (B, 2)

    def similarity(self, img: dict[str, Tensor], txt: dict[str, Tensor]) -> Tensor:
        """Stage 1, all pairs: (N_img, E) x (N_txt, E) -> (N_img, N_txt) cosine of the cheap head."""
        return img["embed"] @ txt["embed"].t()

    def score_pairs(self, img: dict[str, Tensor], txt: dict[str, Tensor]) -> Tensor:
        """Stage 2, row-aligned pairs (image row b with caption row b) -> (B,) ITM positive logit."""
        return self.itm_logits(img, txt)[:, 1]

    def forward_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Both internal encoders and the all-pairs score of one batch (the internal face's forward)."""
        img, txt = self.encode_image_features(batch), self.encode_text_features(batch)
        return {
            "image_embed": img["embed"],
            "text_embed": txt["embed"],
            "scores": self.similarity(img, txt),
            "itm_logits": self.itm_logits(img, txt),
        }


@register_model(ViltConfig, {"patch_size": 16})
def vilt_small(cfg: ViltConfig) -> ViLT:
    """ViLT with patch 16 on 64 px (16 patches), width 256, 4 layers: a short joint sequence.

    Every ranking negative costs one joint pass over [text; image]; configs/vilt_shapes.yaml trains it at
    width 64 on CPU with 7 negatives (loss.vilt.n_negatives)."""
    return ViLT(cfg)


TINY = {
    "image_size": 32,
    "patch_size": 8,
    "width": 16,
    "heads": 2,
    "layers": 1,
    "mlp_ratio": 2.0,
    "max_text_len": 16,
    "embed_dim": 8,
}


@register_model(ViltConfig, TINY)
def tiny_vilt(cfg: ViltConfig) -> ViLT:
    """A few thousand parameters (plus vocab_size * 16 word embeddings), for tests."""
    return ViLT(cfg)
