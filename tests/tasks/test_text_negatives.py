"""Text negatives (`loss.text_negatives`) in the data view, the hinge, ITC and ITM losses, and training resume.

Each loss with K negatives is checked against a plain-Python loop over the same numbers; float64 inputs, so
the only difference is summation order (tolerance 1e-12)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from crossmatch.config import LossConfig
from crossmatch.data.datasets import ImageCaptionDataset, PairView
from crossmatch.data.loaders import collate
from crossmatch.data.negatives import normalise
from crossmatch.data.tokenizer import CaptionTokenizer
from crossmatch.errors import ConfigError, DataError
from crossmatch.losses.contrastive import InfoNCELoss, SigLipLoss
from crossmatch.losses.itm import ItcLoss, positive_targets, soft_cross_entropy
from crossmatch.losses.triplet import TripletLoss
from crossmatch.models import albef, dual_encoder, scan, vilt
from crossmatch.tasks.base import build_task
from crossmatch.tasks.text_negatives import encode_negatives, paired_scores
from tests import helpers
from tests.helpers import VOCAB, make_batch

TOL = {"rel": 1e-12, "abs": 1e-12}  # float64: the loops only sum in another order


# ---- the hinge -----------------------------------------------------------------------------------------
def hinge_reference(S, ids, neg, valid, margin, hardest, separate=False):
    """VSE++'s hinge written as loops: each caption against the other images, each image against the other
    captions and its own valid text negatives (with `separate` and `hardest`: the hardest caption and the
    hardest text negative as two terms)."""
    B, total = len(S), 0.0
    for t in range(B):
        costs = [max(0.0, margin + S[i][t] - S[t][t]) for i in range(B) if ids[i] != ids[t]]
        total += max(costs, default=0.0) if hardest else sum(costs)
    for i in range(B):
        costs = [max(0.0, margin + S[i][t] - S[i][i]) for t in range(B) if ids[t] != ids[i]]
        negs = [max(0.0, margin + n - S[i][i]) for n, ok in zip(neg[i], valid[i], strict=True) if ok]
        if hardest and separate:
            total += max(costs, default=0.0) + max(negs, default=0.0)
        else:
            total += max(costs + negs, default=0.0) if hardest else sum(costs + negs)
    return total


def test_hinge_with_text_negatives_hand_example():
    S = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64)
    neg = torch.tensor([[0.85], [0.1]], dtype=torch.float64)
    loss = TripletLoss(0.2, max_violation=True)(S, torch.tensor([0, 1]), neg, torch.tensor([[True], [True]]))
    # only image 0's negative violates: 0.2 + 0.85 - 0.9 = 0.15
    assert loss.item() == pytest.approx(0.15, **TOL)


def test_hinge_separate_negative_term_hand_example():
    # image 0's row: caption 1 violates by 0.2 + 0.8 - 0.9 = 0.1, its text negative by 0.2 + 0.85 - 0.9 = 0.15;
    # image 1's row: no violation (0.2 + 0.2 - 0.8, 0.2 + 0.1 - 0.8 < 0).
    S = torch.tensor([[0.9, 0.8], [0.2, 0.8]], dtype=torch.float64)
    neg, valid, ids = (
        torch.tensor([[0.85], [0.1]], dtype=torch.float64),
        torch.tensor([[True], [True]]),
        torch.arange(2),
    )
    # caption 1 against image 0: 0.2 + 0.8 - 0.8 = 0.2 in both terms
    joint = TripletLoss(0.2, True, "joint")(S, ids, neg, valid).item()
    separate = TripletLoss(0.2, True, "separate")(S, ids, neg, valid).item()
    assert joint == pytest.approx(0.2 + 0.15, **TOL)  # image 0's row: max(0.1, 0.15)
    assert separate == pytest.approx(0.2 + 0.1 + 0.15, **TOL)  # image 0's row: 0.1 and 0.15, both
    # without max_violation every violation is summed either way
    assert TripletLoss(0.2, False, "separate")(S, ids, neg, valid).item() == pytest.approx(
        TripletLoss(0.2, False, "joint")(S, ids, neg, valid).item(), **TOL
    )
    with pytest.raises(ValueError, match="joint or separate"):
        TripletLoss(0.2, True, "both")


@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("hardest", [True, False])
def test_hinge_with_text_negatives_equals_the_loop(hardest, separate):
    g = torch.Generator().manual_seed(0)
    S = torch.rand(5, 5, generator=g, dtype=torch.float64)
    neg = torch.rand(5, 3, generator=g, dtype=torch.float64) + 0.3  # many violations
    valid = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    ids = torch.tensor([0, 0, 1, 2, 3])  # pairs 0 and 1 show one image
    term = "separate" if separate else "joint"
    got = TripletLoss(0.2, hardest, term)(S, ids, neg, valid).item()
    assert got == pytest.approx(
        hinge_reference(S.tolist(), ids.tolist(), neg.tolist(), valid.tolist(), 0.2, hardest, separate), **TOL
    )
    # the text negatives change the loss (else this test could not fail), empty slots change nothing
    assert got != pytest.approx(TripletLoss(0.2, hardest)(S, ids).item())
    empty = TripletLoss(0.2, hardest, term)(S, ids, neg, torch.zeros_like(valid)).item()
    assert empty == pytest.approx(TripletLoss(0.2, hardest)(S, ids).item(), **TOL)


def test_hinge_without_negatives_is_bitwise_the_vse_formula():
    g = torch.Generator().manual_seed(1)
    S, ids = torch.rand(6, 6, generator=g), torch.tensor([0, 1, 1, 2, 3, 4])
    pos = S.diagonal()
    positive = ids[:, None] == ids[None, :]
    cost_img = (0.2 + S - pos[None, :]).clamp(min=0).masked_fill(positive, 0)
    cost_txt = (0.2 + S - pos[:, None]).clamp(min=0).masked_fill(positive, 0)
    assert torch.equal(TripletLoss(0.2, True)(S, ids), cost_img.max(0).values.sum() + cost_txt.max(1).values.sum())
    assert torch.equal(TripletLoss(0.2, False)(S, ids), cost_img.sum() + cost_txt.sum())


# ---- ITC -----------------------------------------------------------------------------------------------
def itc_reference(img, txt, ids, neg, valid, scale):
    """(CE_i2t + CE_t2i) / 2 by loops; row i's i2t columns are every caption and its own valid negatives."""
    B = len(img)

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    def ce(logits, targets):
        m = max(logits)
        lse = m + math.log(sum(math.exp(x - m) for x in logits))
        return -sum(t * (x - lse) for x, t in zip(logits, targets, strict=True))

    i2t = t2i = 0.0
    for i in range(B):
        n_pos = sum(ids[j] == ids[i] for j in range(B))
        targets = [float(ids[j] == ids[i]) / n_pos for j in range(B)]
        extra = [scale * dot(img[i], n) for n, ok in zip(neg[i], valid[i], strict=True) if ok]
        i2t += ce([scale * dot(img[i], txt[j]) for j in range(B)] + extra, targets + [0.0] * len(extra))
        t2i += ce([scale * dot(txt[i], img[j]) for j in range(B)], targets)
    return (i2t / B + t2i / B) / 2


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def test_infonce_and_albef_itc_extra_columns_equal_the_loop():
    img, txt, neg = unit(4, 8, seed=0), unit(4, 8, seed=1), unit(4, 2, 8, seed=2)
    ids, valid = torch.tensor([0, 1, 1, 2]), torch.tensor([[1, 1], [1, 0], [0, 0], [0, 1]], dtype=torch.bool)
    ref = itc_reference(img.tolist(), txt.tolist(), ids.tolist(), neg.tolist(), valid.tolist(), 5.0)
    scale = torch.tensor(5.0, dtype=torch.float64)
    assert InfoNCELoss()(img, txt, ids, scale, neg, valid).item() == pytest.approx(ref, **TOL)
    # ALBEF's ITC divides by the temperature instead of multiplying by the scale
    assert ItcLoss()(img, txt, ids, 1 / scale, neg_feat=neg, neg_valid=valid).item() == pytest.approx(ref, **TOL)
    without = itc_reference(img.tolist(), txt.tolist(), ids.tolist(), neg.tolist(), [[0, 0]] * 4, 5.0)
    assert without != pytest.approx(ref)


def test_itc_without_negatives_is_bitwise_what_it_was():
    img, txt, ids = unit(5, 8, seed=3).float(), unit(5, 8, seed=4).float(), torch.tensor([0, 0, 1, 2, 3])
    targets = positive_targets(ids, ids)
    ref = (soft_cross_entropy(5.0 * img @ txt.t(), targets) + soft_cross_entropy(5.0 * txt @ img.t(), targets)) / 2
    assert torch.equal(InfoNCELoss()(img, txt, ids, torch.tensor(5.0)), ref)
    ref_itc = (soft_cross_entropy(img @ txt.t() / 0.2, targets) + soft_cross_entropy(txt @ img.t() / 0.2, targets)) / 2
    assert torch.equal(ItcLoss()(img, txt, ids, torch.tensor(0.2)), ref_itc)


def test_siglip_without_negatives_is_bitwise_what_it_was():
    img, txt, ids = unit(4, 8, seed=8).float(), unit(4, 8, seed=9).float(), torch.tensor([0, 1, 1, 2])
    t, b = torch.tensor(4.0), torch.tensor(-1.0)
    logits = t * img @ txt.t() + b
    sign = 2.0 * (ids[:, None] == ids[None, :]).float() - 1.0
    assert torch.equal(SigLipLoss()(img, txt, ids, t, b), -F.logsigmoid(sign * logits).sum() / 4)


def test_vilt_without_negatives_is_bitwise_its_old_objective():
    """ViLT's step was restructured for text negatives: without them it must compute what it did before."""
    from crossmatch.losses.itm import sample_random_negatives
    from crossmatch.tensors import slice_features

    torch.manual_seed(0)
    model = vilt.tiny_vilt(vocab_size=VOCAB).eval()
    task = build_task(model, LossConfig())
    batch = make_batch([0, 1, 1, 2, 3])
    torch.manual_seed(5)
    with torch.no_grad():
        got, _ = task.training_step(batch)
    torch.manual_seed(5)
    with torch.no_grad():  # the objective as it was written before text negatives
        cfg, idx, m = task.cfg, batch["image_idx"], model
        img, txt = m.encode_image_features(batch), m.encode_text_features(batch)
        neg, valid = sample_random_negatives(idx, cfg.n_negatives)
        B, K = 5, neg.shape[1]
        txt_rows = torch.cat([torch.arange(B)[:, None], neg], 1)
        img_rows = torch.arange(B)[:, None].expand(B, 1 + K)
        logits = m.itm_logits(slice_features(img, img_rows.flatten()), slice_features(txt, txt_rows.flatten()))
        logits = logits.view(B, 1 + K, 2)
        ok = torch.cat([valid.new_ones(B, 1), valid], 1)
        scores = logits[..., 1].masked_fill(~ok, float("-inf"))
        rank = F.cross_entropy(scores, scores.new_zeros(B, dtype=torch.long))
        itm = task.itm(logits[:, 0], logits[:, 1:2][valid[:, :1]])
        itc = task.itc(img["embed"], txt["embed"], idx, m.temp)
    assert (
        torch.equal(got["rank_loss"], rank) and torch.equal(got["itm_loss"], itm) and torch.equal(got["itc_loss"], itc)
    )


def test_siglip_text_negatives_are_negative_pairs():
    img, txt, neg = unit(3, 8, seed=5), unit(3, 8, seed=6), unit(3, 2, 8, seed=7)
    ids, valid = torch.tensor([0, 1, 2]), torch.tensor([[1, 0], [1, 1], [0, 0]], dtype=torch.bool)
    t, b = torch.tensor(4.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)

    def logsig(x):
        return -math.log1p(math.exp(-x))

    ref = 0.0
    for i in range(3):
        for j in range(3):
            z = 1.0 if i == j else -1.0
            ref -= logsig(z * (4.0 * float(img[i] @ txt[j]) - 1.0))
        for k in range(2):
            if valid[i, k]:
                ref -= logsig(-(4.0 * float(img[i] @ neg[i, k]) - 1.0))
    assert SigLipLoss()(img, txt, ids, t, b, neg, valid).item() == pytest.approx(ref / 3, **TOL)


# ---- scores of text negatives ----------------------------------------------------------------------------
def test_scan_paired_scores_equal_the_full_matrix_blocks():
    torch.manual_seed(0)
    model = scan.tiny_scan(vocab_size=VOCAB).eval()
    batch = make_batch([0, 1, 2], seed=1)
    B, K, L = 3, 2, 5
    g = torch.Generator().manual_seed(2)
    batch["neg_input_ids"] = torch.randint(5, VOCAB, (B, K, L), generator=g)
    batch["neg_attention_mask"] = torch.arange(L)[None, None, :] < torch.tensor([[5, 3], [4, 5], [2, 5]])[..., None]
    with torch.no_grad():
        img, neg = model.encode_image_features(batch), encode_negatives(model, batch)
        got = paired_scores(model, img, neg)  # (B, K)
        full = model.similarity(img, {k: v.flatten(0, 1) for k, v in neg.items()})  # (B, B*K)
    want = torch.stack([full[b, b * K : (b + 1) * K] for b in range(B)])
    # one image at a time vs all at once: the same per-pair maths in other chunk shapes (float32 rounding)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---- ITM: (image, text negative) pairs are label-0 pairs -----------------------------------------------
def with_negatives(batch, K=2, L=5, seed=3):
    B = len(batch["image_idx"])
    g = torch.Generator().manual_seed(seed)
    batch["neg_input_ids"] = torch.randint(5, VOCAB, (B, K, L), generator=g)
    batch["neg_attention_mask"] = torch.ones(B, K, L, dtype=torch.bool)
    batch["neg_valid"] = torch.tensor([[True, False], [True, True], [False, False], [False, True]])
    return batch


@pytest.mark.parametrize("family", ["albef", "vilt"])
def test_itm_gets_each_valid_text_negative_as_a_label_0_pair(family, monkeypatch):
    torch.manual_seed(0)
    model = (
        albef.tiny_albef(vocab_size=VOCAB, momentum=False) if family == "albef" else vilt.tiny_vilt(vocab_size=VOCAB)
    ).eval()
    task = build_task(model, LossConfig(text_negatives=2))
    batch = with_negatives(make_batch([0, 1, 2, 3]))
    seen = {}
    real = task.itm.forward

    def spy(pos, neg):
        seen["pos"], seen["neg"] = pos, neg
        return real(pos, neg)

    monkeypatch.setattr(task.itm, "forward", spy)
    with torch.no_grad():
        losses, _ = task.training_step(batch)
        img, neg = model.encode_image_features(batch), encode_negatives(model, batch)
        pairs = [(b, k) for b in range(4) for k in range(2) if batch["neg_valid"][b, k]]
        want = torch.cat(
            [
                model.itm_logits(
                    {k: v[b : b + 1] for k, v in img.items()}, {n: v[b, k : k + 1] for n, v in neg.items()}
                )
                for b, k in pairs
            ]
        )
    got = seen["neg"][-len(pairs) :]  # the text negatives come last among the negatives
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # batched vs one pair at a time
    labels = torch.cat([torch.ones(len(seen["pos"])), torch.zeros(len(seen["neg"]))]).long()
    expected = F.cross_entropy(torch.cat([seen["pos"], seen["neg"]]), labels)
    assert losses["itm_loss"].item() == pytest.approx(expected.item() * task.cfg.itm_weight, rel=1e-6)


@pytest.mark.parametrize("term", ["joint", "separate"])
def test_triplet_task_reads_the_text_negative_term(term):
    torch.manual_seed(0)
    model = dual_encoder.tiny_vse(vocab_size=VOCAB).eval()
    task = build_task(model, LossConfig(text_negatives=2, text_negative_term=term))
    task.on_epoch_start(0)  # no warm-up: hardest negatives
    batch = with_negatives(make_batch([0, 1, 2, 3]))
    with torch.no_grad():
        got = task.training_step(batch)[0]["triplet_loss"]
        img, txt = model.encode_image_features(batch), model.encode_text_features(batch)
        neg = paired_scores(model, img, encode_negatives(model, batch))  # (4, 2)
        S = model.similarity(img, txt)
    args = (S.tolist(), [0, 1, 2, 3], neg.tolist(), batch["neg_valid"].tolist(), 0.2, True)
    want, other = hinge_reference(*args, term == "separate"), hinge_reference(*args, term != "separate")
    assert got.item() == pytest.approx(want, rel=1e-5)  # float32 model scores, summed in another order
    assert want != pytest.approx(other, rel=1e-3)  # the two terms differ on this batch: the test can fail


def test_caption_anchored_term_hand_example():
    # pair 0: caption . its negative 0.95, its image 0.9 -> 0.2 + 0.95 - 0.9 = 0.25; pair 1: 0.2 + 0.3 - 0.8 < 0.
    # The in-batch and image-anchored terms are 0 here (S off-diagonal low, image . negative low).
    S = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64)
    neg = torch.tensor([[0.1], [0.1]], dtype=torch.float64)
    cap = torch.tensor([[0.95], [0.3]], dtype=torch.float64)
    valid, ids = torch.tensor([[True], [True]]), torch.arange(2)
    assert TripletLoss(0.2, True, "separate")(S, ids, neg, valid, cap).item() == 0.0  # weight 0: off
    for hardest in (True, False):
        got = TripletLoss(0.2, hardest, "separate", caption_anchor_weight=2.0)(S, ids, neg, valid, cap).item()
        assert got == pytest.approx(2.0 * 0.25, **TOL)
    # an empty slot never counts
    masked = TripletLoss(0.2, True, "separate", 2.0)(S, ids, neg, torch.tensor([[False], [True]]), cap).item()
    assert masked == 0.0


def caption_anchor_reference(S, cap, valid, margin, hardest):
    """The caption-anchored term as a loop: caption b against each of its valid negatives, its image the positive."""
    total = 0.0
    for b in range(len(S)):
        costs = [max(0.0, margin + c - S[b][b]) for c, ok in zip(cap[b], valid[b], strict=True) if ok]
        total += max(costs, default=0.0) if hardest else sum(costs)
    return total


@pytest.mark.parametrize("hardest", [True, False])
def test_caption_anchored_term_equals_the_loop(hardest):
    g = torch.Generator().manual_seed(1)
    S = torch.rand(5, 5, generator=g, dtype=torch.float64)
    neg = torch.rand(5, 3, generator=g, dtype=torch.float64)
    cap = torch.rand(5, 3, generator=g, dtype=torch.float64) + 0.4  # many violations
    valid = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    ids = torch.tensor([0, 0, 1, 2, 3])
    args = (S.tolist(), ids.tolist(), neg.tolist(), valid.tolist(), 0.2, hardest, True)
    got = TripletLoss(0.2, hardest, "separate", 0.5)(S, ids, neg, valid, cap).item()
    extra = caption_anchor_reference(S.tolist(), cap.tolist(), valid.tolist(), 0.2, hardest)
    assert extra > 0.5  # the term is active on these numbers: the test can fail
    assert got == pytest.approx(hinge_reference(*args) + 0.5 * extra, **TOL)


def test_triplet_task_adds_the_caption_anchored_term():
    torch.manual_seed(0)
    model = dual_encoder.tiny_vse(vocab_size=VOCAB).eval()
    cfg = LossConfig(text_negatives=2, text_negative_term="separate", caption_anchor_weight=0.5)
    task = build_task(model, cfg)
    task.on_epoch_start(0)
    batch = with_negatives(make_batch([0, 1, 2, 3]))
    with torch.no_grad():
        got = task.training_step(batch)[0]["triplet_loss"]
        img, txt = model.encode_image_features(batch), model.encode_text_features(batch)
        negf = encode_negatives(model, batch)
        neg = paired_scores(model, img, negf)  # (4, 2)
        cap = torch.einsum("be,bke->bk", txt["embed"], negf["embed"])  # (4, 2) caption . negative
        S = model.similarity(img, txt)
    valid = batch["neg_valid"].tolist()
    base = hinge_reference(S.tolist(), [0, 1, 2, 3], neg.tolist(), valid, 0.2, True, True)
    extra = caption_anchor_reference(S.tolist(), cap.tolist(), valid, 0.2, True)
    assert extra > 0  # a tiny random model embeds a caption and its perturbation alike: the term is active
    assert got.item() == pytest.approx(base + 0.5 * extra, rel=1e-5)  # float32 scores, another summation order


@pytest.mark.parametrize("family", ["scan", "albef"])
def test_caption_anchored_term_needs_a_dual_encoder(family):
    model = {"scan": lambda: scan.tiny_scan(vocab_size=VOCAB), "albef": lambda: albef.tiny_albef(vocab_size=VOCAB)}
    with pytest.raises(ConfigError, match="caption_anchor_weight=0.5 needs a dual encoder"):
        build_task(model[family](), LossConfig(text_negatives=1, caption_anchor_weight=0.5))


def test_caption_anchored_term_needs_text_negatives():
    with pytest.raises(ConfigError, match=r"caption_anchor_weight=0.5 needs text negatives \(loss.text_negatives"):
        build_task(dual_encoder.tiny_vse(vocab_size=VOCAB), LossConfig(caption_anchor_weight=0.5))


# ---- the data view -------------------------------------------------------------------------------------
def tokenizer_for(ds):
    return CaptionTokenizer.train(ds.captions + ["blue green yellow purple orange white black pink brown grey"], 1, 32)


def test_pair_view_negatives_never_equal_the_positive_and_are_seeded(shapes_root):
    ds = ImageCaptionDataset(shapes_root, "train")
    tok = tokenizer_for(ds)
    view = PairView(ds, tok, None, text_negatives=3)
    for t in range(0, len(ds.captions), 7):
        negs = view.negatives(t, seed=t)
        assert 1 <= len(negs) <= 3
        assert all(normalise(n.text) != normalise(ds.captions[t]) for n in negs)
        assert view.negatives(t, seed=t) == negs  # a pure function of (t, seed)
    assert PairView(ds, tok, None).captions[0].keys() == {"input_ids", "text_idx", "image_idx"}  # K = 0: as before


def test_exact_negatives_of_the_dataset_file_are_used_and_short_lists_masked(tmp_path):
    entries = [{"captions": ["a red circle", "a blue star"], "split": "train"}] * 1
    root = helpers.write_karpathy(tmp_path, entries)
    data = json.loads((root / "dataset.json").read_text())
    data["images"][0]["sentences"][0]["negatives"] = [{"raw": "a green circle", "type": "replace_attribute"}]
    (root / "dataset.json").write_text(json.dumps(data))
    ds = ImageCaptionDataset(root, "train")
    tok = tokenizer_for(ds)
    view = PairView(ds, tok, lambda img: img, text_negatives=2)
    assert [n.text for n in view.negatives(0, seed=5)] == ["a green circle"]  # the file's own, not the perturber's
    assert view.negatives(1, seed=5)[0].type == "replace_attribute"  # no list in the file: the perturber
    batch = collate([view.captions[0] | view._with_negatives(dict(view.captions[0]), 0, 5)])
    assert batch["neg_input_ids"].shape[:2] == (1, 2) and batch["neg_valid"].tolist() == [[True, False]]
    assert tok.decode(batch["neg_input_ids"][0, 0].tolist()) == "a green circle"


@pytest.mark.parametrize(
    ("negatives", "message"),
    [
        ([{"raw": "A red circle.", "type": "swap_relation"}], "equals the caption"),
        ([{"raw": " ", "type": "swap_relation"}], "expected"),
        ("a green circle", "must hold one list per caption"),
    ],
)
def test_bad_exact_negatives_are_one_line_errors(tmp_path, negatives, message):
    root = helpers.write_karpathy(tmp_path, [{"captions": ["a red circle"], "split": "train"}])
    data = json.loads((root / "dataset.json").read_text())
    data["images"][0]["sentences"][0]["negatives"] = negatives
    (root / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=message):
        ImageCaptionDataset(root, "train")


# ---- training ------------------------------------------------------------------------------------------
def test_training_with_text_negatives_resumes_exactly(shapes_root, tmp_path, monkeypatch):
    from crossmatch.engine.checkpoint import load_checkpoint
    from crossmatch.runs import train as run_train

    extra = ("train.epochs=1", "checkpoint.every_steps=1", "loss.text_negatives=2")
    run_train(helpers.resume_cfg(shapes_root, *extra), tmp_path / "full")

    def has_negatives(batches):
        first = batches[0] if isinstance(batches, list) else batches  # the micro-batches of a step
        assert first["neg_input_ids"].shape[1] == 2 and first["neg_valid"].any()

    cut = lambda: run_train(helpers.resume_cfg(shapes_root, *extra), tmp_path / "cut")  # noqa: E731
    helpers.train_interrupted(monkeypatch, cut, after=2, check=has_negatives)
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["trainer"]["step_in_epoch"] == 2
    run_train(helpers.resume_cfg(shapes_root, *extra), tmp_path / "cut", resume=True)
    a, b = helpers.last_weights(tmp_path / "full"), helpers.last_weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the negatives changed the training (else the test above could not tell)
    run_train(helpers.resume_cfg(shapes_root, "train.epochs=1"), tmp_path / "plain")
    c = helpers.last_weights(tmp_path / "plain")
    assert not all(torch.equal(a[k], c[k]) for k in a)
