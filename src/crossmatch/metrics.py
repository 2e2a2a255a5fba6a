"""Retrieval metrics as pure functions on score matrices.

Protocols implemented:

- Image-text retrieval (Flickr30K, COCO 5K): i2t and t2i R@1/5/10, median and mean rank, rsum, with any
  number of captions per image, given by an explicit `txt_to_img` map (`retrieval_metrics`).
- COCO 1K: every metric averaged over consecutive image folds, rsum of the averages (`fold_metrics`).
- Twin accuracy: does an image prefer its own captions to those of a near-duplicate twin (`twin_accuracy`);
  under folds, cases are pooled over the twin pairs whose two images share a fold (`twin_counts`).
- Text-based person search (CUHK-PEDES, ICFG-PEDES, RSTPReid): CMC R@K, mAP and mINP with relevance by
  identity (`person_search_metrics`); twin accuracy by identity: does a caption of a person prefer that
  person's images to those of a near-identical twin identity (`twin_identity_accuracy`).

Ties are pessimistic everywhere: a non-matching candidate whose score equals the best positive is ranked
ahead of it, so a model that outputs constant scores gets the worst rank, never a perfect one. That rule has
one home, `pessimistic_ranks`, which every rank here (and search's and the HTML report's) comes from. Ranks
are 0-based. Inputs may be torch tensors or numpy arrays; work is done in torch on the scores' device, in
chunks of rows or columns, so no extra memory of the size of the full matrix is needed.

Legend: I images, T captions (texts), Q queries, G gallery items, C rows or columns in one chunk.
"""

from collections.abc import Sequence

import numpy as np
import torch

Array = torch.Tensor | np.ndarray | Sequence
DEFAULT_CHUNK = 256  # rows (i2t, person search) or columns (t2i) scored at once


def _scores(scores: Array) -> torch.Tensor:
    s = torch.as_tensor(scores).detach()
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D, got shape {tuple(s.shape)}")
    if not s.is_floating_point():
        s = s.double()  # masked_fill(-inf) needs a float dtype; float64 keeps integer scores exact
    return s


def _check_no_nan(block: torch.Tensor) -> None:
    if torch.isnan(block).any():
        raise ValueError("scores contain NaN; ranks would be undefined")


def _txt_to_img(txt_to_img: Array, n_img: int, n_txt: int, device: torch.device) -> torch.Tensor:
    t2i = torch.as_tensor(txt_to_img, device=device).long().reshape(-1)
    if t2i.numel() != n_txt:
        raise ValueError(f"txt_to_img has {t2i.numel()} entries but scores have {n_txt} captions (columns)")
    if n_txt and (t2i.min() < 0 or t2i.max() >= n_img):
        raise ValueError(f"txt_to_img holds image indices outside [0, {n_img})")
    counts = torch.bincount(t2i, minlength=n_img)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten()[:10].tolist()
        raise ValueError(f"{int((counts == 0).sum())} image(s) have no caption, e.g. {missing}; every image needs one")
    return t2i


def pessimistic_ranks(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """0-based pessimistic rank of the best positive of each row.

    rank = #{non-positive g : s_g >= max over positive g' of s_g'}: a non-positive item that ties the best
    positive is counted ahead of it. A row without any positive gets G (every item ahead).

    Args:
        scores: float scores, shape (..., G), e.g. (C, G) for C queries or (G,) for one.
        positive: bool, same shape: the items that count as a match of the row's query.

    Returns:
        Long tensor of ranks, shape (...).
    """
    best = scores.masked_fill(~positive, float("-inf")).amax(dim=-1, keepdim=True)  # (..., 1)
    return ((scores >= best) & ~positive).sum(dim=-1)  # (...)


def ranks_i2t(scores: Array, txt_to_img: Array, *, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Pessimistic 0-based rank of each image's best caption.

    rank_i = #{captions k not of image i : s_ik >= max over captions j of image i of s_ij}.

    Args:
        scores: similarity matrix, shape (I, T).
        txt_to_img: image index of each caption, shape (T,).
        chunk_size: image rows processed at once.

    Returns:
        Long tensor of ranks, shape (I,).
    """
    s = _scores(scores)
    n_img, n_txt = s.shape
    t2i = _txt_to_img(txt_to_img, n_img, n_txt, s.device)
    out = []
    for i0 in range(0, n_img, chunk_size):
        block = s[i0 : i0 + chunk_size]  # (C, T)
        _check_no_nan(block)
        rows = torch.arange(i0, i0 + block.shape[0], device=s.device)
        pos = t2i[None, :] == rows[:, None]  # (C, T) caption belongs to the row's image
        out.append(pessimistic_ranks(block, pos))  # (C,)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=s.device)


def ranks_t2i(scores: Array, txt_to_img: Array, *, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Pessimistic 0-based rank of each caption's image.

    rank_t = #{images i != gt(t) : s_it >= s_gt(t),t}.

    Args:
        scores: similarity matrix, shape (I, T).
        txt_to_img: image index of each caption, shape (T,).
        chunk_size: caption columns processed at once.

    Returns:
        Long tensor of ranks, shape (T,).
    """
    s = _scores(scores)
    n_img, n_txt = s.shape
    t2i = _txt_to_img(txt_to_img, n_img, n_txt, s.device)
    images = torch.arange(n_img, device=s.device)
    out = []
    for j0 in range(0, n_txt, chunk_size):
        block = s[:, j0 : j0 + chunk_size].t()  # (C, I)
        _check_no_nan(block)
        pos = t2i[j0 : j0 + block.shape[0], None] == images[None, :]  # (C, I) the caption's own image
        out.append(pessimistic_ranks(block, pos))  # (C,)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=s.device)


def recall_summary(ranks: torch.Tensor, prefix: str, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """R@K, median rank and mean rank from 0-based ranks.

    R@K = 100 * fraction of ranks < K; medr = floor(median rank) + 1 (the median of an even count is the
    mean of the two middle ranks, as numpy computes it); meanr = mean rank + 1.

    Args:
        ranks: 0-based ranks, shape (N,), N >= 1.
        prefix: key prefix, e.g. "i2t" gives "i2t_r1"; "" gives "r1".
        ks: cut-offs for R@K.

    Returns:
        Dict with keys `{prefix}_r{k}` for each k, `{prefix}_medr` and `{prefix}_meanr`.
    """
    r = torch.as_tensor(ranks).detach().reshape(-1).long().cpu()
    if r.numel() == 0:
        raise ValueError("recall_summary needs at least one rank")
    p = f"{prefix}_" if prefix else ""
    out = {f"{p}r{k}": 100.0 * (r < k).double().mean().item() for k in ks}
    srt, n = r.sort().values, r.numel()
    mid2 = int(srt[n // 2]) * 2 if n % 2 else int(srt[n // 2 - 1]) + int(srt[n // 2])  # twice the median
    out[f"{p}medr"] = float(mid2 // 2 + 1)
    out[f"{p}meanr"] = r.double().mean().item() + 1.0
    return out


def retrieval_metrics(scores: Array, txt_to_img: Array, *, chunk_size: int = DEFAULT_CHUNK) -> dict[str, float]:
    """Image-to-text and text-to-image retrieval metrics with pessimistic ties.

    Args:
        scores: similarity matrix, shape (I, T); higher means more similar.
        txt_to_img: image index of each caption, shape (T,); any number (>= 1) of captions per image, in
            any order.
        chunk_size: rows or columns processed at once (bounds the extra memory).

    Returns:
        Dict with keys i2t_r1 i2t_r5 i2t_r10 i2t_medr i2t_meanr t2i_r1 t2i_r5 t2i_r10 t2i_medr t2i_meanr
        rsum; recalls in percent, ranks 1-based.

    Raises:
        ValueError: bad shapes, out-of-range indices, an image without captions, or NaN scores.
    """
    out = recall_summary(ranks_i2t(scores, txt_to_img, chunk_size=chunk_size), "i2t")
    out |= recall_summary(ranks_t2i(scores, txt_to_img, chunk_size=chunk_size), "t2i")
    out["rsum"] = rsum(out)
    return out


def rsum(m: dict[str, float]) -> float:
    """i2t R@1 + R@5 + R@10 + t2i R@1 + R@5 + R@10 of a metrics dict."""
    return sum(m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))


def image_folds(txt_to_img: Array, n_folds: int) -> list[tuple[slice, torch.Tensor]]:
    """COCO 1K folds: consecutive image ranges and their captions.

    Fold f holds images [f*I/n_folds, (f+1)*I/n_folds) and every caption of those images.

    Args:
        txt_to_img: image index of each caption, shape (T,); I = max + 1.
        n_folds: number of folds; must divide I.

    Returns:
        Per fold, (image slice, caption indices (T_f,) in caption order).

    Raises:
        ValueError: n_folds < 1 or not a divisor of the number of images.
    """
    t2i = torch.as_tensor(txt_to_img).long().reshape(-1)
    n_img = int(t2i.max()) + 1 if t2i.numel() else 0
    if n_folds < 1 or n_img % n_folds:
        raise ValueError(f"n_folds={n_folds} must be >= 1 and divide the number of images ({n_img})")
    size = n_img // n_folds
    return [
        (slice(f * size, (f + 1) * size), torch.nonzero((t2i >= f * size) & (t2i < (f + 1) * size)).flatten())
        for f in range(n_folds)
    ]


def twins_in_fold(twins: Sequence[tuple[int, int]], images: slice) -> list[tuple[int, int]]:
    """The twin pairs with both images in `images`, re-indexed from the fold's first image."""
    lo, hi = images.start, images.stop
    return [(a - lo, b - lo) for a, b in twins if lo <= a < hi and lo <= b < hi]


def mean_over_folds(per_fold: Sequence[dict[str, float]]) -> dict[str, float]:
    """Every recall/rank metric averaged over folds, rsum recomputed as the sum of the averaged recalls.

    Keys are the union over folds (a key missing from a fold is averaged over the folds that have it);
    `twin_acc` is not averaged: see `evaluate`-side pooling with `twin_counts`.
    """
    keys = list(dict.fromkeys(k for m in per_fold for k in m if k != "twin_acc"))
    out = {}
    for k in keys:
        values = [m[k] for m in per_fold if k in m]
        out[k] = sum(values) / len(values)
    if all(f"{d}_r{k}" in out for d in ("i2t", "t2i") for k in (1, 5, 10)):
        out["rsum"] = rsum(out)
    return out


def fold_metrics(
    scores: Array, txt_to_img: Array, n_folds: int, *, chunk_size: int = DEFAULT_CHUNK
) -> dict[str, float]:
    """COCO 1K protocol: `retrieval_metrics` on consecutive image folds, every metric averaged.

    Fold f holds images [f*I/n_folds, (f+1)*I/n_folds) and their captions; scores across folds are
    ignored. rsum is the sum of the averaged recalls (not the mean of anything printed per fold).

    Args:
        scores: similarity matrix, shape (I, T).
        txt_to_img: image index of each caption, shape (T,).
        n_folds: number of folds; must divide I (5 for COCO 1K).
        chunk_size: see `retrieval_metrics`.

    Returns:
        Same keys as `retrieval_metrics`.
    """
    s = _scores(scores)
    n_img, n_txt = s.shape
    t2i = _txt_to_img(txt_to_img, n_img, n_txt, s.device)
    folds = []
    for images, caps in image_folds(t2i.cpu(), n_folds):
        caps = caps.to(s.device)
        sub = s[images].index_select(1, caps)  # (I/n_folds, T_f)
        folds.append(retrieval_metrics(sub, t2i[caps] - images.start, chunk_size=chunk_size))
    return mean_over_folds(folds)


def twin_counts(scores: Array, txt_to_img: Array, twins: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """(successful cases, cases) of `twin_accuracy`; sums of these pool twin accuracy over folds."""
    s = _scores(scores)
    n_img, n_txt = s.shape
    t2i = torch.as_tensor(txt_to_img, device=s.device).long().reshape(-1)
    if t2i.numel() != n_txt:
        raise ValueError(f"txt_to_img has {t2i.numel()} entries but scores have {n_txt} captions (columns)")
    wins = total = 0
    for a, b in twins:
        if not (0 <= a < n_img and 0 <= b < n_img) or a == b:
            raise ValueError(f"bad twin pair ({a}, {b}) for {n_img} images")
        for x, y in ((a, b), (b, a)):
            own, other = torch.nonzero(t2i == x).flatten(), torch.nonzero(t2i == y).flatten()
            if own.numel() == 0 or other.numel() == 0:
                raise ValueError(f"twin pair ({a}, {b}): every twin image needs at least one caption")
            _check_no_nan(s[x])
            cmp = s[x, own][:, None] > s[x, other][None, :]  # (n_own, n_other)
            wins += int(cmp.sum())
            total += cmp.numel()
    return wins, total


def twin_accuracy(scores: Array, txt_to_img: Array, twins: Sequence[tuple[int, int]]) -> float:
    """How often an image prefers its own captions to its twin's.

    For every pair (a, b) in `twins` and both directions (x, y) = (a, b) and (b, a), every own caption c of
    x and every caption c' of y give one case; it succeeds when s(x, c) > s(x, c') strictly (ties fail).
    Cases are pooled over all pairs, so pairs with more captions weigh more. Under a fold protocol the
    cases of every fold are pooled the same way (twin pairs split by a fold boundary are not scored).

    Args:
        scores: similarity matrix, shape (I, T).
        txt_to_img: image index of each caption, shape (T,).
        twins: (img_a, img_b) index pairs, each pair listed once.

    Returns:
        Percentage (0-100) of successful cases.
    """
    if len(twins) == 0:
        raise ValueError("twins is empty")
    wins, total = twin_counts(scores, txt_to_img, twins)
    return 100.0 * wins / total


def _scores_by_identity(scores: Array, query_ids: Array, gallery_ids: Array) -> tuple[torch.Tensor, ...]:
    """(Q, G) float scores, (Q,) query ids and (G,) gallery ids on the scores' device; ValueError on a mismatch."""
    s = _scores(scores)
    qid = torch.as_tensor(query_ids, device=s.device).reshape(-1)
    gid = torch.as_tensor(gallery_ids, device=s.device).reshape(-1)
    if qid.numel() != s.shape[0] or gid.numel() != s.shape[1]:
        raise ValueError(f"ids of length {qid.numel()}/{gid.numel()} do not match scores of shape {tuple(s.shape)}")
    return s, qid, gid


def person_search_metrics(
    scores: Array,
    query_ids: Array,
    gallery_ids: Array,
    ks: Sequence[int] = (1, 5, 10),
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> dict[str, float]:
    """Text-to-image person search: CMC R@K, mAP and mINP, relevance by identity.

    Each gallery row is sorted by descending score; among equal scores, non-relevant items come before
    relevant ones (pessimistic and deterministic). With 1-based positions p_1 < ... < p_n of the n relevant
    items: AP = mean_j (j / p_j); INP = n / p_n; a query hits R@K when p_1 <= K.

    Args:
        scores: similarity matrix, shape (Q, G).
        query_ids: identity of each query, shape (Q,).
        gallery_ids: identity of each gallery item, shape (G,).
        ks: cut-offs for R@K.
        chunk_size: query rows processed at once.

    Returns:
        Dict with `r{k}` for each k, `mAP` and `mINP`, all percentages.

    Raises:
        ValueError: bad shapes, NaN scores, or a query with no relevant gallery item.
    """
    s, qid, gid = _scores_by_identity(scores, query_ids, gallery_ids)
    n_q, n_g = s.shape
    if n_q == 0:
        raise ValueError("person_search_metrics needs at least one query")
    first, ap, inp = [], [], []
    pos = torch.arange(1, n_g + 1, device=s.device, dtype=torch.float64)  # (G,) 1-based positions
    for q0 in range(0, n_q, chunk_size):
        block = s[q0 : q0 + chunk_size]  # (C, G)
        _check_no_nan(block)
        rel = qid[q0 : q0 + block.shape[0], None] == gid[None, :]  # (C, G)
        n_rel = rel.sum(dim=1)  # (C,)
        if (n_rel == 0).any():
            bad = q0 + int(torch.nonzero(n_rel == 0)[0])
            raise ValueError(f"query {bad} has no relevant gallery item")
        first.append(pessimistic_ranks(block, rel))  # (C,) 0-based position of the first relevant item
        # Two stable sorts: non-relevant first, then by score, so ties put relevant items last (the order
        # pessimistic_ranks counts: the first relevant item of this order sits at its rank).
        by_rel = torch.argsort(rel.to(torch.uint8), dim=1, stable=True)  # (C, G)
        by_score = torch.argsort(block.gather(1, by_rel), dim=1, descending=True, stable=True)  # (C, G)
        hit = rel.gather(1, by_rel.gather(1, by_score))  # (C, G) relevance in ranked order
        cum = hit.cumsum(dim=1).double()  # (C, G) relevant items up to each position
        ap.append((cum / pos * hit).sum(dim=1) / n_rel)  # (C,)
        last = (pos * hit).amax(dim=1)  # (C,) 1-based position of the last relevant item
        inp.append(n_rel / last)
    out = {k: v for k, v in recall_summary(torch.cat(first), "", ks).items() if k.startswith("r")}
    out["mAP"] = 100.0 * torch.cat(ap).mean().item()
    out["mINP"] = 100.0 * torch.cat(inp).mean().item()
    return out


def twin_identity_accuracy(
    scores: Array, query_ids: Array, gallery_ids: Array, twin_pids: Sequence[tuple[int, int]]
) -> float:
    """How often a caption of a twin identity prefers its own person's images to the twin's.

    For every pair (A, B) in `twin_pids` and every query q of identity A (and, the other way round, of B):
    the case succeeds when max over A's gallery items of s(q, g) > max over B's gallery items strictly (a
    tie fails). Cases are pooled over all pairs, so identities with more captions weigh more.

    Args:
        scores: similarity matrix, shape (Q, G) (queries are captions, the gallery images).
        query_ids: identity of each query, shape (Q,).
        gallery_ids: identity of each gallery item, shape (G,).
        twin_pids: (pid_a, pid_b) twin identity pairs, each listed once.

    Returns:
        Percentage (0-100) of successful cases.

    Raises:
        ValueError: bad shapes, NaN scores, a pair of one identity, an identity of a pair with no gallery
            item, or no query of any pair.
    """
    s, qid, gid = _scores_by_identity(scores, query_ids, gallery_ids)
    wins = total = 0
    for a, b in twin_pids:
        if a == b:
            raise ValueError(f"twin pair ({a}, {b}) names one identity twice")
        for x, y in ((a, b), (b, a)):
            queries = torch.nonzero(qid == x).flatten()  # (Q_x,)
            own, other = gid == x, gid == y  # (G,) each
            if not own.any() or not other.any():
                raise ValueError(f"twin pair ({a}, {b}): identity {x if not own.any() else y} has no gallery item")
            rows = s[queries]  # (Q_x, G)
            _check_no_nan(rows)
            best_own, best_other = rows[:, own].amax(dim=1), rows[:, other].amax(dim=1)  # (Q_x,) each
            wins += int((best_own > best_other).sum())
            total += queries.numel()
    if total == 0:
        raise ValueError("no query belongs to a twin identity")
    return 100.0 * wins / total
