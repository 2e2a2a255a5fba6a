"""Evaluation: chunked all-pairs scoring, folds, and two-stage re-ranking against plain references."""

import pytest
import torch

from crossmatch.config import load_config
from crossmatch.data.datasets import ImageCaptionDataset
from crossmatch.data.tokenizer import CaptionTokenizer
from crossmatch.metrics import fold_metrics, retrieval_metrics, twin_accuracy
from crossmatch.models import create_model
from crossmatch.retrieval.evaluate import (
    encode_split,
    evaluate_retrieval,
    score_all_pairs,
    split_metrics,
)
from crossmatch.retrieval.rerank import below_candidates, candidate_pairs, rerank, rerank_text_query, topk_masks
from crossmatch.runs import build_eval_data
from crossmatch.tensors import cat_features
from tests.conftest import FixedScores


@pytest.fixture(scope="module")
def split(shapes_root):
    cfg = load_config(None, [f"data.root={shapes_root}", "data.image_size=32", "eval.batch_size=5"])
    ds = ImageCaptionDataset(shapes_root, "test")
    tok = CaptionTokenizer.train(ImageCaptionDataset(shapes_root, "train").captions)
    return cfg, ds, tok


def test_cat_features_pads_token_dims():
    a = {"embed": torch.ones(2, 3), "tokens": torch.ones(2, 4, 3), "mask": torch.ones(2, 4, dtype=torch.bool)}
    b = {"embed": torch.ones(1, 3), "tokens": torch.ones(1, 6, 3), "mask": torch.ones(1, 6, dtype=torch.bool)}
    out = cat_features([a, b])
    assert out["embed"].shape == (3, 3) and out["tokens"].shape == (3, 6, 3)
    assert out["mask"].sum(1).tolist() == [4, 4, 6] and out["tokens"][0, 4:].abs().sum() == 0


def test_chunked_scores_equal_one_matmul_and_metrics_match(split):
    cfg, ds, tok = split
    torch.manual_seed(0)
    model = create_model("tiny_vse", vocab_size=tok.vocab_size, image_size=32)
    data = build_eval_data(cfg, ds, tok, model)
    img, txt = encode_split(model, data, torch.device("cpu"))
    full = img["embed"] @ txt["embed"].t()
    chunked = score_all_pairs(model, img, txt, chunk_size=5)
    # GEMMs of 5 and 12 rows may sum in different orders on some CPUs: equal to float32 rounding.
    torch.testing.assert_close(chunked, full)
    # Metrics are compared on the matrix evaluate_retrieval scores with (same chunks, so bitwise the
    # same): metrics of `full` could differ at a near-tie that the rounding above flips.
    got = evaluate_retrieval(model, data, torch.device("cpu"), chunk_size=5)
    twins = twin_accuracy(chunked, ds.txt_to_img, ds.twins)
    assert got == pytest.approx({**retrieval_metrics(chunked, ds.txt_to_img), "twin_acc": twins})
    folds = evaluate_retrieval(model, data, torch.device("cpu"), chunk_size=5, folds=3)
    ref = fold_metrics(chunked, ds.txt_to_img, 3)
    assert {k: folds[k] for k in ref} == pytest.approx(ref)


def test_candidate_pairs_are_the_union_of_both_directions():
    s = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 4.0]])
    pairs = {tuple(p) for p in candidate_pairs(*topk_masks(s, 1)).tolist()}
    # i2t top-1: (0,0), (1,1); t2i top-1 per column: (0,0), (1,1), (1,2)
    assert pairs == {(0, 0), (1, 1), (1, 2)}


@pytest.mark.parametrize("name", ["tiny_albef", "tiny_vilt"])
def test_rerank_with_k_covering_everything_is_exactly_full_scoring(split, name):
    cfg, ds, tok = split
    torch.manual_seed(0)
    model = create_model(
        name, data_defaults={"vocab_size": tok.vocab_size, "image_size": 32, "max_text_len": 33}
    ).eval()
    data = build_eval_data(cfg, ds, tok, model)
    img, txt = encode_split(model, data, torch.device("cpu"))
    n_img, n_txt = len(ds.images), len(ds.captions)
    with torch.no_grad():  # reference: score_pairs on every pair, one image at a time
        full = torch.stack([model.score_pairs({k: v[[i] * n_txt] for k, v in img.items()}, txt) for i in range(n_img)])
    stage1 = score_all_pairs(model, img, txt)
    s_i2t, s_t2i = rerank(model, stage1, img, txt, k=n_txt, batch_size=7)
    # The reference scores batches of n_txt pairs, rerank batches of 7: float32 GEMMs of different
    # shapes take different BLAS kernels (and summation orders) per CPU, so the same pair may differ in
    # the last bits. Scores are O(1) logits after a few width-32 layers: allow a few float32 ulps of
    # accumulated rounding (seen: 2.4e-7 on one CPU); a wrong pair or a stage-1 leak is off by >= 1e-2.
    torch.testing.assert_close(s_i2t, full.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_t2i, full.double(), rtol=1e-5, atol=1e-5)
    # Metrics of the full matrix are a pure function tested in test_metrics.py; comparing them here would
    # hinge on near-ties (random tiny models have pairs 4e-8 apart). evaluate_retrieval runs the same
    # re-ranking with the same batches, so its metrics equal those of (s_i2t, s_t2i) exactly.
    got = evaluate_retrieval(model, data, torch.device("cpu"), rerank_k=n_txt, rerank_batch=7)
    assert got == split_metrics(s_i2t, s_t2i, torch.tensor(ds.txt_to_img), ds.twins)


def test_below_candidates_by_hand():
    stage2 = torch.tensor([5.0, 0.0, 1.0])  # the middle entry is not a candidate: its stage-2 value is unused
    stage1 = torch.tensor([0.9, 0.8, 0.1])
    got = below_candidates(stage2, stage1, torch.tensor([True, False, True]))
    # shift = min candidate stage-2 (1.0) - max stage-1 (0.9) - 1 = -0.9, so the non-candidate gets 0.8 - 0.9
    torch.testing.assert_close(got, torch.tensor([5.0, -0.1, 1.0], dtype=torch.float64))
    assert got.argsort(descending=True).tolist() == [0, 2, 1]


def test_rerank_keeps_outside_candidates_below_in_stage1_order(split):
    cfg, ds, tok = split
    model = create_model(
        "tiny_albef", data_defaults={"vocab_size": tok.vocab_size, "image_size": 32, "max_text_len": 33}
    ).eval()
    img, txt = encode_split(model, build_eval_data(cfg, ds, tok, model), torch.device("cpu"))
    stage1 = score_all_pairs(model, img, txt)
    s_i2t, s_t2i = rerank(model, stage1, img, txt, k=3)
    for got, dim in ((s_i2t, 1), (s_t2i, 0)):
        cand = torch.zeros_like(stage1, dtype=torch.bool).scatter_(dim, stage1.topk(3, dim=dim).indices, True)
        assert (cand.sum(dim) == 3).all()
        with torch.no_grad():  # candidates carry exactly the stage-2 score of their pair
            i, t = cand.nonzero().unbind(1)
            pair = model.score_pairs({k: v[i] for k, v in img.items()}, {k: v[t] for k, v in txt.items()})
        torch.testing.assert_close(got[i, t], pair.double())
        # every non-candidate below every candidate of its query, and in stage-1 order (a constant shift)
        worst_cand = got.masked_fill(~cand, float("inf")).amin(dim, keepdim=True)
        best_rest = got.masked_fill(cand, float("-inf")).amax(dim, keepdim=True)
        assert (best_rest < worst_cand).all()
        shift = (got - stage1.double())[~cand]
        torch.testing.assert_close(shift, shift[:1].expand_as(shift))


@pytest.mark.parametrize("name", ["tiny_albef", "tiny_vilt"])
def test_one_text_query_is_reranked_as_its_column_of_the_t2i_matrix(split, name):
    """Single-query search (`rerank_text_query`) and the Evaluator (`rerank`) re-rank a caption's top-k images
    alike: the query's scores are exactly its column of rerank's t2i matrix. rerank also scores the pairs its
    i2t direction picks (with one caption: every image), so its batches hold other pairs; a batch of a fusion
    model's GEMMs may round a row differently with other rows beside it, so both score one pair per call."""
    cfg, ds, tok = split
    torch.manual_seed(0)
    model = create_model(
        name, data_defaults={"vocab_size": tok.vocab_size, "image_size": 32, "max_text_len": 33}
    ).eval()
    img, txt = encode_split(model, build_eval_data(cfg, ds, tok, model), torch.device("cpu"))
    for t in (0, 17):
        query = {k: v[t : t + 1] for k, v in txt.items()}  # (1, ...)
        stage1 = score_all_pairs(model, img, query)  # (N_img, 1)
        got = rerank_text_query(model, stage1[:, 0], img, query, k=3, batch_size=1)
        _, s_t2i = rerank(model, stage1, img, query, k=3, batch_size=1)
        assert got.dtype == torch.float64 and torch.equal(got, s_t2i[:, 0])
        top = stage1[:, 0].topk(3).indices
        with torch.no_grad():
            pair = model.score_pairs(
                {k: v[top] for k, v in img.items()}, {k: v.expand(3, *v.shape[1:]) for k, v in query.items()}
            )
        torch.testing.assert_close(got[top], pair.double())  # one call of 3 vs calls of 1: last bits only


def test_split_metrics_with_one_matrix_is_retrieval_metrics():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 9, generator=g)
    t2i = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3])
    assert split_metrics(s, s, t2i) == pytest.approx(retrieval_metrics(s, t2i))


# 4 images in 2 folds ({0, 1}, {2, 3}); captions t0, t1 -> image 0, t2 -> 1, t3 -> 2, t4 -> 3.
FOLD_T2I = torch.tensor([0, 0, 1, 2, 3])
FOLD_SCORES = torch.tensor(
    [
        [0.9, 0.8, 0.1, 0.0, 0.0],  # image 0 prefers its t0, t1 to twin 1's t2: 2 of 2 cases won
        [0.2, 0.3, 0.9, 0.0, 0.0],  # image 1 prefers t2 to t0, t1: 2 of 2; and t2 to t3 (cross-fold pair)
        [0.0, 0.0, 0.0, 0.1, 0.5],  # image 2 prefers twin 3's t4 to its own t3: 0 of 1; t3 > t2 (cross)
        [0.0, 0.0, 0.0, 0.5, 0.1],  # image 3 prefers t3 to its own t4: 0 of 1
    ]
)


def fold_data(twins):
    from crossmatch.data.loaders import build_eval_loader
    from crossmatch.retrieval.evaluate import EvalData

    images = [{"image_idx": i} for i in range(4)]
    texts = [{"text_idx": t, "image_idx": int(FOLD_T2I[t])} for t in range(5)]
    return EvalData(build_eval_loader(images, 3), build_eval_loader(texts, 3), FOLD_T2I, twins)


@pytest.mark.parametrize(
    ("twins", "want"),
    [
        ([(0, 1)], 100.0),  # only fold 0 has twins (was a KeyError)
        ([(2, 3)], 0.0),  # only fold 1 has twins (twin_acc was silently missing)
        # pooled over both folds: 4 wins of 6 cases, not the mean of 100 % and 0 %; the pair (1, 2)
        # crosses the fold boundary and is not scored (counting it would give 6 of 8)
        ([(0, 1), (2, 3), (1, 2)], 100.0 * 4 / 6),
    ],
)
def test_twin_accuracy_over_folds_pools_the_cases_of_every_fold(twins, want):
    got = evaluate_retrieval(FixedScores(FOLD_SCORES), fold_data(twins), torch.device("cpu"), folds=2)
    assert got["twin_acc"] == pytest.approx(want)
    no_twins = evaluate_retrieval(FixedScores(FOLD_SCORES), fold_data([]), torch.device("cpu"), folds=2)
    assert "twin_acc" not in no_twins
    assert {k: v for k, v in got.items() if k != "twin_acc"} == no_twins == fold_metrics(FOLD_SCORES, FOLD_T2I, 2)
    one_fold = evaluate_retrieval(FixedScores(FOLD_SCORES), fold_data(twins), torch.device("cpu"))
    assert one_fold["twin_acc"] == pytest.approx(twin_accuracy(FOLD_SCORES, FOLD_T2I, twins))
