"""The batched SCAN score equals a per-caption loop written straight from the definition (Lee et al., 2018)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from crossmatch.models.scan_scoring import AGG_FUNCS, DIRECTIONS, RAW_FEATURE_NORMS, scan_similarity

EPS = 1e-8


def _normalise_raw(attn: Tensor, how: str) -> Tensor:
    """The reference's first normalisation of (n, n_context, n_query) raw scores, across the query axis."""
    if how.startswith("clipped"):
        attn = F.leaky_relu(attn, 0.1)
    if how == "softmax":
        return torch.softmax(attn, dim=2)
    if how.endswith("l2norm"):
        return attn / (attn.pow(2).sum(dim=2, keepdim=True).sqrt() + EPS)
    if how.endswith("l1norm"):
        return attn / (attn.abs().sum(dim=2, keepdim=True) + EPS)
    return attn  # clipped, no_norm


def _attend(query: Tensor, context: Tensor, how: str, lam: float) -> Tensor:
    """Attended context vector for every query item: query (n, Lq, D), context (n, Lc, D) -> (n, Lq, D)."""
    attn = torch.bmm(context, query.transpose(1, 2))  # (n, Lc, Lq)
    attn = _normalise_raw(attn, how)
    attn = torch.softmax(attn * lam, dim=1)  # across the context axis
    return torch.bmm(attn.transpose(1, 2), context)  # (n, Lq, D)


def _cosine(x1: Tensor, x2: Tensor) -> Tensor:
    """The reference's cosine_similarity along the last dim, eps 1e-8 on the product of norms."""
    return (x1 * x2).sum(-1) / (x1.norm(dim=-1) * x2.norm(dim=-1)).clamp(min=EPS)


def _aggregate(rel: Tensor, agg: str, lam_lse: float) -> Tensor:
    if agg == "LogSumExp":
        return torch.log(torch.exp(rel * lam_lse).sum(dim=1)) / lam_lse
    if agg == "Max":
        return rel.max(dim=1).values
    if agg == "Sum":
        return rel.sum(dim=1)
    return rel.mean(dim=1)


def reference_scan_similarity(
    images: Tensor,
    captions: Tensor,
    cap_lens: Tensor,
    direction: str = "t2i",
    raw_feature_norm: str = "clipped_l2norm",
    agg_func: str = "LogSumExp",
    lambda_softmax: float = 9.0,
    lambda_lse: float = 6.0,
) -> Tensor:
    """Per-caption loop as in kuanghuei/SCAN xattn_score_t2i / xattn_score_i2t: (n_img, n_txt)."""
    n_img = images.shape[0]
    columns = []
    for t in range(captions.shape[0]):
        cap = captions[t, : int(cap_lens[t])].unsqueeze(0).expand(n_img, -1, -1)  # cut to the true length
        if direction == "t2i":
            attended = _attend(cap, images, raw_feature_norm, lambda_softmax)  # (n_img, n_word, D)
            rel = _cosine(cap, attended)  # (n_img, n_word)
        else:
            attended = _attend(images, cap, raw_feature_norm, lambda_softmax)  # (n_img, R, D)
            rel = _cosine(images, attended)  # (n_img, R)
        columns.append(_aggregate(rel, agg_func, lambda_lse))
    return torch.stack(columns, dim=1)


def _inputs(n_img: int, n_txt: int, R: int = 5, W: int = 7, D: int = 12, seed: int = 0, garbage: bool = True):
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n_img, R, D, generator=g), dim=-1)
    captions = F.normalize(torch.randn(n_txt, W, D, generator=g), dim=-1)
    cap_lens = torch.randint(1, W + 1, (n_txt,), generator=g)
    cap_lens[0] = W
    if garbage:  # what lies past a caption's length must not matter
        pad = torch.arange(W) >= cap_lens[:, None]
        captions[pad] = 50.0 * torch.randn(int(pad.sum()), D, generator=g)
    return images, captions, cap_lens


def _check(images, captions, cap_lens, img_chunk=None, txt_chunk=None, **kw):
    ours = scan_similarity(images, captions, cap_lens, img_chunk=img_chunk, txt_chunk=txt_chunk, **kw)
    ref = reference_scan_similarity(images.double(), captions.double(), cap_lens, **kw)
    assert ours.shape == (images.shape[0], captions.shape[0])
    assert ours.dtype == images.dtype
    torch.testing.assert_close(ours.double(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "direction,raw_feature_norm,agg_func", list(itertools.product(DIRECTIONS, RAW_FEATURE_NORMS, AGG_FUNCS))
)
def test_matches_reference_every_combination(direction, raw_feature_norm, agg_func):
    images, captions, cap_lens = _inputs(4, 6)
    _check(images, captions, cap_lens, direction=direction, raw_feature_norm=raw_feature_norm, agg_func=agg_func)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("img_chunk,txt_chunk", [(1, 1), (2, 3), (3, 2), (100, 100), (None, 4)])
def test_chunking_does_not_change_scores(direction, img_chunk, txt_chunk):
    images, captions, cap_lens = _inputs(5, 7, seed=1)
    lam = {"lambda_softmax": 4.0, "lambda_lse": 5.0} if direction == "i2t" else {}
    full = reference_scan_similarity(images.double(), captions.double(), cap_lens, direction=direction, **lam)
    ours = scan_similarity(
        images, captions, cap_lens, direction=direction, img_chunk=img_chunk, txt_chunk=txt_chunk, **lam
    )
    torch.testing.assert_close(ours.double(), full, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("raw_feature_norm", ["clipped_l2norm", "softmax", "no_norm"])
def test_one_word_captions_and_a_single_image(direction, raw_feature_norm):
    images, captions, cap_lens = _inputs(1, 5, seed=2)
    cap_lens[:] = 1
    _check(images, captions, cap_lens, direction=direction, raw_feature_norm=raw_feature_norm)
    cap_lens[::2] = 7  # uneven lengths: some full, some one word
    _check(images, captions, cap_lens, direction=direction, raw_feature_norm=raw_feature_norm)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_padding_content_is_ignored_even_nan(direction):
    images, captions, cap_lens = _inputs(3, 4, seed=3, garbage=False)
    cap_lens = torch.tensor([7, 2, 5, 1])
    clean = scan_similarity(images, captions, cap_lens, direction=direction)
    dirty = captions.clone()
    pad = torch.arange(7) >= cap_lens[:, None]
    dirty[pad] = float("nan")
    torch.testing.assert_close(scan_similarity(images, dirty, cap_lens, direction=direction), clean)
    dirty[pad] = 1e3
    torch.testing.assert_close(scan_similarity(images, dirty, cap_lens, direction=direction), clean)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_unnormalised_inputs_and_large_temperature(direction):
    """Inputs are used as given (norms != 1 enter the cosine); a large lambda must not overflow."""
    images, captions, cap_lens = _inputs(3, 4, seed=4)
    images = images * torch.rand(3, 5, 1) * 3
    _check(images, captions, cap_lens, direction=direction, lambda_softmax=50.0)
    _check(images, captions, cap_lens, direction=direction, raw_feature_norm="no_norm", lambda_softmax=20.0)


def test_batch_larger_than_a_chunk_realistic_shapes():
    images, captions, cap_lens = _inputs(6, 9, R=36, W=16, D=64, seed=5)
    for direction in DIRECTIONS:
        _check(images, captions, cap_lens, direction=direction, img_chunk=4, txt_chunk=5)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("agg_func", ["LogSumExp", "Max"])
def test_gradients_match_reference(direction, agg_func):
    images, captions, cap_lens = _inputs(3, 4, seed=6)
    kw = {"direction": direction, "agg_func": agg_func}
    grads = []
    for fn, dtype in ((scan_similarity, torch.float32), (reference_scan_similarity, torch.float64)):
        im = images.detach().to(dtype).requires_grad_()
        cap = captions.detach().to(dtype).requires_grad_()
        weights = torch.linspace(-1, 1, 12, dtype=dtype).view(3, 4)
        (fn(im, cap, cap_lens, **kw) * weights).sum().backward()
        grads.append((im.grad, cap.grad))
    for ours, ref in zip(*grads, strict=True):
        torch.testing.assert_close(ours.double(), ref, atol=1e-4, rtol=1e-4)
    pad = torch.arange(7) >= cap_lens[:, None]
    assert torch.all(grads[0][1][pad] == 0)  # padded positions get no gradient


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_gradcheck_float64(direction):
    images, captions, cap_lens = _inputs(2, 3, R=3, W=4, D=5, seed=7)
    images = images.double().requires_grad_()
    captions = captions.double().requires_grad_()

    def fn(im, cap):
        return scan_similarity(im, cap, cap_lens, direction=direction, img_chunk=1, txt_chunk=2)

    assert torch.autograd.gradcheck(fn, (images, captions))


def test_no_grad_path_equals_grad_path():
    images, captions, cap_lens = _inputs(4, 5, seed=8)
    for direction in DIRECTIONS:
        with torch.no_grad():
            fast = scan_similarity(images, captions, cap_lens, direction=direction)
        tracked = scan_similarity(images.requires_grad_(), captions, cap_lens, direction=direction)
        images = images.detach()
        torch.testing.assert_close(fast, tracked.detach())


def test_public_reexport_and_errors():
    from crossmatch.models.scan import scan_similarity as reexported

    assert reexported is scan_similarity
    images, captions, cap_lens = _inputs(2, 2)
    with pytest.raises(ValueError, match="direction"):
        scan_similarity(images, captions, cap_lens, direction="x")
    with pytest.raises(ValueError, match="raw_feature_norm"):
        scan_similarity(images, captions, cap_lens, raw_feature_norm="l3")
    with pytest.raises(ValueError, match="agg_func"):
        scan_similarity(images, captions, cap_lens, agg_func="Median")
    with pytest.raises(ValueError, match="cap_lens"):
        scan_similarity(images, captions, torch.tensor([0, 3]))
    assert scan_similarity(images[:0], captions, cap_lens).shape == (0, 2)
    assert scan_similarity(images, captions[:0], cap_lens[:0], direction="i2t").shape == (2, 0)
