"""ALBEF's retrieval fine-tuning objective (Li et al., "Align before Fuse", NeurIPS 2021): ITC with all
captions of an image positive (+ momentum distillation against EMA copies and feature queues), ITM with
hard negatives drawn from the in-batch ITC similarities, optional MLM on the fusion output.

Text negatives (`loss.text_negatives` K > 0): the K perturbed captions of each pair are extra i2t ITC
columns of their own row and ITM negative pairs (image b, negative k of pair b) -> label 0.

Legend: B batch, K text negatives per pair, L tokens (with [CLS]), D width, E embedding, V vocabulary, Q queue
length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from crossmatch.config import LossConfig
from crossmatch.data.tokenizer import FIRST_WORD_ID, MASK_ID
from crossmatch.losses.itm import ItcLoss, ItmLoss, MomentumBank, sample_hard_negatives
from crossmatch.models.albef import ALBEF
from crossmatch.models.transformer import prepend_cls
from crossmatch.tasks.base import Task, register_task
from crossmatch.tasks.masking import bert_mask
from crossmatch.tasks.text_negatives import encode_negatives, flat
from crossmatch.tensors import gather, slice_features


def mask_tokens(ids: Tensor, mask: Tensor, vocab_size: int, prob: float) -> tuple[Tensor, Tensor]:
    """BERT masking of real words (never [CLS] at position 0 or padding): of the chosen `prob` fraction,
    80% become [MASK], 10% a random word, 10% stay. ids, mask (B, L) -> masked ids (B, L), labels (B, L)
    with -100 on the positions that are not predicted."""
    maskable = mask.clone()
    maskable[:, 0] = False  # (B, L) [CLS]
    return bert_mask(ids, maskable, MASK_ID, (FIRST_WORD_ID, vocab_size), prob)


@register_task(ALBEF.family)
class AlbefTask(Task):
    """ALBEF's retrieval fine-tuning objective: itc_loss + itm_loss (+ mlm_loss).

    Its settings are `loss.albef` (AlbefLossConfig); the architecture (momentum encoders, MLM head) is the
    model's.
    Distillation weight: alpha = config.alpha * min(1, epoch + progress), where `epoch` comes from
    `on_epoch_start` and progress from `on_step` (float in [0, 1), the fraction of the current epoch
    done), so alpha ramps over the first epoch and is config.alpha from epoch 1 on.
    """

    uses_text_negatives = True

    def __init__(self, model: ALBEF, cfg: LossConfig, rank: int = 0, world_size: int = 1):
        super().__init__(model)
        self.cfg = cfg.albef
        self.world_size, self.epoch, self.progress = world_size, 0, 0.0
        self.itc, self.itm = ItcLoss(rank, world_size), ItmLoss()

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch, self.progress = epoch, 0.0

    def on_step(self, progress: float) -> None:
        self.progress = progress

    def alpha(self) -> float:
        return self.cfg.alpha * min(1.0, self.epoch + self.progress)

    @property
    def exact_accumulation(self) -> bool:
        # The momentum encoders update once per forward and read the raw images: not encode + objective.
        return not self.model.config.momentum

    def encode(self, batch: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        feats = {"image": self.model.encode_image_features(batch), "text": self.model.encode_text_features(batch)}
        neg = encode_negatives(self.model, batch)  # embed (B, K, E), tokens (B, K, 1+L, D), mask; or None
        return feats if neg is None else {**feats, "neg_text": neg}

    def objective(self, feats: dict[str, dict[str, Tensor]], batch: dict) -> tuple[dict[str, Tensor], dict[str, float]]:
        """ITC + ITM (+ MLM) on the unimodal features of the whole batch; the fusion layers run here."""
        return self._objective(feats, batch, update=True)

    def validation_step(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
        # no EMA update, no enqueue: the training state stays as it was
        return self._objective(self.encode(batch), batch, update=False)

    def _objective(self, feats: dict, batch: dict, update: bool) -> tuple[dict[str, Tensor], dict[str, float]]:
        m, cfg, idx = self.model, self.cfg, batch["image_idx"]
        if update:
            with torch.no_grad():
                m.temp.clamp_(0.001, 0.5)
        img, txt = feats["image"], feats["text"]
        bank = self.momentum_bank(batch, update) if m.config.momentum else None
        alpha = self.alpha() if m.config.momentum else 0.0
        neg = feats.get("neg_text")
        neg_itc = {} if neg is None else {"neg_feat": neg["embed"], "neg_valid": batch["neg_valid"]}
        losses = {
            "itc_loss": cfg.itc_weight * self.itc(img["embed"], txt["embed"], idx, m.temp, bank, alpha, **neg_itc),
            "itm_loss": cfg.itm_weight * self._itm(img, txt, idx, neg, batch.get("neg_valid")),
        }
        if m.config.mlm:
            losses["mlm_loss"] = cfg.mlm_weight * self._mlm(batch, img, txt["mask"])
        if bank is not None and update:
            ws = self.world_size
            m.enqueue(gather(bank.image_feat, ws), gather(bank.text_feat, ws), gather(idx, ws))
        return losses, {"temp": m.temp.item(), "alpha": alpha}

    def momentum_bank(self, batch: dict[str, Tensor], update: bool) -> MomentumBank:
        """The momentum features of this batch and copies of the queues (read before this batch enqueues)."""
        m = self.model
        img_feat, txt_feat = m.momentum_features(batch, update)
        return MomentumBank(img_feat, txt_feat, m.image_queue.clone(), m.text_queue.clone(), m.idx_queue.clone())

    def _itm(
        self,
        img: dict[str, Tensor],
        txt: dict[str, Tensor],
        idx: Tensor,
        neg: dict[str, Tensor] | None = None,
        neg_valid: Tensor | None = None,
    ) -> Tensor:
        """ITM over [positives; captions with a hard negative image; images with a hard negative caption]
        (+ each image with its valid text negatives, label 0)."""
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
            slice_features(img, img_rows), slice_features(txt, txt_rows)
        )  # (B + n_t + n_i, 2)
        if neg is None:
            return self.itm(logits[:B], logits[B:])
        pair, slot = neg_valid.nonzero(as_tuple=True)  # (n_neg,) each: pair b, its negative k
        K = neg_valid.shape[1]
        neg_logits = self.model.itm_logits(slice_features(img, pair), slice_features(flat(neg), pair * K + slot))
        return self.itm(logits[:B], torch.cat([logits[B:], neg_logits]))  # negatives: (n_t + n_i + n_neg, 2)

    def _mlm(self, batch: dict[str, Tensor], img: dict[str, Tensor], mask: Tensor) -> Tensor:
        """Predict masked words from the fusion output of the masked caption and its image."""
        m = self.model
        ids, _ = prepend_cls(batch["input_ids"], batch["attention_mask"])  # (B, 1+L)
        masked, labels = mask_tokens(ids, mask, m.config.vocab_size, self.cfg.mlm_prob)
        fused = m.fuse(img, m.text_encoder(masked, mask), mask)  # (B, 1+L, D)
        chosen = labels != -100  # (B, 1+L)
        if not chosen.any():  # nothing drawn: a zero loss that still reaches the head
            return m.mlm_head(fused[:, 0]).sum() * 0.0
        logits = m.mlm_head(fused[chosen])  # (n, V): only the predicted positions
        return F.cross_entropy(logits, labels[chosen])
