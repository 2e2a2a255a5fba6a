"""Retrieval evaluation shared by the Trainer and the CLI: encode every image and caption of a split
once, score all pairs in bounded-memory chunks, compute the metrics of `crossmatch.metrics`.

Legend: N_img images, N_txt captions of the split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from crossmatch.metrics import fold_metrics, twin_accuracy

log = logging.getLogger(__name__)


@dataclass
class EvalData:
    """One evaluation split: loaders over its images and captions plus the ground truth."""

    image_loader: DataLoader  # items of ImageView, in index order
    text_loader: DataLoader  # items of CaptionView, in index order
    txt_to_img: Tensor  # (N_txt,) image index of each caption
    twins: list[tuple[int, int]]  # twin image pairs (shapes data), possibly empty


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def cat_features(chunks: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate per-batch feature dicts along dim 0, zero-padding dim 1 of token features."""
    out = {}
    for key in chunks[0]:
        parts = [c[key] for c in chunks]
        if parts[0].ndim >= 2 and len({p.shape[1] for p in parts}) > 1:
            width = max(p.shape[1] for p in parts)
            parts = [nn.functional.pad(p, [0, 0] * (p.ndim - 2) + [0, width - p.shape[1]]) for p in parts]
        out[key] = torch.cat(parts)
    return out


@torch.no_grad()
def encode_all(encode, loader: DataLoader, device: torch.device, desc: str, progress: bool) -> dict[str, Tensor]:
    """Run `encode(batch) -> dict` over a loader; features are kept on `device`."""
    chunks = [encode(to_device(b, device)) for b in tqdm(loader, desc=desc, disable=not progress, leave=False)]
    return cat_features(chunks)


def slice_features(feats: dict[str, Tensor], index: slice | Tensor) -> dict[str, Tensor]:
    return {k: v[index] for k, v in feats.items()}


@torch.no_grad()
def score_all_pairs(
    model: nn.Module, img: dict[str, Tensor], txt: dict[str, Tensor], chunk_size: int = 512, progress: bool = False
) -> Tensor:
    """(N_img, N_txt) float32 score matrix on the CPU, computed in blocks of `chunk_size` images so
    that only one (chunk, N_txt) block of model-side intermediates lives at a time."""
    n_img = next(iter(img.values())).shape[0]
    blocks = []
    for start in tqdm(range(0, n_img, chunk_size), desc="score", disable=not progress, leave=False):
        block = model.similarity(slice_features(img, slice(start, start + chunk_size)), txt)  # (chunk, N_txt)
        blocks.append(block.float().cpu())
    return torch.cat(blocks)


@torch.no_grad()
def compute_scores(
    model: nn.Module, data: EvalData, device: torch.device, chunk_size: int = 512, progress: bool = False
) -> Tensor:
    """Encode the split and score every pair: (N_img, N_txt)."""
    was_training = model.training
    model.eval()
    try:
        img = encode_all(model.encode_image, data.image_loader, device, "encode images", progress)
        txt = encode_all(model.encode_text, data.text_loader, device, "encode captions", progress)
        return score_all_pairs(model, img, txt, chunk_size, progress)
    finally:
        model.train(was_training)


def metrics_from_scores(scores: Tensor, data: EvalData, folds: int = 1) -> dict[str, float]:
    """Retrieval metrics (mean over `folds` consecutive image folds, e.g. COCO 1K) plus twin_acc."""
    metrics = fold_metrics(scores, data.txt_to_img, folds)
    if data.twins:
        metrics["twin_acc"] = twin_accuracy(scores, data.txt_to_img, data.twins)
    return metrics


def evaluate_retrieval(
    model: nn.Module,
    data: EvalData,
    device: torch.device,
    chunk_size: int = 512,
    folds: int = 1,
    progress: bool = False,
) -> dict[str, float]:
    """Encode, score and measure one split. Returns the dict of `crossmatch.metrics.retrieval_metrics`
    (plus `twin_acc` when the split has twins)."""
    scores = compute_scores(model, data, device, chunk_size, progress)
    return metrics_from_scores(scores, data, folds)
