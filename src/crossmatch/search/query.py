"""One query against a split: a sentence -> every image's score (re-ranked by a fusion model's pair
scorer when `eval.rerank_k` > 0), or an image -> every caption's score.

Legend: N_img images, N_txt captions of the split, k re-ranked candidates.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from crossmatch.data.tokenizer import CaptionTokenizer
from crossmatch.metrics import pessimistic_ranks
from crossmatch.retrieval.evaluate import EvalData, encode_all
from crossmatch.retrieval.rerank import rerank_text_query, reranks
from crossmatch.tensors import FeatureDict, to_device


def encode_query(model: nn.Module, tokenizer: CaptionTokenizer, text: str, device: torch.device) -> FeatureDict:
    """A sentence -> the model's text features (1, ...). An empty query, or one whose every word is
    unknown to the tokenizer, is refused: ranking by [UNK] alone would be noise presented as a result."""
    t = torch.tensor([tokenizer.encode_query(text)])
    return model.encode_text_features(to_device({"input_ids": t, "attention_mask": t != 0}, device))


@torch.no_grad()
def text_query_scores(
    model: nn.Module,
    tokenizer: CaptionTokenizer,
    data: EvalData,
    text: str,
    device: torch.device,
    rerank_k: int = 0,
    rerank_batch: int = 256,
) -> tuple[Tensor, FeatureDict, FeatureDict]:
    """(N_img,) score of every image of the split for `text` (CPU), and the image and query features.
    Fusion models re-rank the top `rerank_k` images, `rerank_batch` pairs per `score_pairs` call."""
    txt = encode_query(model, tokenizer, text, device)
    img = encode_all(model.encode_image_features, data.image_loader, device, "encode images", False)
    scores = model.similarity(img, txt)[:, 0].float().cpu()  # (N_img,) stage 1
    if reranks(model, rerank_k):  # fusion models: re-rank the top-k
        scores = rerank_text_query(model, scores, img, txt, rerank_k, rerank_batch)
    return scores, img, txt


@torch.no_grad()
def image_query_scores(model: nn.Module, image: Tensor, data: EvalData, device: torch.device) -> Tensor:
    """(N_txt,) score of every caption of the split for one preprocessed image (3, S, S) (CPU)."""
    img = model.encode_image_features(to_device({"image": image[None]}, device))
    txt = encode_all(model.encode_text_features, data.text_loader, device, "encode captions", False)
    return model.similarity(img, txt)[0].float().cpu()


def match_rank(scores: Tensor, matches: set[int]) -> int | None:
    """1-based rank of the best of `matches` in `scores` (N,), ties against the model
    (`crossmatch.metrics.pessimistic_ranks`); None without matches."""
    if not matches:
        return None
    positive = torch.zeros(len(scores), dtype=torch.bool)
    positive[list(matches)] = True
    return int(pessimistic_ranks(scores, positive)) + 1
