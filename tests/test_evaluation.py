"""Evaluation: chunked all-pairs scoring, folds, and two-stage re-ranking against plain references."""

import pytest
import torch

from crossmatch.cli.common import build_eval_data
from crossmatch.config import load_config
from crossmatch.data.datasets import ImageCaptionDataset
from crossmatch.data.tokenizer import CaptionTokenizer
from crossmatch.evaluation.evaluate import (
    cat_features,
    encode_split,
    evaluate_retrieval,
    score_all_pairs,
    split_metrics,
)
from crossmatch.evaluation.rerank import below_candidates, candidate_pairs, rerank, topk_masks
from crossmatch.metrics import fold_metrics, retrieval_metrics, twin_accuracy
from crossmatch.models import create_model


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
    torch.testing.assert_close(score_all_pairs(model, img, txt, chunk_size=5), full)
    got = evaluate_retrieval(model, data, torch.device("cpu"), chunk_size=5)
    expected = {**retrieval_metrics(full, ds.txt_to_img), "twin_acc": twin_accuracy(full, ds.txt_to_img, ds.twins)}
    assert got == pytest.approx(expected)
    folds = evaluate_retrieval(model, data, torch.device("cpu"), folds=3)
    ref = fold_metrics(full, ds.txt_to_img, 3)
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
    torch.testing.assert_close(s_i2t, full.double())
    torch.testing.assert_close(s_t2i, full.double())
    got = evaluate_retrieval(model, data, torch.device("cpu"), rerank_k=n_txt, rerank_batch=7)
    assert got == pytest.approx(
        {**retrieval_metrics(full, ds.txt_to_img), "twin_acc": twin_accuracy(full, ds.txt_to_img, ds.twins)}
    )


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


def test_split_metrics_with_one_matrix_is_retrieval_metrics():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 9, generator=g)
    t2i = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3])
    assert split_metrics(s, s, t2i) == pytest.approx(retrieval_metrics(s, t2i))
