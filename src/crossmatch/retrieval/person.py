"""Text-based person search evaluation (CUHK-PEDES protocol, Li et al., CVPR 2017; mAP and mINP as in
IRRA, Jiang & Ye, CVPR 2023): every caption of the split queries the split's image gallery, and an image is
relevant when it shows the caption's person (same identity), not only when it is the caption's own image.

Metrics (from `crossmatch.metrics.person_search_metrics`, pessimistic ties), in percent: text -> image
t2i_r1, t2i_r5, t2i_r10 (CMC), t2i_mAP, t2i_mINP (the field's protocol), and image -> text the same five
with the prefix i2t_ (each image queries the split's captions; relevant: the captions of its person);
on a split with twin identities (records with "twin_pid", as `crossmatch data people` writes) also
t2i_twin_acc (`crossmatch.metrics.twin_identity_accuracy`: a caption's best score over its own person's
images beats its best over the twin's; 50 is chance, ties fail).
Note that `t2i_r1` here is identity-level, while `evaluate_retrieval`'s `t2i_r1` is instance-level.

Legend: N_img images (the gallery), N_txt captions (the queries).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from crossmatch.metrics import person_search_metrics, twin_identity_accuracy
from crossmatch.retrieval.evaluate import EvalData, compute_scores

KEYS = ("t2i_r1", "t2i_r5", "t2i_r10", "t2i_mAP", "t2i_mINP")
I2T_KEYS = tuple(k.replace("t2i_", "i2t_") for k in KEYS)
TWIN_KEY = "t2i_twin_acc"  # only on splits with twin identities


def image_pids(ds) -> Tensor | None:
    """(N_img,) person identity of each image of a split, or None when any image has none."""
    pids = [rec.pid for rec in ds.images]
    return None if any(p is None for p in pids) else torch.tensor(pids, dtype=torch.long)


@torch.no_grad()
def evaluate_person_search(
    model: nn.Module,
    data: EvalData,
    image_pids: Tensor,
    device: torch.device,
    chunk_size: int = 512,
    progress: bool = False,
    twin_pids: Sequence[tuple[int, int]] = (),
) -> dict[str, float]:
    """Text -> image person search on one split.

    Args:
        model: any model with the retrieval interface (encode_image_features, encode_text_features, similarity).
        data: the split's loaders and `txt_to_img` (N_txt,).
        image_pids: (N_img,) identity of each image; a caption's identity is that of its image.
        chunk_size: images per block of the (N_img, N_txt) score matrix.
        twin_pids: (pid_a, pid_b) twin identity pairs of the split (`ImageCaptionDataset.twin_pids`).
    Returns:
        {t2i_r1, t2i_r5, t2i_r10, t2i_mAP, t2i_mINP, the same five i2t_[, t2i_twin_acc]}, percentages.
    """
    scores = compute_scores(model, data, device, chunk_size, progress)  # (N_img, N_txt)
    return person_metrics(scores, data.txt_to_img, image_pids, chunk_size, twin_pids)


def person_metrics(
    scores: Tensor,
    txt_to_img: Tensor,
    image_pids: Tensor,
    chunk_size: int = 512,
    twin_pids: Sequence[tuple[int, int]] = (),
) -> dict[str, float]:
    """Text -> image and image -> text person-search metrics of a (N_img, N_txt) score matrix, relevance by
    identity; with `twin_pids`, also t2i_twin_acc over the pairs whose two identities both have images here."""
    image_pids = torch.as_tensor(image_pids, dtype=torch.long).cpu()
    if image_pids.numel() != scores.shape[0]:
        raise ValueError(f"{image_pids.numel()} image pids for a split of {scores.shape[0]} images")
    query_pids = image_pids[torch.as_tensor(txt_to_img).cpu()]  # (N_txt,)
    metrics = person_search_metrics(scores.t(), query_pids, image_pids, chunk_size=chunk_size)  # queries = texts
    out = {f"t2i_{k}": v for k, v in metrics.items()}
    i2t = person_search_metrics(scores, image_pids, query_pids, chunk_size=chunk_size)  # queries = images
    out.update({f"i2t_{k}": v for k, v in i2t.items()})
    present = set(image_pids.tolist())
    pairs = [(a, b) for a, b in twin_pids if a in present and b in present]
    if pairs:
        out[TWIN_KEY] = twin_identity_accuracy(scores.t(), query_pids, image_pids, pairs)  # (N_txt, N_img)
    return out


def format_person_table(metrics: dict[str, float]) -> str:
    """A row per direction: R@1/5/10, mAP, mINP (and t2i twin accuracy on a split with twins)."""
    head = f"{'':5}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'mAP':>8}{'mINP':>8}"
    rows = [f"{'t2i':5}" + "".join(f"{metrics[k]:8.2f}" for k in KEYS)]
    if all(k in metrics for k in I2T_KEYS):
        rows.append(f"{'i2t':5}" + "".join(f"{metrics[k]:8.2f}" for k in I2T_KEYS))
    if TWIN_KEY in metrics:
        head, rows[0] = f"{head}{'twin':>8}", f"{rows[0]}{metrics[TWIN_KEY]:8.2f}"
    return "\n".join([head, *rows])
