"""Two-stage retrieval: a cheap all-pairs score (stage 1) picks the top-k candidates of every query,
and the expensive pair scorer `model.score_pairs` (ALBEF/ViLT ITM, stage 2) re-scores only those.

As in ALBEF's evaluation, i2t and t2i get their own matrices: row i of `i2t` holds stage-2 scores for
image i's top-k captions, column t of `t2i` for caption t's top-k images. Every other entry ranks below
all candidates and, among themselves, in stage-1 order (what a two-stage system returns past its top-k),
so median/mean rank and the twin test stay meaningful for matches the first stage missed.
Pairs chosen by both directions are scored once. With k >= the number of candidates the result is
exactly the full stage-2 matrix.

This module is the only caller of `model.score_pairs`: the Evaluator and `crossmatch.score` (`rerank`),
single-query search (`rerank_text_query`) and compositional scoring (`score_pair_batches`) all go through it,
and `reranks` decides for all of them whether a model re-ranks at all.

Legend: N_img images, N_txt captions, k candidates per query, P distinct candidate pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm import tqdm

from crossmatch.models.protocols import PairScorer
from crossmatch.tensors import all_gather_varlen, rank_range, slice_features


def reranks(model: object, k: int) -> bool:
    """Whether `model` re-scores its top-`k` candidates: a pair scorer (ALBEF, ViLT) with k > 0."""
    return k > 0 and isinstance(model, PairScorer)


def below_candidates(stage2: Tensor, stage1: Tensor, candidate: Tensor) -> Tensor:
    """Merge two stages into one ranking score: stage-2 scores on candidates, stage-1 scores shifted below
    every candidate elsewhere. stage2, stage1 (...) float, candidate (...) bool -> (...) float64.

    float64 keeps the shifted stage-1 scores as finely ordered as before the shift.
    """
    stage2, stage1 = stage2.double(), stage1.double()
    if not candidate.any():
        return stage1
    shift = stage2[candidate].min() - stage1.max() - 1.0  # stage1 + shift < every candidate's stage-2 score
    return torch.where(candidate, stage2, stage1 + shift)


def topk_masks(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Which pairs each direction re-scores: (N_img, N_txt) scores -> (in_i2t, in_t2i), two bool
    (N_img, N_txt) masks of every image's top-k captions and every caption's top-k images."""
    n_img, n_txt = scores.shape
    in_i2t = torch.zeros(n_img, n_txt, dtype=torch.bool).scatter_(1, scores.topk(min(k, n_txt), dim=1).indices, True)
    in_t2i = torch.zeros(n_img, n_txt, dtype=torch.bool).scatter_(0, scores.topk(min(k, n_img), dim=0).indices, True)
    return in_i2t, in_t2i


def candidate_pairs(in_i2t: Tensor, in_t2i: Tensor) -> Tensor:
    """Distinct (image, caption) pairs chosen by either direction: (P, 2) long, sorted by image (row-major)
    so that a batch of pairs reads few distinct images."""
    return (in_i2t | in_t2i).nonzero()


@torch.no_grad()
def score_pair_batches(
    model: PairScorer,
    img: dict[str, Tensor],
    txt: dict[str, Tensor],
    pairs: Tensor,
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "score pairs",
) -> Tensor:
    """`model.score_pairs` on aligned pairs, `batch_size` pairs per call.

    Args:
        img, txt: encoded features (leading dim N_img / N_txt), on the model's device.
        pairs: (P, 2) long rows (image, caption) into img / txt; keep an image's pairs together (sorted by
            image) so that a batch reads few distinct images.
    Returns:
        (P,) float32 CPU scores, in the order of `pairs`.
    """
    device = next(iter(img.values())).device
    parts = [torch.zeros(0)]
    for start in tqdm(range(0, len(pairs), batch_size), desc=desc, disable=not progress, leave=False):
        i, t = pairs[start : start + batch_size].to(device).unbind(1)  # (b,), (b,)
        # each image's tokens were encoded once; pairs gather their rows
        parts.append(model.score_pairs(slice_features(img, i), slice_features(txt, t)).float().cpu())
    return torch.cat(parts)


@torch.no_grad()
def rerank(
    model: nn.Module,
    scores: Tensor,
    img: dict[str, Tensor],
    txt: dict[str, Tensor],
    k: int,
    batch_size: int = 256,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Re-score the top-k candidates of every query with `model.score_pairs`.

    Args:
        scores: (N_img, N_txt) stage-1 scores (any model, CPU).
        img, txt: encoded features of all images / captions (leading dim N_img / N_txt), on the model's device.
    Returns:
        (i2t, t2i): two (N_img, N_txt) float64 CPU matrices: stage-2 scores on each direction's candidates,
        stage-1 scores below them elsewhere (`below_candidates`).
    """
    n_img, n_txt = scores.shape
    stage1 = scores.float().cpu()
    in_i2t, in_t2i = topk_masks(stage1, k)  # (N_img, N_txt) each
    pairs = candidate_pairs(in_i2t, in_t2i)  # (P, 2)
    mine = rank_range(len(pairs))  # under torchrun each rank re-scores a contiguous share of the pairs
    share = score_pair_batches(model, img, txt, pairs[mine.start : mine.stop], batch_size, progress, f"re-rank top-{k}")
    fused = torch.cat(all_gather_varlen(share))  # (P,)
    full = torch.zeros(n_img, n_txt)
    full[pairs[:, 0], pairs[:, 1]] = fused  # stage-2 score of every candidate pair (0 elsewhere, never read)
    return below_candidates(full, stage1, in_i2t), below_candidates(full, stage1, in_t2i)


@torch.no_grad()
def rerank_text_query(
    model: PairScorer, scores: Tensor, img: dict[str, Tensor], txt: dict[str, Tensor], k: int, batch_size: int = 256
) -> Tensor:
    """One caption query (`rerank`'s t2i column for a single caption): re-score its top-k images with
    `model.score_pairs`; the rest rank below them in stage-1 order.

    Args:
        scores: (N_img,) stage-1 scores of every image for the query.
        img: encoded features of the N_img images; txt: of the one query (leading dim 1), on the model's device.
    Returns:
        (N_img,) float64 CPU (`below_candidates`).
    """
    stage1 = scores.float().cpu()
    cand = stage1.topk(min(k, len(stage1))).indices  # (k,)
    pairs = torch.stack([cand, torch.zeros_like(cand)], 1)  # (k, 2): each candidate image with the query
    stage2 = torch.zeros(len(stage1))
    stage2[cand] = score_pair_batches(model, img, txt, pairs, batch_size)
    is_cand = torch.zeros(len(stage1), dtype=torch.bool).index_fill_(0, cand, True)  # (N_img,)
    return below_candidates(stage2, stage1, is_cand)
