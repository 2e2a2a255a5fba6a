"""Identity-matching losses of text-based person search: CMPM, the cross-modal projection matching loss
(Zhang & Lu, "Deep Cross-Modal Projection Learning for Image-Text Matching", ECCV 2018), and SDM, the
similarity distribution matching loss of IRRA (Jiang & Ye, CVPR 2023); and IRRA's ID loss, identity
classification of both modalities by one shared classifier (`IdentityClassifierLoss`).

Both compare, for every row of a batch, a predicted matching distribution p (a softmax over the columns)
with the true one q: q_ij = y_ij / sum_k y_ik, where y_ij = 1 when row i and column j show the same identity,
and minimise KL(p || q) = sum_j p_ij (log p_ij - log(q_ij + eps)), averaged over rows, summed over the two
directions (image rows against text columns, and text rows against image columns).

- CMPM: logits are *projections* of one raw feature onto the other modality's unit vectors,
  i2t_ij = x_i . (z_j / ||z_j||), t2i_ij = z_i . (x_j / ||x_j||), so the feature norms act as temperatures.
- SDM: logits are cosines over a fixed temperature tau (IRRA: 0.02).

q follows the papers (an L1-normalised row). The public CMPM code (and IRRA's compute_cmpm) divides by
the row's L2 norm instead, which is the same only when a row has exactly one positive.

Distributed: rows are this rank's items, columns every rank's (gathered with gradient).
Legend: B batch (this rank's rows), N columns (all ranks), E embedding, C training identities (classes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossmatch.errors import DataError
from crossmatch.tensors import gather

EPS = 1e-8


def identity_targets(row_ids: Tensor, col_ids: Tensor) -> Tensor:
    """(B,), (N,) identities -> (B, N) true matching distribution q (each row sums to 1 when it has a match)."""
    y = (row_ids[:, None] == col_ids[None, :]).float()  # (B, N)
    return y / y.sum(1, keepdim=True).clamp(min=1)


def matching_kl(logits: Tensor, targets: Tensor, eps: float = EPS) -> Tensor:
    """mean_i KL(softmax(logits_i) || targets_i), with eps inside the log of the targets: (B, N) -> scalar."""
    log_p = F.log_softmax(logits, dim=1)  # (B, N)
    return (log_p.exp() * (log_p - (targets + eps).log())).sum(1).mean()


class CmpmLoss(nn.Module):
    """CMPM: KL between the softmax of cross-modal projections and the identity distribution, both ways."""

    def __init__(self, rank: int = 0, world_size: int = 1, eps: float = EPS):
        super().__init__()
        self.rank, self.world_size, self.eps = rank, world_size, eps

    def forward(self, image: Tensor, text: Tensor, ids: Tensor) -> Tensor:
        """image, text (B, E) raw (unnormalised) features of the pairs, ids (B,) identities -> scalar."""
        img_all, txt_all = gather(image, self.world_size), gather(text, self.world_size)  # (N, E)
        q = identity_targets(ids, gather(ids, self.world_size))  # (B, N)
        i2t = image @ F.normalize(txt_all, dim=-1).t()  # (B, N) image projected on the unit text vectors
        t2i = text @ F.normalize(img_all, dim=-1).t()  # (B, N)
        return matching_kl(i2t, q, self.eps) + matching_kl(t2i, q, self.eps)


class SdmLoss(nn.Module):
    """SDM: KL between the softmax of cosine similarities / tau and the identity distribution, both ways."""

    def __init__(self, temperature: float = 0.02, rank: int = 0, world_size: int = 1, eps: float = EPS):
        super().__init__()
        self.temperature, self.rank, self.world_size, self.eps = temperature, rank, world_size, eps

    def forward(self, image: Tensor, text: Tensor, ids: Tensor) -> Tensor:
        """image, text (B, E) features (normalised here), ids (B,) identities -> scalar."""
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        img_all, txt_all = gather(image, self.world_size), gather(text, self.world_size)  # (N, E)
        q = identity_targets(ids, gather(ids, self.world_size))  # (B, N)
        i2t = image @ txt_all.t() / self.temperature  # (B, N)
        t2i = text @ img_all.t() / self.temperature  # (B, N)
        return matching_kl(i2t, q, self.eps) + matching_kl(t2i, q, self.eps)


def identity_classes(pids: Tensor, classes: Tensor) -> Tensor:
    """(B,) person identities -> (B,) class indices: the position of each in `classes` (C,), the sorted training
    identities (so ids 7, 3, 7, 12 with classes 3, 7, 12 -> 1, 0, 1, 2); -1 for an identity not among them."""
    pos = torch.searchsorted(classes, pids).clamp(max=len(classes) - 1)  # (B,)
    return torch.where(classes[pos] == pids, pos, torch.full_like(pos, -1))


class IdentityClassifierLoss(nn.Module):
    """IRRA's ID loss: one linear classifier (E -> C, with bias) shared by the two modalities, cross-entropy of
    each modality's embeddings against the training identity, the mean of the image and the text term.

    As IRRA (anosorae/IRRA, model/build.py and model/objectives.py::compute_id): `nn.Linear(embed_dim,
    num_classes)` initialised with weights ~ N(0, 0.001^2) and bias 0; compute_id returns (CE(image_logits,
    labels) + CE(text_logits, labels)) / 2, each CE the mean over the batch; the caller multiplies by the
    weight (IRRA's id_loss_weight, our loss.identity.id_weight). IRRA feeds the raw [CLS] / EOT features.

    The classes are the training identities, sorted (`classes`, a buffer: the identity -> class map travels with
    the classifier in the checkpoint's loss state). In training every identity must be one of them; in eval mode
    (the validation loss, on identities the classifier never saw: person-search splits are identity-disjoint)
    rows of unknown identities are left out, and a batch with none known has no ID loss (None).
    """

    def __init__(self, classes: Sequence[int], dim: int):
        super().__init__()
        ids = sorted(set(int(c) for c in classes))
        if not ids:
            raise ValueError("the ID loss needs at least one training identity")
        self.register_buffer("classes", torch.tensor(ids, dtype=torch.long))  # (C,) original ids, sorted
        self.classifier = nn.Linear(dim, len(ids))
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def forward(self, image: Tensor, text: Tensor, pids: Tensor) -> Tensor | None:
        """image, text (B, E) embeddings of the pairs, pids (B,) their original identities -> scalar (or None
        in eval mode when no identity of the batch is a training one)."""
        labels = identity_classes(pids.to(self.classes.device), self.classes)  # (B,)
        known = labels >= 0  # (B,)
        if not bool(known.all()):
            if self.training:
                unknown = sorted(set(pids[~known.to(pids.device)].tolist()))[:5]
                raise DataError(f"person identities {unknown} are not among the {self.num_classes} training classes")
            if not bool(known.any()):
                return None
            image, text, labels = image[known], text[known], labels[known]  # (B', E), (B', E), (B',)
        img_logits = self.classifier(image)  # (B', C)
        txt_logits = self.classifier(text)  # (B', C)
        return (F.cross_entropy(img_logits, labels) + F.cross_entropy(txt_logits, labels)) / 2
