"""Retrieval metrics against brute-force oracles written straight from the definitions."""

import math
import random
import statistics

import numpy as np
import pytest
import torch

from crossmatch.metrics import (
    fold_metrics,
    person_search_metrics,
    pessimistic_ranks,
    ranks_i2t,
    ranks_t2i,
    recall_summary,
    retrieval_metrics,
    twin_accuracy,
)

KEYS = "i2t_r1 i2t_r5 i2t_r10 i2t_medr i2t_meanr t2i_r1 t2i_r5 t2i_r10 t2i_medr t2i_meanr rsum".split()


# ---------------------------------------------------------------- oracles (plain Python, no vectorisation)
def pessimistic_position(cands: list[tuple[float, bool]]) -> int:
    """0-based position of the first positive after sorting by score descending, negatives first on ties."""
    order = sorted(cands, key=lambda c: (-c[0], c[1]))  # False (negative) sorts before True (positive)
    return min(p for p, (_, is_pos) in enumerate(order) if is_pos)


def test_pessimistic_ranks_by_hand() -> None:
    """The one tie rule that every rank (retrieval, person search, search, the report) comes from."""
    scores = torch.tensor(
        [
            [0.5, 0.9, 0.5, 0.1],  # positive 0 (0.5): 0.9 ahead, 0.5 ties (counted ahead)       -> rank 2
            [0.3, 0.3, 0.3, 0.3],  # constant scores, positive 3: every other item ahead          -> rank 3
            [0.2, 0.8, 0.8, 0.6],  # positives 1, 2 tie at 0.8: the best one, nothing else ahead  -> rank 0
            [0.4, 0.7, 0.1, 0.7],  # positives 0, 2 (best 0.4): 0.7 twice                         -> rank 2
            [0.4, 0.7, 0.1, 0.7],  # no positive: every item ahead                                -> rank 4
        ]
    )
    positive = torch.tensor(
        [
            [True, False, False, False],
            [False, False, False, True],
            [False, True, True, False],
            [True, False, True, False],
            [False, False, False, False],
        ]
    )
    assert pessimistic_ranks(scores, positive).tolist() == [2, 3, 0, 2, 4]
    assert int(pessimistic_ranks(scores[0], positive[0])) == 2  # one query: a 1-D row
    from crossmatch.search.query import match_rank

    assert match_rank(scores[3], {0, 2}) == 3  # search prints it 1-based
    assert match_rank(scores[3], set()) is None


def oracle_retrieval(scores: list[list[float]], txt_to_img: list[int]) -> dict[str, float]:
    n_img, n_txt = len(scores), len(txt_to_img)
    i2t = [pessimistic_position([(scores[i][t], txt_to_img[t] == i) for t in range(n_txt)]) for i in range(n_img)]
    t2i = [pessimistic_position([(scores[i][t], txt_to_img[t] == i) for i in range(n_img)]) for t in range(n_txt)]
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
        out[f"{name}_medr"] = math.floor(statistics.median(ranks)) + 1
        out[f"{name}_meanr"] = sum(ranks) / len(ranks) + 1
    out["rsum"] = sum(out[f"{n}_r{k}"] for n in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def oracle_person(scores: list[list[float]], qids: list[int], gids: list[int], ks=(1, 5, 10)) -> dict[str, float]:
    hits, aps, inps = {k: 0 for k in ks}, [], []
    for q, row in enumerate(scores):
        order = sorted(range(len(gids)), key=lambda g: (-row[g], gids[g] == qids[q], g))
        relevant_positions = [p + 1 for p, g in enumerate(order) if gids[g] == qids[q]]  # 1-based
        for k in ks:
            hits[k] += relevant_positions[0] <= k
        aps.append(sum((j + 1) / p for j, p in enumerate(relevant_positions)) / len(relevant_positions))
        inps.append(len(relevant_positions) / relevant_positions[-1])
    out = {f"r{k}": 100.0 * hits[k] / len(scores) for k in ks}
    out["mAP"] = 100.0 * sum(aps) / len(aps)
    out["mINP"] = 100.0 * sum(inps) / len(inps)
    return out


def uneven_split(n_img: int, rng: random.Random) -> list[int]:
    """1-7 captions per image, shuffled so an image's captions are not contiguous."""
    txt_to_img = [i for i in range(n_img) for _ in range(rng.randint(1, 7))]
    rng.shuffle(txt_to_img)
    return txt_to_img


def assert_close(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k


# ---------------------------------------------------------------- retrieval_metrics
def test_hand_example():
    # 3 images, 4 captions; caption -> image: t0->2, t1->0, t2->1, t3->0 (image 0 owns t1 and t3).
    scores = [
        [0.1, 0.5, 0.9, 0.2],
        [0.3, 0.4, 0.8, 0.2],
        [0.7, 0.7, 0.2, 0.1],
    ]
    # i2t: image 0 best own = 0.5 (t1); t2 (0.9) is ahead                     -> rank 1
    #      image 1 own t2 = 0.8 beats 0.3, 0.4, 0.2                           -> rank 0
    #      image 2 own t0 = 0.7 ties with t1 = 0.7 (pessimistic: t1 ahead)    -> rank 1
    #      ranks [1, 0, 1]: R@1 = 33.33, R@5 = R@10 = 100, medr = 1 + 1 = 2, meanr = 2/3 + 1
    # t2i: t0 column [0.1, 0.3, 0.7], true image 2 is top                     -> rank 0
    #      t1 column [0.5, 0.4, 0.7], image 2 beats true image 0              -> rank 1
    #      t2 column [0.9, 0.8, 0.2], image 0 beats true image 1              -> rank 1
    #      t3 column [0.2, 0.2, 0.1], image 1 ties true image 0 (pessimistic) -> rank 1
    #      ranks [0, 1, 1, 1]: R@1 = 25, R@5 = R@10 = 100, medr = 1 + 1 = 2, meanr = 3/4 + 1 = 1.75
    want = {
        "i2t_r1": 100 / 3, "i2t_r5": 100.0, "i2t_r10": 100.0, "i2t_medr": 2.0, "i2t_meanr": 5 / 3,
        "t2i_r1": 25.0, "t2i_r5": 100.0, "t2i_r10": 100.0, "t2i_medr": 2.0, "t2i_meanr": 1.75,
        "rsum": 100 / 3 + 25.0 + 400.0,
    }  # fmt: skip
    txt_to_img = [2, 0, 1, 0]
    assert ranks_i2t(scores, txt_to_img).tolist() == [1, 0, 1]
    assert ranks_t2i(scores, txt_to_img).tolist() == [0, 1, 1, 1]
    assert_close(retrieval_metrics(scores, txt_to_img), want)
    assert list(retrieval_metrics(scores, txt_to_img)) == KEYS


def test_recall_summary_even_median():
    # ranks [0, 3, 7, 12]: R@1 = 25, R@5 = 50, R@10 = 75; median (3 + 7) / 2 = 5 -> medr 6; mean 22/4 + 1 = 6.5
    out = recall_summary(torch.tensor([12, 0, 7, 3]), "x")
    assert out == {"x_r1": 25.0, "x_r5": 50.0, "x_r10": 75.0, "x_medr": 6.0, "x_meanr": 6.5}
    # median 1.5 floors to 1 (numpy/SCAN convention), not the lower middle 0
    assert recall_summary(torch.tensor([0, 3]), "")["medr"] == 2.0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_random_matches_oracle(seed, ties):
    rng = random.Random(seed)
    n_img = rng.randint(2, 25)
    txt_to_img = uneven_split(n_img, rng)
    if ties:  # integer scores from a small range: many exact ties
        scores = [[float(rng.randint(0, 3)) for _ in txt_to_img] for _ in range(n_img)]
    else:
        scores = [[rng.gauss(0, 1) for _ in txt_to_img] for _ in range(n_img)]
    got = retrieval_metrics(torch.tensor(scores, dtype=torch.float64), torch.tensor(txt_to_img))
    assert_close(got, oracle_retrieval(scores, txt_to_img))


def test_integer_dtype_and_numpy_input():
    rng = random.Random(7)
    txt_to_img = uneven_split(12, rng)
    scores = np.array([[rng.randint(-2, 2) for _ in txt_to_img] for _ in range(12)])  # int64 array
    want = oracle_retrieval(scores.tolist(), txt_to_img)
    assert_close(retrieval_metrics(scores, np.array(txt_to_img)), want)
    assert_close(retrieval_metrics(scores.astype(np.float32), txt_to_img), want)
    assert_close(retrieval_metrics(torch.from_numpy(scores).float(), torch.tensor(txt_to_img)), want)


def test_constant_scores_get_worst_rank():
    rng = random.Random(3)
    n_img = 10
    txt_to_img = uneven_split(n_img, rng)
    scores = torch.zeros(n_img, len(txt_to_img))
    n_caps = torch.bincount(torch.tensor(txt_to_img), minlength=n_img)
    assert torch.equal(ranks_i2t(scores, txt_to_img), len(txt_to_img) - n_caps)  # all other captions ahead
    assert torch.equal(ranks_t2i(scores, txt_to_img), torch.full((len(txt_to_img),), n_img - 1))
    m = retrieval_metrics(scores, txt_to_img)
    assert m["i2t_r1"] == m["t2i_r1"] == 0.0
    assert m["t2i_medr"] == n_img


def test_perfect_scores():
    rng = random.Random(4)
    txt_to_img = torch.tensor(uneven_split(30, rng))
    scores = (torch.arange(30)[:, None] == txt_to_img[None, :]).float()  # 1 on every true pair, 0 elsewhere
    m = retrieval_metrics(scores, txt_to_img)
    assert m["rsum"] == 600.0
    assert m["i2t_medr"] == m["t2i_medr"] == m["i2t_meanr"] == m["t2i_meanr"] == 1.0


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_chunked_equals_unchunked(chunk):
    rng = random.Random(11)
    txt_to_img = uneven_split(17, rng)
    scores = torch.randint(0, 4, (17, len(txt_to_img))).float()
    assert torch.equal(ranks_i2t(scores, txt_to_img, chunk_size=chunk), ranks_i2t(scores, txt_to_img, chunk_size=10**6))
    assert torch.equal(ranks_t2i(scores, txt_to_img, chunk_size=chunk), ranks_t2i(scores, txt_to_img, chunk_size=10**6))
    assert retrieval_metrics(scores, txt_to_img, chunk_size=chunk) == retrieval_metrics(scores, txt_to_img)


def test_neg_inf_positive_is_worst():
    # re-ranking leaves pairs outside the top-k at -inf; a true pair at -inf must not look perfect
    scores = torch.full((3, 3), float("-inf"))
    assert ranks_t2i(scores, [0, 1, 2]).tolist() == [2, 2, 2]
    assert ranks_i2t(scores, [0, 1, 2]).tolist() == [2, 2, 2]


@pytest.mark.parametrize(
    ("scores", "txt_to_img", "match"),
    [
        (torch.zeros(3, 4), [0, 1, 0, 1], "no caption"),
        (torch.zeros(3, 4), [0, 1, 2], "entries"),
        (torch.zeros(3, 3), [0, 1, 3], "outside"),
        (torch.zeros(3), [0, 1, 2], "2-D"),
        (torch.tensor([[0.0, float("nan")], [0.0, 0.0]]), [0, 1], "NaN"),
    ],
)
def test_invalid_inputs(scores, txt_to_img, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(scores, txt_to_img)


# ---------------------------------------------------------------- fold_metrics
def test_fold_metrics():
    rng = random.Random(5)
    n_img, n_folds = 12, 3
    txt_to_img = uneven_split(n_img, rng)
    scores = torch.randn(n_img, len(txt_to_img))
    assert fold_metrics(scores, txt_to_img, 1) == retrieval_metrics(scores, txt_to_img)

    got = fold_metrics(scores, txt_to_img, n_folds)
    size = n_img // n_folds
    per_fold = []
    for f in range(n_folds):
        caps = [t for t, i in enumerate(txt_to_img) if f * size <= i < (f + 1) * size]
        sub = [[scores[i][t].item() for t in caps] for i in range(f * size, (f + 1) * size)]
        per_fold.append(oracle_retrieval(sub, [txt_to_img[t] - f * size for t in caps]))
    want = {k: sum(m[k] for m in per_fold) / n_folds for k in KEYS}
    assert_close(got, want)
    recalls = [got[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert got["rsum"] == pytest.approx(sum(recalls), abs=1e-12)

    # scores between folds are never looked at
    fold_of_txt = torch.tensor(txt_to_img) // size
    same_fold = (torch.arange(n_img) // size)[:, None] == fold_of_txt[None, :]  # (n_img, n_txt)
    assert fold_metrics(scores.masked_fill(~same_fold, 1e9), txt_to_img, n_folds) == got

    with pytest.raises(ValueError, match="divide"):
        fold_metrics(scores, txt_to_img, 5)


# ---------------------------------------------------------------- twin_accuracy
def test_twin_accuracy_hand_example():
    # captions -> images: t0, t1 -> 0; t2 -> 1; t3 -> 2; t4 -> 3. Twins (0, 1) and (2, 3).
    scores = torch.tensor(
        [
            [0.9, 0.4, 0.5, 0.0, 0.0],  # image 0: t0 0.9 > t2 0.5 win; t1 0.4 > 0.5 lose
            [0.6, 0.1, 0.6, 0.0, 0.0],  # image 1: t2 0.6 vs t0 0.6 tie = lose; vs t1 0.1 win
            [0.0, 0.0, 0.0, 0.7, 0.2],  # image 2: t3 0.7 > t4 0.2 win
            [0.0, 0.0, 0.0, 0.3, 0.8],  # image 3: t4 0.8 > t3 0.3 win
        ]
    )
    # 6 cases, 4 wins -> 66.67
    assert twin_accuracy(scores, [0, 0, 1, 2, 3], [(0, 1), (2, 3)]) == pytest.approx(400 / 6)
    assert twin_accuracy(scores.numpy(), np.array([0, 0, 1, 2, 3]), [(0, 1)]) == pytest.approx(50.0)
    assert twin_accuracy(torch.zeros(4, 5), [0, 0, 1, 2, 3], [(0, 1)]) == 0.0  # constant scores: all ties fail
    with pytest.raises(ValueError):
        twin_accuracy(scores, [0, 0, 1, 2, 3], [(1, 1)])


# ---------------------------------------------------------------- person_search_metrics
def test_person_search_hand_example():
    gallery_ids = [7, 3, 7, 3, 7]
    scores = [
        # query id 7, relevant g0, g2, g4. Order: g0 (0.9), g1 (0.8), g3 (0.5, non-relevant first on the tie),
        # g2 (0.5), g4 (0.1). Relevant at positions 1, 4, 5: AP = (1/1 + 2/4 + 3/5) / 3 = 0.7; INP = 3/5; R@1 hit.
        [0.9, 0.8, 0.5, 0.5, 0.1],
        # query id 3, relevant g1, g3. Order: g2 (0.9), g4 (0.3, before g1 on the tie), g1 (0.3), g0, g3 (0.1).
        # Relevant at positions 3, 5: AP = (1/3 + 2/5) / 2 = 11/30; INP = 2/5; first hit at 3: R@1 miss, R@5 hit.
        [0.2, 0.3, 0.9, 0.1, 0.3],
    ]
    want = {"r1": 50.0, "r5": 100.0, "r10": 100.0, "mAP": 50 * (0.7 + 11 / 30), "mINP": 50.0}
    assert_close(person_search_metrics(scores, [7, 3], gallery_ids), want)
    assert_close(person_search_metrics(np.array(scores), np.array([7, 3]), np.array(gallery_ids)), want)


@pytest.mark.parametrize("seed", range(4))
def test_person_search_matches_oracle(seed):
    rng = random.Random(seed)
    n_ids = rng.randint(2, 6)
    gids = [rng.randrange(n_ids) for _ in range(rng.randint(8, 30))]
    qids = [rng.choice(gids) for _ in range(rng.randint(1, 20))]
    scores = [[float(rng.randint(0, 4)) if seed % 2 else rng.random() for _ in gids] for _ in qids]  # odd: ties
    want = oracle_person(scores, qids, gids, ks=(1, 3, 5, 10))
    s = torch.tensor(scores, dtype=torch.float64)
    assert_close(person_search_metrics(s, qids, gids, ks=(1, 3, 5, 10)), want)
    assert_close(person_search_metrics(s, qids, gids, ks=(1, 3, 5, 10), chunk_size=3), want)


def test_person_search_constant_scores_and_missing_id():
    m = person_search_metrics(torch.zeros(2, 4), [1, 2], [0, 1, 2, 3])
    assert m["r1"] == 0.0 and m["mINP"] == 25.0  # the single relevant item lands last of 4
    with pytest.raises(ValueError, match="no relevant"):
        person_search_metrics(torch.zeros(2, 4), [1, 9], [0, 1, 2, 3])
