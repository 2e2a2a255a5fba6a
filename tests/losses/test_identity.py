"""IRRA's ID loss (losses/identity.py::IdentityClassifierLoss) against a hand-written loop, and the map from
person identities to classes."""

from __future__ import annotations

import math

import pytest
import torch

from crossmatch.errors import DataError
from crossmatch.losses.identity import IdentityClassifierLoss, identity_classes


def test_identities_map_to_their_rank_among_the_sorted_training_ids():
    loss = IdentityClassifierLoss([7, 3, 7, 12], dim=4)
    assert loss.classes.tolist() == [3, 7, 12] and loss.num_classes == 3
    assert identity_classes(torch.tensor([7, 3, 7, 12]), loss.classes).tolist() == [1, 0, 1, 2]
    # ids below, between and above the training ids are no class
    assert identity_classes(torch.tensor([1, 5, 13, 12]), loss.classes).tolist() == [-1, -1, -1, 2]


def test_the_classifier_starts_as_irra_s_weights_n_0_0_001_and_bias_0():
    torch.manual_seed(0)
    clf = IdentityClassifierLoss(range(200), dim=64).classifier
    assert clf.weight.shape == (200, 64) and clf.bias.shape == (200,)
    assert clf.weight.std().item() == pytest.approx(0.001, rel=0.05)
    assert torch.count_nonzero(clf.bias).item() == 0


def naive_ce(x: list[float], w: list[list[float]], b: list[float], y: int) -> float:
    """Cross-entropy of logits W x + b at class y, with a stable log-sum-exp."""
    logits = [sum(wk[e] * x[e] for e in range(len(x))) + bk for wk, bk in zip(w, b, strict=True)]
    m = max(logits)
    return m + math.log(sum(math.exp(z - m) for z in logits)) - logits[y]


def test_the_id_loss_is_the_mean_of_the_image_and_text_cross_entropies():
    g = torch.Generator().manual_seed(0)
    loss = IdentityClassifierLoss([12, 3, 7], dim=4)
    with torch.no_grad():  # weights a bug in the mapping or the reduction would show through
        loss.classifier.weight.copy_(torch.randn(3, 4, generator=g))
        loss.classifier.bias.copy_(torch.randn(3, generator=g))
    img, txt = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    pids = [7, 3, 12, 7]
    w, b = loss.classifier.weight.tolist(), loss.classifier.bias.tolist()
    labels = [[3, 7, 12].index(p) for p in pids]
    img_ce = sum(naive_ce(x, w, b, y) for x, y in zip(img.tolist(), labels, strict=True)) / 4
    txt_ce = sum(naive_ce(x, w, b, y) for x, y in zip(txt.tolist(), labels, strict=True)) / 4
    assert loss(img, txt, torch.tensor(pids)).item() == pytest.approx((img_ce + txt_ce) / 2, rel=1e-5)
    assert img_ce != pytest.approx(txt_ce, rel=1e-2)  # both modalities count, and differently


def test_unknown_identities_fail_in_training_and_are_left_out_in_eval():
    g = torch.Generator().manual_seed(1)
    loss = IdentityClassifierLoss([1, 2], dim=3)
    img, txt = torch.randn(3, 3, generator=g), torch.randn(3, 3, generator=g)
    with pytest.raises(DataError, match=r"person identities \[9\] are not among the 2 training classes"):
        loss(img, txt, torch.tensor([1, 9, 2]))
    loss.eval()  # the validation loss: identity-disjoint splits
    kept = loss(img[[0, 2]], txt[[0, 2]], torch.tensor([1, 2]))
    assert loss(img, txt, torch.tensor([1, 9, 2])).item() == pytest.approx(kept.item(), rel=1e-6)
    assert loss(img, txt, torch.tensor([8, 9, 10])) is None
