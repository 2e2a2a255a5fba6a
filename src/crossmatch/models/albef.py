"""ALBEF, "Align before Fuse" (Li et al., NeurIPS 2021), for image-text retrieval.

An image encoder (a small ViT from scratch, or a CNN/ResNet grid as a hybrid ViT), a text encoder, and
a fusion encoder whose layers cross-attend from the text tokens to the image tokens. Training (AlbefTask):
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
import torch.nn.functional as F
from torch import Tensor, nn

from crossmatch.config import LossConfig
from crossmatch.errors import ModelError
from crossmatch.losses.itm import ItcLoss, ItmLoss, MomentumBank, gather, sample_hard_negatives
from crossmatch.models.layers import l2norm
from crossmatch.models.registry import build_config, register_model
from crossmatch.models.transformer import Encoder, TextTransformer, VisionTransformer, build_patch_stem, prepend_cls
from crossmatch.tasks.base import Task

MASK_ID, FIRST_WORD_ID = 4, 5  # [MASK] and the first real word id of crossmatch's tokenizer


@dataclass
class AlbefConfig:
    vocab_size: int = 1000  # set at build time from the tokenizer
    image_tower: str = "vit"  # vit (patch embedding) | cnn | resnet18 | resnet50 (grid tokens, hybrid ViT)
    pretrained: bool = False  # ImageNet weights for the ResNet towers
    cnn_channels: tuple[int, ...] = (32, 32, 64)  # SmallCNN widths when image_tower == "cnn"
    image_size: int = 64  # input side; fixes the number of image tokens R
    patch_size: int = 8  # ViT patch side (image_tower == "vit")
    width: int = 256  # D of every transformer (image, text, fusion)
    heads: int = 4  # attention heads H
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * D
    dropout: float = 0.1  # dropout in embeddings, attention and MLPs
    vision_layers: int = 4  # ViT blocks
    text_layers: int = 2  # text-only blocks (the first half of ALBEF's BERT)
    fusion_layers: int = 2  # blocks with cross-attention to the image tokens (the second half)
    max_text_len: int = 64  # positions of the text embedding, [CLS] included
    embed_dim: int = 256  # ITC embedding E
    temp: float = 0.07  # initial ITC temperature (learned, clamped to [0.001, 0.5])
    momentum: bool = True  # momentum encoders, queues and momentum distillation
    momentum_decay: float = 0.995  # EMA factor of the momentum encoders
    queue_size: int = 4096  # momentum feature queue length Q (65,536 in the paper)
    alpha: float = 0.4  # distillation weight, ramped linearly from 0 over the first epoch
    itc_weight: float = 1.0  # weight of itc_loss
    itm_weight: float = 1.0  # weight of itm_loss
    mlm: bool = False  # add masked language modelling on the fusion output
    mlm_prob: float = 0.15  # fraction of real words masked (BERT's 80/10/10 replacement)
    mlm_weight: float = 1.0  # weight of mlm_loss
    rerank_score: str = "itm"  # score_pairs: itm (ALBEF) | itm+itc (LAVIS/BLIP: ITM logit + ITC cosine)


class ALBEF(nn.Module):
    """Unimodal encoders + fusion encoder; ITC projections, ITM head, optional momentum copies and queues.

    Momentum copies (`*_m`) have requires_grad False and are updated by EMA in `momentum_bank`; the queues
    (`image_queue`, `text_queue`, `idx_queue`, `queue_ptr`) are buffers, so they are in the state_dict.
    """

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

    def _init_momentum(self) -> None:
        cfg = self.config
        for name in ("visual_encoder", "vision_proj", "text_encoder", "text_proj"):
            setattr(self, name + "_m", copy.deepcopy(getattr(self, name)).requires_grad_(False))
        # Random unit vectors with image id -1 (no positive) stand in for the not-yet-filled slots, as in ALBEF.
        self.register_buffer("image_queue", l2norm(torch.randn(cfg.queue_size, cfg.embed_dim)))  # (Q, E)
        self.register_buffer("text_queue", l2norm(torch.randn(cfg.queue_size, cfg.embed_dim)))  # (Q, E)
        self.register_buffer("idx_queue", torch.full((cfg.queue_size,), -1, dtype=torch.long))  # (Q,)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def encode_image(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch["image"] (B, 3, H, W) -> {"embed": (B, E) l2-normalised, "tokens": (B, 1+R, D), "mask": (B, 1+R)}."""
        tokens = self.visual_encoder(batch["image"])  # (B, 1+R, D)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)  # (B, 1+R)
        return {"embed": l2norm(self.vision_proj(tokens[:, 0])), "tokens": tokens, "mask": mask}

    def encode_text(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
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

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        img, txt = self.encode_image(batch), self.encode_text(batch)
        return {
            "image_embed": img["embed"],
            "text_embed": txt["embed"],
            "scores": self.similarity(img, txt),
            "itm_logits": self.itm_logits(img, txt),
        }

    @torch.no_grad()
    def momentum_bank(self, batch: dict[str, Tensor]) -> MomentumBank:
        """EMA-update the momentum copies, then encode the batch with them; returns features and queues."""
        m = self.config.momentum_decay
        for name in ("visual_encoder", "vision_proj", "text_encoder", "text_proj"):
            for p, p_m in zip(getattr(self, name).parameters(), getattr(self, name + "_m").parameters(), strict=True):
                p_m.lerp_(p, 1 - m)  # p_m = m * p_m + (1 - m) * p
        img_feat = l2norm(self.vision_proj_m(self.visual_encoder_m(batch["image"])[:, 0]))  # (B, E)
        ids, mask = prepend_cls(batch["input_ids"], batch["attention_mask"])  # (B, 1+L)
        txt_feat = l2norm(self.text_proj_m(self.text_encoder_m(ids, mask)[:, 0]))  # (B, E)
        return MomentumBank(
            img_feat, txt_feat, self.image_queue.clone(), self.text_queue.clone(), self.idx_queue.clone()
        )

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


def mask_tokens(ids: Tensor, mask: Tensor, vocab_size: int, prob: float) -> tuple[Tensor, Tensor]:
    """BERT masking of real words (never [CLS] at position 0 or padding): of the chosen `prob` fraction,
    80% become [MASK], 10% a random word, 10% stay. ids, mask (B, L) -> masked ids (B, L), labels (B, L)
    with -100 on the positions that are not predicted."""
    chosen = (torch.rand(ids.shape, device=ids.device) < prob) & mask
    chosen[:, 0] = False  # (B, L)
    labels = ids.masked_fill(~chosen, -100)
    u = torch.rand(ids.shape, device=ids.device)  # one draw decides mask / random / keep
    out = ids.masked_fill(chosen & (u < 0.8), MASK_ID)
    rand_words = torch.randint(FIRST_WORD_ID, vocab_size, ids.shape, device=ids.device)
    swap = chosen & (u >= 0.8) & (u < 0.9)
    return torch.where(swap, rand_words, out), labels


class AlbefTask(Task):
    """ALBEF's retrieval fine-tuning objective: itc_loss + itm_loss (+ mlm_loss).

    Its settings live in AlbefConfig; the generic LossConfig (hinge margin etc.) is not used.
    Distillation weight: alpha = config.alpha * min(1, epoch + progress), where `epoch` comes from
    `on_epoch_start` and progress from `batch["epoch_progress"]` (float in [0, 1), the fraction of the
    current epoch done). Without that key alpha stays 0 in epoch 0 (no distillation from an untrained
    teacher) and is config.alpha from epoch 1 on.
    """

    def __init__(self, model: ALBEF, cfg: LossConfig | None = None, rank: int = 0, world_size: int = 1):
        super().__init__(model)
        self.world_size, self.epoch = world_size, 0
        self.itc, self.itm = ItcLoss(rank, world_size), ItmLoss()

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def alpha(self, batch: dict) -> float:
        return self.model.config.alpha * min(1.0, self.epoch + float(batch.get("epoch_progress", 0.0)))

    @property
    def exact_accumulation(self) -> bool:
        # The momentum encoders update once per forward and read the raw images: not encode + objective.
        return not self.model.config.momentum

    def encode(self, batch: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        return {"image": self.model.encode_image(batch), "text": self.model.encode_text(batch)}

    def objective(self, feats: dict[str, dict[str, Tensor]], batch: dict) -> tuple[dict[str, Tensor], dict[str, float]]:
        """ITC + ITM (+ MLM) on the unimodal features of the whole batch; the fusion layers run here."""
        m, cfg, idx = self.model, self.model.config, batch["image_idx"]
        with torch.no_grad():
            m.temp.clamp_(0.001, 0.5)
        img, txt = feats["image"], feats["text"]
        bank = m.momentum_bank(batch) if cfg.momentum else None
        alpha = self.alpha(batch) if cfg.momentum else 0.0
        losses = {
            "itc_loss": cfg.itc_weight * self.itc(img["embed"], txt["embed"], idx, m.temp, bank, alpha),
            "itm_loss": cfg.itm_weight * self._itm(img, txt, idx),
        }
        if cfg.mlm:
            losses["mlm_loss"] = cfg.mlm_weight * self._mlm(batch, img, txt["mask"])
        if bank is not None:
            ws = self.world_size
            m.enqueue(gather(bank.image_feat, ws), gather(bank.text_feat, ws), gather(idx, ws))
        return losses, {"temp": m.temp.item(), "alpha": alpha}

    def _itm(self, img: dict[str, Tensor], txt: dict[str, Tensor], idx: Tensor) -> Tensor:
        """ITM over [positives; captions with a hard negative image; images with a hard negative caption]."""
        with torch.no_grad():
            sim = img["embed"] @ txt["embed"].t() / self.model.temp  # (B, B) image rows, caption columns
        neg_txt, neg_img = sample_hard_negatives(sim, sim.t(), idx)  # (B,), (B,); -1: no negative
        t_rows = (neg_img >= 0).nonzero().squeeze(1)  # captions that got a negative image
        i_rows = (neg_txt >= 0).nonzero().squeeze(1)  # images that got a negative caption
        B = len(idx)
        all_rows = torch.arange(B, device=idx.device)
        img_rows = torch.cat([all_rows, neg_img[t_rows], i_rows])  # (B + n_t + n_i,)
        txt_rows = torch.cat([all_rows, t_rows, neg_txt[i_rows]])  # (B + n_t + n_i,)
        logits = self.model.itm_logits(
            {k: v[img_rows] for k, v in img.items()}, {k: v[txt_rows] for k, v in txt.items()}
        )  # (B + n_t + n_i, 2)
        return self.itm(logits[:B], logits[B:])

    def _mlm(self, batch: dict[str, Tensor], img: dict[str, Tensor], mask: Tensor) -> Tensor:
        """Predict masked words from the fusion output of the masked caption and its image."""
        m = self.model
        ids, _ = prepend_cls(batch["input_ids"], batch["attention_mask"])  # (B, 1+L)
        masked, labels = mask_tokens(ids, mask, m.config.vocab_size, m.config.mlm_prob)
        fused = m.fuse(img, m.text_encoder(masked, mask), mask)  # (B, 1+L, D)
        chosen = labels != -100  # (B, 1+L)
        if not chosen.any():  # nothing drawn: a zero loss that still reaches the head
            return m.mlm_head(fused[:, 0]).sum() * 0.0
        logits = m.mlm_head(fused[chosen])  # (n, V): only the predicted positions
        return F.cross_entropy(logits, labels[chosen])


ALBEF.task_class = AlbefTask  # build_task(model, ...) constructs the model's own task


def _albef(defaults: dict, overrides: dict) -> ALBEF:
    return ALBEF(build_config(AlbefConfig, defaults, overrides))


@register_model
def albef_small(**overrides) -> ALBEF:
    """ViT patch 8 on 64 px (64 tokens), width 256, 4 vision + 2 text + 2 fusion layers. For CPU training
    from scratch, configs/albef_shapes.yaml narrows it (width 64, CNN stem, 16 tokens, no momentum)."""
    return _albef({}, overrides)


@register_model
def tiny_albef(**overrides) -> ALBEF:
    """A few thousand parameters (plus vocab_size * 16 word embeddings), for tests."""
    return _albef(
        {
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
        },
        overrides,
    )
