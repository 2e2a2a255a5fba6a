"""SCAN's cross-attention score for every image-caption pair, batched, masked and chunked.

Stacked Cross Attention (Lee et al., "Stacked Cross Attention for Image-Text Matching", ECCV 2018).
The reference (kuanghuei/SCAN `xattn_score_t2i` / `xattn_score_i2t`) loops over captions in Python and
builds one D-dimensional attended vector per (image, caption, query item). We never do: with raw scores
s = context . query^T and attention a (a function of s alone), the attended vector c = sum_k a_k x_k of the
context items x_k only enters the score through

    query . c = sum_k a_k s_k          and          ||c||^2 = a^T G a,  G = X X^T (the context's Gram),

so every pair comes from one large GEMM plus small per-item Grams. Both directions share one core written
in terms of a *context* (attended over, softmax axis) and a *query* (its items are scored and pooled):

    t2i: context = image regions, query = caption words  ->  core output (n_img, n_txt)
    i2t: context = caption words, query = image regions  ->  core output (n_txt, n_img), transposed

Padded words are zeroed on entry (padded positions may hold garbage), masked out of the normalisation
across words, the softmax over words (i2t) and the pooling (t2i), so the numbers equal the reference's
per-caption loop that cuts each caption to its length.

Speed: the work besides the GEMM is a handful of elementwise passes over the raw (C, Lc, Q, Lq) tensor.
We run them chunk by chunk on chunks small enough to stay in cache, into two reused buffers, in place
when no gradient is needed. When the captions span several chunks they are sorted by length first and
each chunk is cut to its longest caption, so padding costs neither GEMM columns nor elementwise work (on
the shapes captions, 9-40 words padded to 32, this scores 1.5x faster); see `benchmarks/scan_scoring.py`.

Legend: C context items in a chunk (images for t2i, captions for i2t), Lc items per context (R regions or
W words), Q query items in a chunk, Lq items per query, D width, R regions, W words (padded length).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

RAW_FEATURE_NORMS = ("softmax", "l2norm", "clipped_l2norm", "l1norm", "clipped_l1norm", "clipped", "no_norm")
AGG_FUNCS = ("LogSumExp", "Max", "Sum", "Mean")
DIRECTIONS = ("t2i", "i2t")

EPS = 1e-8  # the reference's eps in l1norm, l2norm and cosine_similarity
LEAKY_SLOPE = 0.1  # the reference's nn.LeakyReLU(0.1) in the clipped_* norms
# Every norm but clipped/no_norm maps raw scores into [-1, 1], so exp(lambda * x) cannot overflow in float32
# (nor can its square in a^T G a) when |lambda| stays below this; beyond it we subtract the max first.
_MAX_UNSHIFTED_LAMBDA = 30.0
# Default chunk size, in elements of the raw (C, Lc, Q, Lq) tensor: 16 MiB per buffer (two are live), so the
# elementwise passes after the GEMM mostly hit the L3 cache, and the chunk's GEMM stays large and efficient.
# A chunk's GEMM is (C*Lc, D) @ (D, Q*Lq): about 2048 x 2048 runs near the speed of the whole GEMM, while
# 256 rows x 16384 columns (the shape before) ran 25% slower (benchmarks/scan_scoring.py).
_CHUNK_ELEMS = 1 << 22
_MIN_GEMM_ROWS = 2048
_LOG2_E = math.log2(math.e)
SORT_CAPTIONS = True  # sort captions by length when they span several chunks (False: benchmarks' before)


def scan_similarity(
    images: Tensor,
    captions: Tensor,
    cap_lens: Tensor,
    direction: str = "t2i",
    raw_feature_norm: str = "clipped_l2norm",
    agg_func: str = "LogSumExp",
    lambda_softmax: float = 9.0,
    lambda_lse: float = 6.0,
    *,
    img_chunk: int | None = None,
    txt_chunk: int | None = None,
    gemm_dtype: torch.dtype | None = None,
) -> Tensor:
    """SCAN similarity of every image with every caption.

    Args:
        images: region features (n_img, R, D), used as given (SCAN l2-normalises them first).
        captions: word features (n_txt, W, D); positions at or after a caption's length are ignored and
            may hold anything.
        cap_lens: (n_txt,) true caption lengths, each in [1, W].
        direction: "t2i" (words attend to regions, pool over words) or "i2t" (regions attend to words,
            pool over regions).
        raw_feature_norm: normalisation of the raw scores across the query axis: one of
            `RAW_FEATURE_NORMS`.
        agg_func: pooling of the per-item relevances: "LogSumExp", "Max", "Sum" or "Mean".
        lambda_softmax: inverse temperature of the softmax over the context axis.
        lambda_lse: inverse temperature of LogSumExp pooling.
        img_chunk: images per chunk (default: sized so one raw chunk holds about 4M elements, 16 MiB).
        txt_chunk: captions per chunk (default: likewise). Memory stays bounded by the chunk, whatever
            n_img x n_txt: without gradients, two raw-chunk buffers are reused across all chunks (with
            gradients, autograd keeps each chunk's intermediates, a few times n_img x R x n_txt x W).
        gemm_dtype: dtype of the one large GEMM of raw scores, e.g. torch.bfloat16 where tensor cores make
            it several times faster (see benchmarks/scan_scoring.py --bf16 for its error); its result and
            every other pass stay in the inputs' dtype. None: the inputs' dtype throughout.

    Returns:
        (n_img, n_txt) scores, differentiable with respect to `images` and `captions`.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if raw_feature_norm not in RAW_FEATURE_NORMS:
        raise ValueError(f"raw_feature_norm must be one of {RAW_FEATURE_NORMS}, got {raw_feature_norm!r}")
    if agg_func not in AGG_FUNCS:
        raise ValueError(f"agg_func must be one of {AGG_FUNCS}, got {agg_func!r}")
    n_img, R, D = images.shape
    n_txt, W, Dt = captions.shape
    if Dt != D or cap_lens.shape != (n_txt,):
        raise ValueError(
            f"shapes disagree: images {tuple(images.shape)}, captions {tuple(captions.shape)}, "
            f"cap_lens {tuple(cap_lens.shape)}"
        )
    if n_txt and (int(cap_lens.min()) < 1 or int(cap_lens.max()) > W):
        raise ValueError(f"cap_lens must lie in [1, {W}]")
    if n_img == 0 or n_txt == 0:
        return images.new_zeros(n_img, n_txt)

    if direction == "t2i":  # context = image regions (all real), query = caption words
        C, Lc, Q, Lq, ctx_chunk, qry_chunk = n_img, R, n_txt, W, img_chunk, txt_chunk
    else:  # context = caption words, query = image regions
        C, Lc, Q, Lq, ctx_chunk, qry_chunk = n_txt, W, n_img, R, txt_chunk, img_chunk
    ctx_chunk, qry_chunk = _chunk_sizes(C, Lc, Q, Lq, ctx_chunk, qry_chunk)
    img_step, txt_step = (ctx_chunk, qry_chunk) if direction == "t2i" else (qry_chunk, ctx_chunk)
    # (regions, mask, norms) per chunk of images: regions are all real (a mask only where they are the query)
    img_parts = [
        (x, None if direction == "t2i" else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), _norms(x))
        for x in images.split(img_step)
    ]  # (regions (n, R, D), mask (n, R) or None, norms (n, R))
    # Captions split into chunks are sorted by length first, so each chunk is cut to its longest caption
    # and padding costs nothing (exact: padded words only ever add zeros; the order is undone at the end).
    order = torch.argsort(cap_lens, stable=True) if SORT_CAPTIONS and txt_step < n_txt else None
    txt_parts = _caption_parts(captions, cap_lens, txt_step, order)
    ctx_parts, qry_parts = (img_parts, txt_parts) if direction == "t2i" else (txt_parts, img_parts)

    inplace = not (torch.is_grad_enabled() and (images.requires_grad or captions.requires_grad))
    buffers = None
    if inplace:
        n = min(ctx_chunk, C) * Lc * min(qry_chunk, Q) * Lq  # the largest chunk: trimmed ones use a prefix
        n_aug = n // Lc * (Lc + 1)  # the first buffer also takes the Gram product and its extra row
        buffers = (images.new_empty(n_aug), images.new_empty(n))  # reused by every chunk: no page faults, warm cache

    gemm_dtype = gemm_dtype or images.dtype
    qry_flat = [qry.reshape(-1, D).to(gemm_dtype) for qry, _, _ in qry_parts]  # (Q*Lq, D) each, cast once
    rows = []
    for ctx, ctx_mask, _ in ctx_parts:
        gram = _gram_with_mask(ctx, ctx_mask)  # (C, Lc+1, Lc)
        ctx_flat = ctx.reshape(-1, D).to(gemm_dtype)  # (C*Lc, D)
        cols = []
        for (_, qry_mask, qry_norm), flat in zip(qry_parts, qry_flat, strict=True):
            rel = _relevance(
                ctx_flat, flat, gram, ctx_mask, qry_norm, qry_mask, raw_feature_norm, lambda_softmax, buffers
            )  # (C, Q, Lq)
            cols.append(_pool(rel, qry_mask, agg_func, lambda_lse))  # (C, Q)
        rows.append(torch.cat(cols, dim=1))
    scores = torch.cat(rows, dim=0)  # (C, Q)
    scores = scores if direction == "t2i" else scores.t()  # (n_img, n_txt), captions in `order`
    if order is not None:
        scores = scores[:, torch.argsort(order).to(scores.device)]  # back to the input order of the captions
    return scores


def _norms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=-1)  # (n, L)


def _caption_parts(
    captions: Tensor, cap_lens: Tensor, step: int, order: Tensor | None
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Caption chunks of `step` captions as (words (n, Wk, D) with padding zeroed, mask (n, Wk), word norms
    (n, Wk)). Padded positions may hold garbage, even NaN: zeroed, they give exactly zero raw scores and
    Gram entries. With `order` (the captions sorted by length) each chunk gathers its captions in that
    order and is cut to its longest one, Wk <= W; without, chunks are slices of the full width."""
    n_txt = captions.shape[0]
    lens = cap_lens.to(captions.device)
    parts = []
    if order is not None:
        order = order.to(captions.device)
        lens = lens[order]
        ends = [min(k + step, n_txt) for k in range(0, n_txt, step)]
        widths = lens[torch.tensor(ends, device=lens.device) - 1].tolist()  # sorted: a chunk's last is its longest
    for k, k0 in enumerate(range(0, n_txt, step)):
        rows = slice(k0, k0 + step)
        words = captions[rows] if order is None else captions[order[rows], : widths[k]]  # (n, Wk, D)
        mask = torch.arange(words.shape[1], device=words.device) < lens[rows, None]  # (n, Wk)
        words = torch.where(mask[..., None], words, words.new_zeros(()))  # (n, Wk, D)
        parts.append((words, mask, _norms(words)))
    return parts


def _gram_with_mask(ctx: Tensor, ctx_mask: Tensor | None) -> Tensor:
    """A context chunk's Gram (C, Lc, Lc) with its mask appended as a last row: (C, Lc+1, Lc).

    The extra row makes the Gram product also return the softmax's sum over real context items,
    z = mask^T e, for free instead of one more pass over the raw tensor."""
    C, Lc, _ = ctx.shape
    gram = torch.bmm(ctx, ctx.transpose(1, 2))  # (C, Lc, Lc)
    ones = torch.ones(C, Lc, dtype=ctx.dtype, device=ctx.device) if ctx_mask is None else ctx_mask.to(ctx.dtype)
    return torch.cat([gram, ones[:, None, :]], dim=1)  # (C, Lc+1, Lc)


def _chunk_sizes(C: int, Lc: int, Q: int, Lq: int, ctx_chunk: int | None, qry_chunk: int | None) -> tuple[int, int]:
    """Chunk sizes (context items, query items) for a raw chunk of about `_CHUNK_ELEMS` elements.

    The context side gets about `_MIN_GEMM_ROWS` rows (C*Lc) and the query side the rest of the budget, so
    that the chunk's GEMM (C*Lc, D) @ (D, Q*Lq) is close to square: then it runs near full speed.
    """
    if qry_chunk is None:
        rows = ctx_chunk * Lc if ctx_chunk is not None else min(C * Lc, _MIN_GEMM_ROWS)
        qry_chunk = _CHUNK_ELEMS // (rows * Lq)
    qry_chunk = max(1, min(Q, qry_chunk))
    if ctx_chunk is None:
        ctx_chunk = _CHUNK_ELEMS // (Lc * Lq * qry_chunk)
    return max(1, min(C, ctx_chunk)), qry_chunk


def _relevance(
    ctx_flat: Tensor,
    qry_flat: Tensor,
    gram: Tensor,
    ctx_mask: Tensor | None,
    qry_norm: Tensor,
    qry_mask: Tensor,
    raw_feature_norm: str,
    lambda_softmax: float,
    buffers: tuple[Tensor, Tensor] | None,
) -> Tensor:
    """Cosine between every query item and its attended context vector, for one chunk of pairs.

    Args:
        ctx_flat: (C*Lc, D) context items of C contexts, padding zeroed, in the GEMM's dtype.
        qry_flat: (Q*Lq, D) query items, padding zeroed, in the GEMM's dtype.
        gram: (C, Lc+1, Lc) the contexts' Grams, with the context mask appended as a last row.
        ctx_mask: (C, Lc) true for real context items, or None when all are real.
        qry_norm: (Q, Lq) the query items' l2 norms.
        qry_mask: (Q, Lq) true for real query items.
        raw_feature_norm: see `scan_similarity`.
        lambda_softmax: see `scan_similarity`.
        buffers: two flat scratch buffers of at least C*(Lc+1)*Q*Lq and C*Lc*Q*Lq elements, or None to work out of place
            (needed when autograd records the graph).

    Returns:
        (C, Q, Lq) relevances; entries of padded query items are meaningless.
    """
    C, Lc = gram.shape[0], gram.shape[2]
    Q, Lq = qry_norm.shape
    n = C * Lc * Q * Lq
    inplace = buffers is not None
    shape4 = (C, Lc, Q, Lq)

    s_out = buffers[0][:n].view(C * Lc, Q * Lq) if inplace else None
    s = _gemm(ctx_flat, qry_flat, s_out, gram.dtype).view(shape4)  # (C, Lc, Q, Lq) raw scores

    # Normalise across the query axis (innermost: contiguous) for each context item, giving x; then the
    # softmax across the context axis (dim 1) is e = exp(lambda * x - shift), a = e / z. lambda rides along
    # with the normalising scale so that each step is one pass.
    e = buffers[1][:n].view(shape4) if inplace else None
    if raw_feature_norm.startswith("clipped"):
        e = torch.ops.aten.leaky_relu.out(s, LEAKY_SLOPE, out=e) if inplace else F.leaky_relu(s, LEAKY_SLOPE)
    elif raw_feature_norm == "softmax":
        pad = ~qry_mask  # (Q, Lq): padded words must not share the softmax across words
        e = e.copy_(s).masked_fill_(pad, -math.inf) if inplace else s.masked_fill(pad, -math.inf)
        e = _softmax_last(e, inplace)
    else:
        e = e.copy_(s) if inplace else s  # keep s: the dot product below needs the raw scores
    # exp(lambda * x) = 2^(lambda * log2(e) * x): exp2 is a third cheaper than exp, and the factor is free.
    lam = lambda_softmax * _LOG2_E
    if raw_feature_norm.endswith("l2norm"):
        scale = lam / (torch.linalg.vector_norm(e, dim=-1, keepdim=True) + EPS)  # (C, Lc, Q, 1)
    elif raw_feature_norm.endswith("l1norm"):
        scale = lam / (torch.linalg.vector_norm(e, ord=1, dim=-1, keepdim=True) + EPS)  # (C, Lc, Q, 1)
    else:
        scale = lam
    e = e.mul_(scale) if inplace else e * scale  # (C, Lc, Q, Lq) lambda * x
    bounded = raw_feature_norm not in ("clipped", "no_norm")  # |x| <= 1
    shifted = not bounded or abs(lambda_softmax) > _MAX_UNSHIFTED_LAMBDA
    if ctx_mask is not None and shifted:
        pad = ~ctx_mask[:, :, None, None]  # (C, Lc, 1, 1): padded context words must not set the max (i2t)
        e = e.masked_fill_(pad, -math.inf) if inplace else e.masked_fill(pad, -math.inf)
    if shifted:
        shift = e.amax(dim=1, keepdim=True)  # (C, 1, Q, Lq)
        e = e.sub_(shift) if inplace else e - shift
    e = e.exp2_() if inplace else e.exp2()  # (C, Lc, Q, Lq) unnormalised attention
    N = Q * Lq

    # query . c = sum_k a_k s_k, and ||c||^2 = a^T G a, here times z and z^2 (divided out below). Padded
    # context words have s = 0 and zero Gram rows and columns, so whatever their e, they add nothing.
    if inplace:  # s is not needed after the dot product: its buffer takes the Gram product, no temporaries
        dot = s.mul_(e).sum(dim=1)  # (C, Q, Lq)
        ge_z = torch.bmm(gram, e.view(C, Lc, N), out=buffers[0][: C * (Lc + 1) * N].view(C, Lc + 1, N))
    else:
        dot = torch.linalg.vecdot(e, s, dim=1)  # (C, Q, Lq)
        ge_z = torch.bmm(gram, e.view(C, Lc, N))  # (C, Lc+1, N)
    ge = ge_z[:, :Lc].view(shape4)  # (C, Lc, Q, Lq) G e
    z = ge_z[:, Lc].view(C, Q, Lq)  # (C, Q, Lq) softmax denominators, over real context items only
    quad = ge.mul_(e).sum(dim=1) if inplace else torch.linalg.vecdot(e, ge, dim=1)  # (C, Q, Lq)

    # Reference cosine: w12 / (w1 * w2).clamp(min=eps) with w1 = ||query item||, w2 = ||c||.
    c_norm = quad.clamp_min(0).sqrt() / z  # (C, Q, Lq)
    return (dot / z) / (qry_norm * c_norm).clamp_min(EPS)  # (C, Q, Lq)


def _gemm(a: Tensor, b: Tensor, out: Tensor | None, dtype: torch.dtype) -> Tensor:
    """a @ b^T: (M, D) x (N, D) -> (M, N) in `dtype` (into `out` when given), the operands in their own dtype."""
    if a.dtype == dtype:
        return torch.mm(a, b.t(), out=out)
    if out is not None and a.is_cuda:  # no autograd here: mm(out_dtype=) has no derivative
        try:  # bf16 operands, float32 accumulation written straight into the float32 buffer
            return torch.mm(a, b.t(), out_dtype=dtype, out=out)
        except (TypeError, RuntimeError):  # a torch without mm(out_dtype=): round through the operands' dtype
            pass
    raw = torch.mm(a, b.t())  # (M, N) in the operands' dtype
    return out.copy_(raw) if out is not None else raw.to(dtype)


def _softmax_last(x: Tensor, inplace: bool) -> Tensor:
    """Softmax over the last dim, in place when allowed; rows hold at least one finite entry."""
    if not inplace:
        return torch.softmax(x, dim=-1)
    x.sub_(x.amax(dim=-1, keepdim=True)).exp_()
    return x.div_(x.sum(dim=-1, keepdim=True))


def _pool(rel: Tensor, qry_mask: Tensor, agg_func: str, lambda_lse: float) -> Tensor:
    """Pool relevances (C, Q, Lq) over the real query items into (C, Q)."""
    pad = ~qry_mask  # (Q, Lq)
    if agg_func == "LogSumExp":
        return torch.logsumexp((rel * lambda_lse).masked_fill(pad, -math.inf), dim=-1) / lambda_lse
    if agg_func == "Max":
        return rel.masked_fill(pad, -math.inf).amax(dim=-1)
    total = rel.masked_fill(pad, 0.0).sum(dim=-1)  # (C, Q)
    return total if agg_func == "Sum" else total / qry_mask.sum(dim=-1)
