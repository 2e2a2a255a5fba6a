"""Fusion models (ALBEF, ViLT): retrieval interface shapes, training steps, gradients, momentum state,
row-aligned re-ranking, and the negative samplers of losses/itm.py."""

from __future__ import annotations

import math

import pytest
import torch

from crossmatch.config import LossConfig
from crossmatch.losses.itm import (
    ItcLoss,
    positive_targets,
    sample_hard_negative_set,
    sample_hard_negatives,
    sample_random_negatives,
)
from crossmatch.models import albef, vilt
from crossmatch.tasks.base import build_task
from tests.helpers import VOCAB, make_batch

FAMILIES = {  # name -> (builder, overrides): every code path of each family once
    "tiny_albef": (albef.tiny_albef, {}),
    "tiny_albef_mlm_cnn": (
        albef.tiny_albef,
        {"mlm": True, "momentum": False, "image_tower": "cnn", "cnn_channels": (4, 4, 8), "rerank_score": "itm+itc"},
    ),
    "tiny_vilt": (vilt.tiny_vilt, {}),
}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    fn, overrides = FAMILIES[name]
    return fn(vocab_size=VOCAB, **overrides)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_retrieval_interface_shapes(name):
    model = build(name).eval()
    batch = make_batch([0, 0, 1, 2, 3])
    with torch.no_grad():
        img, txt = model.encode_image_features(batch), model.encode_text_features(batch)
        assert img["embed"].shape == (5, 8) and txt["embed"].shape == (5, 8)
        assert img["tokens"].shape[:2] == img["mask"].shape and img["tokens"].shape[0] == 5
        assert txt["tokens"].shape == (5, 7, 16) and txt["mask"].shape == (5, 7)  # [CLS] prepended
        torch.testing.assert_close(img["embed"].norm(dim=-1), torch.ones(5))
        sim = model.similarity(img, {k: v[:3] for k, v in txt.items()})
        assert sim.shape == (5, 3)
        scores = model.score_pairs(img, txt)
        assert scores.shape == (5,) and torch.isfinite(scores).all()
        out = model.forward_features(batch)
    assert out["scores"].shape == (5, 5) and out["itm_logits"].shape == (5, 2)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_training_step_gives_every_parameter_a_gradient(name):
    model = build(name).train()
    task = build_task(model, LossConfig())
    assert type(task).__name__ == ("AlbefTask" if "albef" in name else "ViltTask")
    losses, logs = task.training_step(make_batch([0, 0, 0, 1, 1, 2, 3, 4]))
    assert losses and all(k.endswith("_loss") for k in losses)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values()), losses
    assert all(isinstance(v, float) for v in logs.values())
    sum(losses.values()).backward()
    for n, p in model.named_parameters():
        if n.split(".")[0].endswith("_m"):  # ALBEF's momentum copies: EMA-updated, never trained
            assert not p.requires_grad, n
        else:
            assert p.grad is not None, f"{n} got no gradient"
            assert torch.isfinite(p.grad).all(), n


def test_vilt_hard_negatives_are_drawn_by_the_cheap_head(monkeypatch):
    """loss.vilt.negatives=hard: the ranking candidates come from the cheap head's ITC logits of this batch,
    and the first of each row is the ITM negative."""
    import crossmatch.tasks.vilt as vilt_task
    from crossmatch.config import ViltLossConfig

    torch.manual_seed(0)
    model = vilt.tiny_vilt(vocab_size=VOCAB).eval()
    task = build_task(model, LossConfig(vilt=ViltLossConfig(n_negatives=2, negatives="hard")))
    batch, seen = make_batch([0, 1, 1, 2, 3]), {}

    def draw(sim, image_idx, n, generator=None):
        seen["sim"], seen["n"] = sim, n
        return sample_hard_negative_set(sim, image_idx, n, generator)

    monkeypatch.setattr(vilt_task, "sample_hard_negative_set", draw)
    monkeypatch.setattr(vilt_task, "sample_random_negatives", None)  # must not be called
    with torch.no_grad():
        losses, _ = task.training_step(batch)
        img, txt = model.encode_image_features(batch), model.encode_text_features(batch)
    torch.testing.assert_close(seen["sim"], img["embed"] @ txt["embed"].t() / model.temp, rtol=0, atol=1e-6)
    assert seen["n"] == 2 and not seen["sim"].requires_grad
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_batch_of_one_image_is_finite(name):
    """Every pair shows the same image: no hard negative exists, the losses must still be finite."""
    model = build(name).train()
    losses, _ = build_task(model, LossConfig()).training_step(make_batch([7, 7, 7, 7]))
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_score_pairs_is_row_aligned_and_padding_invariant(name):
    model = build(name).eval()
    batch = make_batch([0, 1, 1, 2, 3, 4])
    with torch.no_grad():
        img, txt = model.encode_image_features(batch), model.encode_text_features(batch)
        full = model.score_pairs(img, txt)
        rows = torch.tensor([4, 0, 2])
        sliced = model.score_pairs({k: v[rows] for k, v in img.items()}, {k: v[rows] for k, v in txt.items()})
        torch.testing.assert_close(sliced, full[rows])
        # The evaluator zero-pads token features along dim 1 (mask False) when it concatenates batches.
        pad = torch.nn.functional.pad
        padded = {"embed": txt["embed"], "tokens": pad(txt["tokens"], (0, 0, 0, 3)), "mask": pad(txt["mask"], (0, 3))}
        torch.testing.assert_close(model.score_pairs(img, padded), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_eval_mode_is_deterministic(name):
    model = build(name).eval()
    batch = make_batch([0, 1, 2])
    with torch.no_grad():
        a, b = model.forward_features(batch), model.forward_features(batch)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_albef_momentum_state_round_trips():
    model = build("tiny_albef").train()
    task = build_task(model, LossConfig())
    task.on_epoch_start(0)
    task.on_step(0.5)
    batch = make_batch([0, 0, 1, 2, 3, 4])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        val_losses, _ = task.validation_step(batch)  # same terms, and no EMA step or enqueue
    assert set(val_losses) == {"itc_loss", "itm_loss"}
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    losses, logs = task.training_step(batch)
    assert logs["alpha"] == pytest.approx(0.2)  # 0.4 ramped halfway through the first epoch
    assert all(torch.isfinite(v) for v in losses.values())  # the distillation path ran
    state = model.state_dict()
    for key in ("image_queue", "text_queue", "idx_queue", "queue_ptr", "visual_encoder_m.embed.cls"):
        assert key in state, key
    assert state["queue_ptr"].item() == 6 and state["idx_queue"][:6].tolist() == [0, 0, 1, 2, 3, 4]
    restored = albef.tiny_albef(vocab_size=VOCAB)
    restored.load_state_dict(state)
    for k, v in restored.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def test_albef_queue_wraps_around():
    model = build("tiny_albef")  # queue_size 16
    for step in range(3):  # 3 x 6 = 18 items: the last two overwrite slots 0 and 1
        idx = torch.arange(6) + 6 * step
        model.enqueue(torch.randn(6, 8), torch.randn(6, 8), idx)
    assert model.queue_ptr.item() == 2
    assert model.idx_queue[:2].tolist() == [16, 17] and model.idx_queue[2:].tolist() == list(range(2, 16))


def test_itc_loss_matches_naive_reference():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=-1)
    idx, temp = torch.tensor([0, 0, 1, 2, 2]), torch.tensor(0.1)
    loss = ItcLoss()(img, txt, idx, temp)
    total = 0.0
    for a, b in ((img, txt), (txt, img)):
        for i in range(5):
            logp = torch.log_softmax(a[i] @ b.t() / temp, 0)
            pos = [j for j in range(5) if idx[j] == idx[i]]
            total += -sum(logp[j] for j in pos) / len(pos) / 5
    torch.testing.assert_close(loss, total / 2)
    assert positive_targets(idx, idx).sum(1).allclose(torch.ones(5))


def _weights(sim: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    w = torch.softmax(sim, 1).masked_fill(idx[:, None] == idx[None, :], 0)  # ALBEF: softmax, positives zeroed
    return w / w.sum(1, keepdim=True)


def test_hard_negatives_never_positive_and_follow_the_weights():
    g = torch.Generator().manual_seed(0)
    idx = torch.tensor([0, 0, 0, 1, 1, 2, 3])  # several captions per image
    sim_i2t, sim_t2i = torch.randn(7, 7, generator=g), 2 * torch.randn(7, 7, generator=g)
    # Many independent draws in one call: K copies of the batch on a block diagonal, each copy with its own
    # image ids and -inf similarity (probability 0) to the other copies.
    K, n_calls = 100, 30
    big_idx = (idx[None, :] + 10 * torch.arange(K)[:, None]).flatten()  # (K*7,)
    block = torch.block_diag(*[torch.ones(7, 7)] * K).bool()  # (K*7, K*7)
    big = [torch.full((7 * K, 7 * K), float("-inf")).masked_scatter(block, s.repeat(K, 1)) for s in (sim_i2t, sim_t2i)]
    counts_t, counts_i = torch.zeros(7, 7), torch.zeros(7, 7)
    rows = torch.arange(7 * K)
    for _ in range(n_calls):
        neg_t, neg_i = sample_hard_negatives(big[0], big[1], big_idx, generator=g)
        assert (big_idx[neg_t] != big_idx).all() and (big_idx[neg_i] != big_idx).all()
        assert (neg_t // 7 == rows // 7).all() and (neg_i // 7 == rows // 7).all()
        counts_t.index_put_((rows % 7, neg_t % 7), torch.ones(7 * K), accumulate=True)
        counts_i.index_put_((rows % 7, neg_i % 7), torch.ones(7 * K), accumulate=True)
    n = K * n_calls
    for counts, sim in ((counts_t, sim_i2t), (counts_i, sim_t2i)):
        p = _weights(sim, idx)
        tol = 5 * (p * (1 - p) / n).sqrt() + 1e-6  # 5 binomial standard deviations per cell
        assert ((counts / n - p).abs() <= tol).all(), (counts / n - p).abs().max()


def test_hard_negatives_without_any_negative():
    idx = torch.tensor([3, 3, 3])
    neg_t, neg_i = sample_hard_negatives(torch.randn(3, 3), torch.randn(3, 3), idx)
    assert neg_t.tolist() == [-1, -1, -1] and neg_i.tolist() == [-1, -1, -1]
    # A row whose negatives underflow after a softmax (tiny temperature) still draws a negative.
    neg_t, _ = sample_hard_negatives(torch.tensor([[0.0, -1e4], [-1e4, 0.0]]), torch.zeros(2, 2), torch.tensor([0, 1]))
    assert neg_t.tolist() == [1, 0]


def test_random_negatives_are_distinct_negatives():
    g = torch.Generator().manual_seed(0)
    idx = torch.tensor([0, 0, 1, 1, 2, 3, 4])
    for _ in range(50):
        neg, valid = sample_random_negatives(idx, 4, generator=g)
        assert neg.shape == (7, 4)
        assert (idx[neg] != idx[:, None])[valid].all()
        assert valid.all()  # every row has at least 4 captions of other images
        assert all(len(set(r)) == 4 for r in neg.tolist())
    neg, valid = sample_random_negatives(torch.tensor([0, 0, 1]), 5, generator=g)
    assert neg.shape == (3, 2) and valid.tolist() == [[True, False], [True, False], [True, True]]


def _ordered_pair_probs(logits: list[float]) -> dict[tuple[int, int], float]:
    """Slow reference: P(first draw i, then j) of two draws without replacement, each by softmax over what is
    left (Plackett-Luce), by enumeration."""
    w = [math.exp(v) for v in logits]
    return {(i, j): w[i] / sum(w) * w[j] / (sum(w) - w[i]) for i in range(len(w)) for j in range(len(w)) if i != j}


def test_hard_negative_set_is_a_sequential_softmax_draw():
    # Row 0 of a batch of 5 pairs over 4 images: its positive column 1 is never drawn, columns 2-4 (sim 0,
    # ln 2, ln 5) by Plackett-Luce: first 2 with probability 1/8, 3 with 2/8, 4 with 5/8, then from the rest.
    idx = torch.tensor([0, 0, 1, 2, 3])
    sim_row = [0.0, 7.0, 0.0, math.log(2), math.log(5)]  # the positive's 7.0 would win every draw if allowed
    expected = _ordered_pair_probs(sim_row[2:])  # over columns 2, 3, 4
    K, n_calls = 400, 10  # independent copies of row 0 on a block diagonal, as in the test above
    big_idx = (idx[None, :] + 10 * torch.arange(K)[:, None]).flatten()  # (K*5,)
    block = torch.block_diag(*[torch.ones(5, 5)] * K).bool()
    sim = torch.tensor(sim_row).expand(5, 5)
    big = torch.full((5 * K, 5 * K), float("-inf")).masked_scatter(block, sim.repeat(K, 1))
    g, counts = torch.Generator().manual_seed(0), {}
    for _ in range(n_calls):
        neg, valid = sample_hard_negative_set(big, big_idx, 2, generator=g)  # (5K, 2)
        assert valid.all() and (big_idx[neg] != big_idx[:, None]).all()
        assert (neg // 5 == torch.arange(5 * K)[:, None] // 5).all()  # never a -inf column of another copy
        for a, b in (neg[::5] % 5 - 2).tolist():  # row 0 of every copy, columns as 0..2
            counts[a, b] = counts.get((a, b), 0) + 1
    n = K * n_calls
    for pair, p in expected.items():
        tol = 5 * math.sqrt(p * (1 - p) / n)  # 5 binomial standard deviations
        assert abs(counts.get(pair, 0) / n - p) <= tol, (pair, counts.get(pair, 0) / n, p)


def test_hard_negative_set_masks_like_the_random_one():
    g = torch.Generator().manual_seed(0)
    neg, valid = sample_hard_negative_set(torch.randn(3, 3), torch.tensor([0, 0, 1]), 5, generator=g)
    assert neg.shape == (3, 2) and valid.tolist() == [[True, False], [True, False], [True, True]]
    assert neg[0, 0] == 2 and neg[1, 0] == 2 and sorted(neg[2].tolist()) == [0, 1]
    # a huge first-stage margin picks the same negative every time, and the draw is distinct per row
    sim = torch.tensor([[0.0, 50.0, 0.0, 0.0], [0.0] * 4, [0.0] * 4, [0.0] * 4])
    neg, _ = sample_hard_negative_set(sim, torch.arange(4), 3, generator=g)
    assert neg[0, 0] == 1 and all(len(set(r)) == 3 for r in neg.tolist())
