"""Retrieval evaluation shared by the Trainer and the CLI: encode every image and caption of a split
once, score all pairs in bounded-memory chunks, compute the metrics of `crossmatch.metrics`.

Legend: N_img images, N_txt captions of the split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from crossmatch.errors import ConfigError
from crossmatch.metrics import (
    image_folds,
    mean_over_folds,
    ranks_i2t,
    ranks_t2i,
    recall_summary,
    rsum,
    twin_accuracy,
    twin_counts,
    twins_in_fold,
)
from crossmatch.retrieval.rerank import rerank, reranks
from crossmatch.tensors import (
    all_gather_varlen,
    cat_features,
    get_rank,
    get_world_size,
    rank_range,
    slice_features,
    to_device,
)

log = logging.getLogger(__name__)


@dataclass
class EvalData:
    """One evaluation split: loaders over its images and captions plus the ground truth."""

    image_loader: DataLoader  # items of ImageView, in index order
    text_loader: DataLoader  # items of CaptionView, in index order
    txt_to_img: Tensor  # (N_txt,) image index of each caption
    twins: list[tuple[int, int]]  # twin image pairs (shapes data), possibly empty


@torch.no_grad()
def encode_all(encode, loader: DataLoader, device: torch.device, desc: str, progress: bool) -> dict[str, Tensor]:
    """Run `encode(batch) -> dict` over a loader; features are kept on `device`.

    Under torchrun each rank encodes every world_size-th item and the shards are gathered back into
    dataset order: each item exactly once (no padded duplicates as with a DistributedSampler)."""
    ws, rank = get_world_size(), get_rank()
    if ws > 1:
        shard = Subset(loader.dataset, range(rank, len(loader.dataset), ws))
        loader = DataLoader(
            shard, batch_size=loader.batch_size, collate_fn=loader.collate_fn, num_workers=loader.num_workers
        )
    chunks = [encode(to_device(b, device)) for b in tqdm(loader, desc=desc, disable=not progress, leave=False)]
    feats = cat_features(chunks)
    if ws == 1:
        return feats
    out = {}
    for key, value in feats.items():
        parts = all_gather_varlen(value)  # rank r holds items r, r + ws, r + 2 ws, ...
        full = parts[0].new_zeros((sum(len(p) for p in parts), *parts[0].shape[1:]))
        for r, p in enumerate(parts):
            full[r::ws] = p
        out[key] = full
    return out


@torch.no_grad()
def score_all_pairs(
    model: nn.Module, img: dict[str, Tensor], txt: dict[str, Tensor], chunk_size: int = 512, progress: bool = False
) -> Tensor:
    """(N_img, N_txt) float32 score matrix on the CPU, computed in blocks of `chunk_size` images so
    that only one (chunk, N_txt) block of model-side intermediates lives at a time. Under torchrun each
    rank scores a contiguous share of the images and the blocks are gathered."""
    n_img = next(iter(img.values())).shape[0]
    mine = rank_range(n_img)
    blocks = [torch.zeros(0, next(iter(txt.values())).shape[0])]
    for start in tqdm(range(mine.start, mine.stop, chunk_size), desc="score", disable=not progress, leave=False):
        rows = slice(start, min(start + chunk_size, mine.stop))
        blocks.append(model.similarity(slice_features(img, rows), txt).float().cpu())  # (chunk, N_txt)
    return torch.cat(all_gather_varlen(torch.cat(blocks)))


@torch.no_grad()
def encode_split(model: nn.Module, data: EvalData, device: torch.device, progress: bool = False):
    """Every image and caption of the split encoded once, in eval mode: (img feats, txt feats)."""
    was_training = model.training
    model.eval()
    try:
        img = encode_all(model.encode_image_features, data.image_loader, device, "encode images", progress)
        txt = encode_all(model.encode_text_features, data.text_loader, device, "encode captions", progress)
        return img, txt
    finally:
        model.train(was_training)


@torch.no_grad()
def compute_scores(
    model: nn.Module, data: EvalData, device: torch.device, chunk_size: int = 512, progress: bool = False
) -> Tensor:
    """Encode the split and score every pair with the model's cheap all-pairs score: (N_img, N_txt)."""
    img, txt = encode_split(model, data, device, progress)
    return score_all_pairs(model.eval(), img, txt, chunk_size, progress)


def split_metrics(s_i2t: Tensor, s_t2i: Tensor, txt_to_img: Tensor, twins=()) -> dict[str, float]:
    """Metrics when i2t and t2i are ranked from their own matrices (they differ after re-ranking)."""
    m = {**recall_summary(ranks_i2t(s_i2t, txt_to_img), "i2t"), **recall_summary(ranks_t2i(s_t2i, txt_to_img), "t2i")}
    m["rsum"] = rsum(m)
    if twins:
        m["twin_acc"] = twin_accuracy(s_i2t, txt_to_img, twins)
    return m


@torch.no_grad()
def evaluate_retrieval(model: nn.Module, data: EvalData, device: torch.device, **protocol) -> dict[str, float]:
    """Encode, score and measure one split; returns the dict of `crossmatch.metrics.retrieval_metrics`
    (plus `twin_acc` when the split has twins). `protocol`: the keyword arguments of `evaluate_with_scores`
    (chunk_size, folds, rerank_k, rerank_batch, stage1, progress)."""
    return evaluate_with_scores(model, data, device, **protocol)[0]


@torch.no_grad()
def evaluate_with_scores(
    model: nn.Module,
    data: EvalData,
    device: torch.device,
    chunk_size: int = 512,
    folds: int = 1,
    rerank_k: int = 0,
    rerank_batch: int = 256,
    stage1: Tensor | None = None,
    progress: bool = False,
) -> tuple[dict[str, float], Tensor]:
    """Encode, score and measure one split: (metrics, stage-1 scores (N_img, N_txt) on the CPU).

    Metrics are those of `crossmatch.metrics.retrieval_metrics` (plus `twin_acc` when the split has twins);
    the scores are the all-pairs matrix before any re-ranking (what failure reports show).

    Args:
        folds: mean of every metric over this many consecutive image folds (COCO 1K: 5), rsum of the means;
            `twin_acc` pools the cases of every fold (twin pairs whose images fall in different folds are
            not scored), exactly as `twin_accuracy` pools the pairs of one split.
        rerank_k: > 0 re-scores each query's top-k stage-1 candidates with `model.score_pairs` (fusion models).
        stage1: (N_img, N_txt) stage-1 scores from another model; default: the model's own `similarity`.
    """
    try:
        fold_list = image_folds(data.txt_to_img, folds)
    except ValueError as err:
        raise ConfigError(f"eval.folds={folds}: {err}") from err
    img, txt = encode_split(model, data, device, progress)
    model.eval()
    scores = stage1 if stage1 is not None else score_all_pairs(model, img, txt, chunk_size, progress)
    per_fold, wins, cases = [], 0, 0
    for images, txt_ids in fold_list:
        img_ids = torch.arange(images.start, images.stop)
        sub = scores[images][:, txt_ids]  # (fold images, fold captions)
        t2i = data.txt_to_img[txt_ids] - images.start
        if reranks(model, rerank_k):
            ix_i, ix_t = img_ids.to(device), txt_ids.to(device)
            s_i2t, s_t2i = rerank(
                model, sub, slice_features(img, ix_i), slice_features(txt, ix_t), rerank_k, rerank_batch, progress
            )
        else:
            s_i2t = s_t2i = sub
        per_fold.append(split_metrics(s_i2t, s_t2i, t2i))
        w, c = twin_counts(s_i2t, t2i, twins_in_fold(data.twins, images))
        wins, cases = wins + w, cases + c
    metrics = mean_over_folds(per_fold)
    if cases:
        metrics["twin_acc"] = 100.0 * wins / cases
    return metrics, scores
