"""VSE++ dual encoder (Faghri et al., BMVC 2018): an image tower and a GRU text tower that map both
modalities to one l2-normalised embedding space; the score of a pair is the cosine of its embeddings.

Legend: B batch, C channels, L tokens, D GRU width, E embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from crossmatch.errors import ConfigError
from crossmatch.fields import image_hw, ranged
from crossmatch.models.face import ImageTextModel
from crossmatch.models.layers import GRUTextEncoder, build_image_tower, l2norm
from crossmatch.models.registry import register_model


@dataclass
class DualEncoderConfig:
    vocab_size: int = 1000  # set at build time from the tokenizer
    image_tower: str = "cnn"  # cnn (the classic small CNN) | resnet18 | resnet50
    pretrained: bool = False  # ImageNet weights for the ResNet towers (needs internet the first time)
    cnn_channels: tuple[int, ...] = (32, 32, 64)  # SmallCNN conv widths
    batch_norm: bool = True  # BatchNorm after each SmallCNN conv (SyncBatchNorm under multi-GPU DDP)
    image_size: int | list[int] = ranged(64, check="size")  # input side or [H, W]; fixes the SmallCNN flatten size
    word_dim: int = ranged(300, min=1)  # word embedding width
    text_hidden: int = ranged(1024, min=1)  # GRU width
    bidirectional: bool = False  # bi-GRU (the two directions are averaged)
    embed_dim: int = ranged(1024, min=1)  # joint embedding width E


@torch.no_grad()
def _flat_size(tower: nn.Module, cfg: DualEncoderConfig) -> int:
    """Features of the SmallCNN's last map for one image of `cfg.image_size` (each stage halves the side)."""
    try:
        return tower.eval()(torch.zeros(1, 3, *image_hw(cfg.image_size))).numel()
    except RuntimeError as err:
        n = len(cfg.cnn_channels)
        raise ConfigError(f"model.image_size={cfg.image_size}: the {n}-stage CNN needs at least {2**n} px") from err
    finally:
        tower.train()


class JointEmbedding(ImageTextModel):
    """What every dual encoder shares: a `text_tower` returning (words, sentence), a `text_proj`, cosine
    scores of l2-normalised embeddings. Subclasses build the towers and implement `encode_image_features`."""

    family = "dual_encoder"  # crossmatch.tasks: hinge (VSE++), infonce, siglip
    is_dual_encoder = True  # l2-normalised (B, E) embeddings: the contrastive losses (loss.name) apply

    def encode_text_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch["input_ids"], batch["attention_mask"] (B, L) -> {"embed": (B, E)} l2-normalised."""
        _, sentence = self.text_tower(batch["input_ids"], batch["attention_mask"])  # (B, D)
        return {"embed": l2norm(self.text_proj(sentence))}  # (B, E)

    def similarity(self, img: dict[str, Tensor], txt: dict[str, Tensor]) -> Tensor:
        """All pairs: (N_img, E) x (N_txt, E) -> (N_img, N_txt) cosine scores."""
        return img["embed"] @ txt["embed"].t()

    def forward_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Both internal encoders and the all-pairs score of one batch (the internal face's forward)."""
        img, txt = self.encode_image_features(batch), self.encode_text_features(batch)
        return {"image_embed": img["embed"], "text_embed": txt["embed"], "scores": self.similarity(img, txt)}


class DualEncoder(JointEmbedding):
    """Image and text towers to l2-normalised (B, E) embeddings; score = cosine similarity."""

    def __init__(self, cfg: DualEncoderConfig):
        super().__init__()
        self.config = cfg
        self.image_tower = build_image_tower(cfg.image_tower, cfg.pretrained, cfg.cnn_channels, cfg.batch_norm)
        if cfg.image_tower == "cnn":
            # The classic toy setup flattens the whole last map; its size follows from the input side.
            n_flat = _flat_size(self.image_tower, cfg)
            self.image_pool = nn.Flatten(1)
        else:
            n_flat = self.image_tower.out_channels
            self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.image_proj = nn.Linear(n_flat, cfg.embed_dim)
        self.text_tower = GRUTextEncoder(cfg.vocab_size, cfg.word_dim, cfg.text_hidden, cfg.bidirectional)
        self.text_proj = nn.Linear(cfg.text_hidden, cfg.embed_dim)

    def encode_image_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch["image"] (B, 3, H, W) -> {"embed": (B, E)} l2-normalised."""
        fmap = self.image_tower(batch["image"])  # (B, C, h, w)
        return {"embed": l2norm(self.image_proj(self.image_pool(fmap)))}  # (B, E)

    # encode_text_features, similarity and forward come from JointEmbedding.


@register_model(DualEncoderConfig, {"text_hidden": 512})
def vse_cnn(cfg: DualEncoderConfig) -> DualEncoder:
    """VSE++ with the classic small CNN and a GRU (512 wide, to train in CPU minutes), 1024-d embeddings."""
    return DualEncoder(cfg)


@register_model(DualEncoderConfig, {"image_tower": "resnet18"})
def vse_resnet18(cfg: DualEncoderConfig) -> DualEncoder:
    """VSE++ with a torchvision ResNet-18 image tower and a GRU: a mid-size baseline."""
    return DualEncoder(cfg)


@register_model(DualEncoderConfig, {"image_tower": "resnet50"})
def vse_resnet50(cfg: DualEncoderConfig) -> DualEncoder:
    """The VSE++ paper's ResNet-152 setting, with the ResNet-50 torchvision ships."""
    return DualEncoder(cfg)


TINY = {"cnn_channels": (4, 4, 8), "image_size": 32, "word_dim": 8, "text_hidden": 16, "embed_dim": 16}


@register_model(DualEncoderConfig, TINY)
def tiny_vse(cfg: DualEncoderConfig) -> DualEncoder:
    """A few thousand parameters, for tests."""
    return DualEncoder(cfg)
