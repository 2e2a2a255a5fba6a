"""Fusion models (ALBEF, and ViLT through the same interface): retrieval interface shapes, training steps,
gradients, momentum state and row-aligned re-ranking. The ITC loss and the negative samplers are tested in
tests/losses/test_itm.py."""

from __future__ import annotations

import pytest
import torch

from crossmatch.config import LossConfig
from crossmatch.losses.itm import sample_hard_negative_set
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
