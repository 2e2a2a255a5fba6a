import pytest
import torch

from crossmatch.losses.triplet import TripletLoss

# Hand-checked example (margin 0.2). Pairs b = (image b, caption b); S[i, t] = score(image i, caption t).
S = torch.tensor([[0.9, 0.8, 0.1], [0.45, 0.5, 0.6], [0.3, 0.1, 0.7]])
# positives: diag = [0.9, 0.5, 0.7]
# caption t vs wrong image i, 0.2 + S[i,t] - S[t,t] > 0: (i=0,t=1) 0.5, (i=1,t=2) 0.1 -> sum 0.6, max/col 0.6
# image i vs wrong caption t, 0.2 + S[i,t] - S[i,i] > 0: (0,1) 0.1, (1,0) 0.15, (1,2) 0.3 -> sum 0.55, max/row 0.4


def test_hand_example_sum_and_hardest():
    ids = torch.tensor([0, 1, 2])
    assert TripletLoss(0.2, max_violation=False)(S, ids).item() == pytest.approx(1.15)
    assert TripletLoss(0.2, max_violation=True)(S, ids).item() == pytest.approx(1.0)


def test_captions_of_the_same_image_are_not_negatives():
    # Pairs 0 and 1 show image 0: (0,1) and (1,0) are positives, leaving (1,2) for both directions.
    ids = torch.tensor([0, 0, 2])
    assert TripletLoss(0.2, max_violation=False)(S, ids).item() == pytest.approx(0.1 + 0.3)
    assert TripletLoss(0.2, max_violation=True)(S, ids).item() == pytest.approx(0.1 + 0.3)


def brute_force(scores, ids, margin, hardest):
    B = len(ids)
    total = 0.0
    for q in range(B):  # caption q as query over images, then image q as query over captions
        c_img = [max(0.0, margin + scores[i][q] - scores[q][q]) for i in range(B) if ids[i] != ids[q]]
        c_txt = [max(0.0, margin + scores[q][t] - scores[q][q]) for t in range(B) if ids[t] != ids[q]]
        total += (max(c_img, default=0.0) + max(c_txt, default=0.0)) if hardest else (sum(c_img) + sum(c_txt))
    return total


@pytest.mark.parametrize("hardest", [False, True])
def test_matches_brute_force(hardest):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(9, 9, generator=g, dtype=torch.float64) * 2 - 1
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5])
    got = TripletLoss(0.2, hardest)(scores, ids).item()
    assert got == pytest.approx(brute_force(scores.tolist(), ids.tolist(), 0.2, hardest))


def test_gradient_only_through_violations():
    scores = S.clone().requires_grad_(True)
    TripletLoss(0.2, max_violation=True)(scores, torch.tensor([0, 1, 2])).backward()
    # hardest violators: S[0,1] (twice: as image-negative of caption 1 and caption-negative of image 0),
    # S[1,2] (image-negative of caption 2), S[1,2] again (caption-negative of image 1).
    expected = torch.zeros(3, 3)
    expected[0, 1], expected[1, 2] = 2, 2
    expected[0, 0], expected[1, 1], expected[2, 2] = -1, -2, -1  # positives pulled up once per violation
    torch.testing.assert_close(scores.grad, expected)
