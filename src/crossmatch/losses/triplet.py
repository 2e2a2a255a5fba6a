"""Hinge triplet ranking loss of VSE++ (Faghri et al., BMVC 2018), also used by SCAN.

Given the batch score matrix S (B_img, B_txt) of images against captions, with `positive[i, t]` True
where caption t describes image i:
    cost_txt[i, t] = clamp(margin + S[i, t] - S_pos(t), 0)   image i as a negative for caption t
    cost_img[i, t] = clamp(margin + S[i, t] - S_pos(i), 0)   caption t as a negative for image i
with positives masked out (several captions of one image in a batch are not negatives of each other).
The loss sums all violations, or with max_violation keeps only the hardest negative of each query.

Text negatives (NegCLIP-style perturbed captions, `loss.text_negatives`): N_neg extra captions per pair b,
scored only against pair b's image, enter the image -> caption side as further negatives of that image:
    cost_neg[b, k] = clamp(margin + S_neg[b, k] - S[b, b], 0)   (0 where the slot is empty)
summed with cost_txt's row b, or taking part in that row's max with max_violation (`negative_term="joint"`,
the default). With `negative_term="separate"` and max_violation, the hardest of the K is a term of its own:
    loss = sum_t max_i cost_img[i, t] + sum_b max_t cost_txt[b, t] + sum_b max_k cost_neg[b, k]
so a text negative that the text tower cannot yet tell from its caption (violation = margin, the row's max)
does not hide the row's hardest in-batch caption.

The caption as the anchor (`caption_anchor_weight` w > 0, dual encoders): with C_neg[b, k] the cosine of
caption b's embedding and its negative k's,
    cost_cap[b, k] = clamp(margin + C_neg[b, k] - S[b, b], 0)   a caption nearer its negative than its image
    loss += w * sum_b max_k cost_cap[b, k]   (the sum over k without max_violation)
Where both towers ignore what a negative changes (a relation's sides: "X left of Y" / "Y left of X"), the
image-anchored term is stuck: its gradient into the image is e(negative) - e(caption) ~ 0, and the text
gradients of images that differ only in that change cancel. This term pushes the two captions apart in text
space whatever the images do; through the l2 normalisation its gradient is still proportional to the sine of
their angle, so it starts weak where they coincide and grows as they part (docs/results.md:
where it takes VSE++'s position twins above chance).

Legend: B pairs of the batch, K text negatives per pair.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from crossmatch.config import TEXT_NEGATIVE_TERMS


class TripletLoss(nn.Module):
    def __init__(
        self,
        margin: float = 0.2,
        max_violation: bool = True,
        negative_term: str = "joint",
        caption_anchor_weight: float = 0.0,
    ):
        super().__init__()
        if negative_term not in TEXT_NEGATIVE_TERMS:
            raise ValueError(f"negative_term must be {' or '.join(TEXT_NEGATIVE_TERMS)}, got {negative_term!r}")
        self.margin = margin
        self.max_violation = max_violation
        self.negative_term = negative_term
        self.caption_anchor_weight = caption_anchor_weight

    def forward(
        self,
        scores: Tensor,
        image_ids: Tensor,
        neg_scores: Tensor | None = None,
        neg_valid: Tensor | None = None,
        caption_neg_scores: Tensor | None = None,
    ) -> Tensor:
        """Hinge loss for a batch of B (image, caption) pairs.

        Args:
            scores: (B, B) score of image i (row) with caption t (column); pair b is (image b, caption b).
            image_ids: (B,) dataset index of each pair's image; pairs with the same id are positives.
            neg_scores: optional (B, K) score of image b with text negative k of pair b.
            neg_valid: (B, K) bool with `neg_scores`: False for empty slots (ignored).
            caption_neg_scores: optional (B, K) cosine of caption b with its text negative k (the caption-anchored
                term, weighted by `caption_anchor_weight`; needs `neg_valid`).
        Returns:
            Scalar loss, summed over the batch (the VSE++ convention).
        """
        pos = scores.diagonal()  # (B,) score of each pair
        positive = image_ids[:, None] == image_ids[None, :]  # (B, B) True where row and column share an image
        # Caption t against every image i: violation if a wrong image beats t's own image.
        cost_img = (self.margin + scores - pos[None, :]).clamp(min=0).masked_fill(positive, 0)  # (B, B)
        # Image i against every caption t: violation if a wrong caption beats i's own caption.
        cost_txt = (self.margin + scores - pos[:, None]).clamp(min=0).masked_fill(positive, 0)  # (B, B)
        own_term = 0.0  # the terms that stand apart: the hardest text negative (separate), the caption-anchored one
        if caption_neg_scores is not None and self.caption_anchor_weight > 0:
            # Caption b against its own text negatives, its image the positive.
            cost_cap = (self.margin + caption_neg_scores - pos[:, None]).clamp(min=0).masked_fill(~neg_valid, 0)
            cap = cost_cap.max(1).values.sum() if self.max_violation else cost_cap.sum()
            own_term = own_term + self.caption_anchor_weight * cap
        if neg_scores is not None:
            # Image b against its own text negatives: more columns of its row (never positives).
            cost_neg = (self.margin + neg_scores - pos[:, None]).clamp(min=0).masked_fill(~neg_valid, 0)  # (B, K)
            if self.max_violation and self.negative_term == "separate":
                own_term = own_term + cost_neg.max(1).values.sum()
            else:
                cost_txt = torch.cat([cost_txt, cost_neg], 1)  # (B, B + K)
        if self.max_violation:
            return cost_img.max(0).values.sum() + cost_txt.max(1).values.sum() + own_term
        return cost_img.sum() + cost_txt.sum() + own_term
