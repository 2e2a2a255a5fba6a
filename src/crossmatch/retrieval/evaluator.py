"""The evaluation protocol of a run, in one object: which metrics (image-text retrieval, COCO folds, twins,
or person search by identity), which first stage (the model's own all-pairs score or another model's), and
whether a fusion model re-ranks its top-k. The Trainer and `crossmatch evaluate` call the same Evaluator.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from crossmatch.config import EvalConfig
from crossmatch.retrieval.evaluate import EvalData, compute_scores, evaluate_with_scores
from crossmatch.retrieval.person import person_metrics


class Evaluator:
    """`evaluator(model) -> metrics` for one split; `evaluate(model) -> (metrics, stage-1 scores)`.

    Args:
        data: the split's loaders and ground truth.
        cfg: the eval section (chunk_size, folds, rerank_k, rerank_batch).
        device: where the model runs.
        image_pids: (N_img,) person identities: person-search metrics instead of image-text retrieval.
        first_stage: returns (N_img, N_txt) stage-1 scores of another model (`eval.first_stage`); called
            once, on first use, and reused by every later evaluation.
        progress: tqdm bars.
        twin_pids: (pid_a, pid_b) twin identity pairs: person search also reports twin accuracy by identity.
    """

    def __init__(
        self,
        data: EvalData,
        cfg: EvalConfig,
        device: torch.device,
        image_pids: Tensor | None = None,
        first_stage: Callable[[], Tensor] | None = None,
        progress: bool = False,
        twin_pids: list[tuple[int, int]] | tuple = (),
    ):
        self.data, self.cfg, self.device, self.image_pids = data, cfg, device, image_pids
        self.twin_pids = twin_pids
        self.first_stage, self.progress = first_stage, progress
        self._stage1: Tensor | None = None

    def __call__(self, model: nn.Module) -> dict[str, float]:
        return self.evaluate(model)[0]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[dict[str, float], Tensor]:
        cfg = self.cfg
        if self.image_pids is not None:
            scores = compute_scores(model, self.data, self.device, cfg.chunk_size, self.progress)
            metrics = person_metrics(scores, self.data.txt_to_img, self.image_pids, cfg.chunk_size, self.twin_pids)
            return metrics, scores
        if self.first_stage is not None and self._stage1 is None:
            self._stage1 = self.first_stage()
        args = (cfg.chunk_size, cfg.folds, cfg.rerank_k, cfg.rerank_batch, self._stage1, self.progress)
        return evaluate_with_scores(model, self.data, self.device, *args)
