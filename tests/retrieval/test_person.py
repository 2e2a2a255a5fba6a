"""Person search: identity-level evaluation on hand-checked scores, the CMPM and SDM losses of tiny_tipcb
against naive loops, the model's part-based score, and training through the CLI on CUHK-PEDES-format data."""

import json
import math

import pytest
import torch
from torch import nn

from crossmatch.cli.main import main
from crossmatch.config import IdentityLossConfig, LossConfig
from crossmatch.data.loaders import build_eval_loader
from crossmatch.losses.identity import CmpmLoss, SdmLoss
from crossmatch.metrics import person_search_metrics
from crossmatch.models import create_model
from crossmatch.retrieval.evaluate import EvalData, compute_scores
from crossmatch.retrieval.person import I2T_KEYS, KEYS, evaluate_person_search, format_person_table, image_pids
from crossmatch.runs import build_eval_data, load_run, open_split
from crossmatch.tasks import build_task
from tests.helpers import FixedScores, tiny_batch, train_args, write_pedes

# Hand-made (N_img=4, N_txt=3) scores; image pids [0, 0, 1, 2]; captions of images 0, 2, 3.
SCORES = torch.tensor([[0.9, 0.1, 0.3], [0.5, 0.8, 0.2], [0.7, 0.6, 0.4], [0.2, 0.3, 0.1]])
PIDS = torch.tensor([0, 0, 1, 2])
TXT_TO_IMG = torch.tensor([0, 2, 3])


def fixed_data():
    images = [{"image_idx": i} for i in range(4)]
    texts = [{"text_idx": t, "image_idx": int(TXT_TO_IMG[t])} for t in range(3)]
    return EvalData(build_eval_loader(images, 2), build_eval_loader(texts, 2), TXT_TO_IMG, [])


def test_person_search_evaluation_on_hand_checked_scores():
    m = evaluate_person_search(FixedScores(SCORES), fixed_data(), PIDS, torch.device("cpu"), chunk_size=3)
    # Caption 0 (pid 0): ranked images 0+, 2, 1+, 3 -> AP (1/1 + 2/3) / 2, INP 2/3; caption 0's image is
    # not the only relevant one (image 1 shows the same person). Caption 1 (pid 1): image 2 at position 2.
    # Caption 2 (pid 2): image 3 last of 4.
    expected = {
        "t2i_r1": 100 / 3,
        "t2i_r5": 100.0,
        "t2i_r10": 100.0,
        "t2i_mAP": 100 * ((1 + 2 / 3) / 2 + 1 / 2 + 1 / 4) / 3,
        "t2i_mINP": 100 * (2 / 3 + 1 / 2 + 1 / 4) / 3,
        # Image -> text, caption pids [0, 1, 2]: image 0 ranks its person's caption 0 first, image 1 second
        # (behind caption 1), image 2 its caption 1 second, image 3 its caption 2 last of 3; one relevant
        # caption each, so AP = INP = 1 / position.
        "i2t_r1": 100 / 4,
        "i2t_r5": 100.0,
        "i2t_r10": 100.0,
        "i2t_mAP": 100 * (1 + 1 / 2 + 1 / 2 + 1 / 3) / 4,
        "i2t_mINP": 100 * (1 + 1 / 2 + 1 / 2 + 1 / 3) / 4,
    }
    assert list(m) == [*KEYS, *I2T_KEYS] and m == pytest.approx(expected)
    direct = person_search_metrics(SCORES.t(), PIDS[TXT_TO_IMG], PIDS)
    assert {k: v for k, v in m.items() if k in KEYS} == pytest.approx({f"t2i_{k}": v for k, v in direct.items()})
    table = format_person_table(m).splitlines()
    assert table[1].startswith("t2i") and table[2].startswith("i2t") and f"{m['i2t_mAP']:8.2f}" in table[2]
    assert "R@1" in format_person_table(m) and f"{m['t2i_mAP']:8.2f}" in format_person_table(m)


def test_constant_scores_rank_relevant_images_last():
    m = evaluate_person_search(FixedScores(torch.zeros(4, 3)), fixed_data(), PIDS, torch.device("cpu"))
    assert m["t2i_r1"] == 0.0  # pessimistic ties: never a perfect score from a constant model
    assert m["t2i_mINP"] == pytest.approx(100 * (2 / 4 + 1 / 4 + 1 / 4) / 3)


def naive_kl(logits: list[list[float]], ids: list[int], eps: float = 1e-8) -> float:
    """mean_i sum_j p_ij (log p_ij - log(q_ij + eps)), p = softmax of row i, q = normalised same-id mask."""
    total = 0.0
    for i, row in enumerate(logits):
        z = sum(math.exp(v) for v in row)
        n_pos = sum(ids[j] == ids[i] for j in range(len(row)))
        for j, v in enumerate(row):
            p, q = math.exp(v) / z, (ids[j] == ids[i]) / n_pos
            total += p * (math.log(p) - math.log(q + eps))
    return total / len(logits)


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def unit(v: list[float]) -> list[float]:
    return [x / math.sqrt(dot(v, v)) for x in v]


def naive_cmpm(img, txt, ids):
    """CMPM: logits are raw features projected on the other modality's unit vectors."""
    img, txt = img.double().tolist(), txt.double().tolist()
    i2t = [[dot(a, unit(b)) for b in txt] for a in img]
    t2i = [[dot(a, unit(b)) for b in img] for a in txt]
    return naive_kl(i2t, ids) + naive_kl(t2i, ids)


def naive_sdm(img, txt, ids, tau):
    """SDM: logits are cosines / tau."""
    img, txt = img.double().tolist(), txt.double().tolist()
    i2t = [[dot(unit(a), unit(b)) / tau for b in txt] for a in img]
    t2i = [[dot(unit(a), unit(b)) / tau for b in img] for a in txt]
    return naive_kl(i2t, ids) + naive_kl(t2i, ids)


def test_cmpm_and_sdm_match_naive_loops():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(5, 4, generator=g) * 2, torch.randn(5, 4, generator=g)
    ids = [3, 7, 3, 1, 3]
    t_ids = torch.tensor(ids)
    assert CmpmLoss()(img, txt, t_ids).item() == pytest.approx(naive_cmpm(img, txt, ids), rel=1e-5)
    assert SdmLoss(0.1)(img, txt, t_ids).item() == pytest.approx(naive_sdm(img, txt, ids, 0.1), rel=1e-5)
    # Identities matter: treating every pair as its own identity gives another loss.
    assert SdmLoss(0.1)(img, txt, torch.arange(5)).item() != pytest.approx(naive_sdm(img, txt, ids, 0.1), rel=1e-3)


@pytest.mark.parametrize("loss", ["cmpm", "sdm"])
def test_tiny_tipcb_task_loss_is_global_plus_mean_part_loss(loss):
    torch.manual_seed(0)
    model = create_model("tiny_tipcb", vocab_size=50)
    task = build_task(model, LossConfig(identity=IdentityLossConfig(name=loss, temperature=0.5)))
    batch = {**tiny_batch(), "pid": torch.tensor([4, 4, 9, 2])}
    losses, logs = task.training_step(batch)
    assert list(losses) == [f"{loss}_loss"]
    with torch.no_grad():
        (img_g, img_p), (txt_g, txt_p) = model.image_features(batch), model.text_features(batch)
    ids = [4, 4, 9, 2]
    ref = naive_cmpm if loss == "cmpm" else lambda a, b, i: naive_sdm(a, b, i, 0.5)
    parts = [ref(img_p[:, k], txt_p[:, k], ids) for k in range(3)]
    assert logs["global_loss"] == pytest.approx(ref(img_g, txt_g, ids), rel=1e-4)
    assert losses[f"{loss}_loss"].item() == pytest.approx(ref(img_g, txt_g, ids) + sum(parts) / 3, rel=1e-4)
    # Without pids the images' own indices define relevance: image_idx [0, 1, 1, 2].
    _, logs = task.training_step(tiny_batch())
    assert logs["global_loss"] == pytest.approx(ref(img_g, txt_g, [0, 1, 1, 2]), rel=1e-4)


def test_tipcb_score_is_global_plus_mean_part_cosine():
    model = create_model("tiny_tipcb", vocab_size=50, num_parts=2).eval()
    batch = tiny_batch()
    with torch.no_grad():
        img, txt = model.encode_image_features(batch), model.encode_text_features(batch)
        scores = model.similarity(img, txt)
        (ig, ip), (tg, tp) = model.image_features(batch), model.text_features(batch)
    cos = nn.functional.cosine_similarity
    for i in range(4):
        for t in range(4):
            want = cos(ig[i], tg[t], dim=0) + (cos(ip[i, 0], tp[t, 0], dim=0) + cos(ip[i, 1], tp[t, 1], dim=0)) / 2
            assert scores[i, t].item() == pytest.approx(want.item(), abs=1e-5)
    assert img["parts"].shape == (4, 2, 16) and txt["parts"].shape == (4, 2, 16)


@pytest.mark.parametrize("loss", ["cmpm", "sdm"])
def test_tipcb_without_parts_scores_and_trains_on_its_global_feature_only(loss):
    torch.manual_seed(0)
    model = create_model("tiny_tipcb", vocab_size=50, num_parts=0)
    task = build_task(model, LossConfig(identity=IdentityLossConfig(name=loss, temperature=0.5)))
    batch = {**tiny_batch(), "pid": torch.tensor([4, 4, 9, 2])}
    losses, logs = task.training_step(batch)
    with torch.no_grad():
        (ig, ip), (tg, tp) = model.image_features(batch), model.text_features(batch)
    ref = naive_cmpm if loss == "cmpm" else lambda a, b, i: naive_sdm(a, b, i, 0.5)
    assert ip.shape == (4, 0, 16) and tp.shape == (4, 0, 16)
    assert logs["part_loss"] == 0.0
    assert losses[f"{loss}_loss"].item() == pytest.approx(ref(ig, tg, [4, 4, 9, 2]), rel=1e-4)
    with torch.no_grad():  # eval mode: the image tower's batch norm reads its running statistics
        model.eval()
        (ig, _), (tg, _) = model.image_features(batch), model.text_features(batch)
        scores = model.similarity(model.encode_image_features(batch), model.encode_text_features(batch))
    cos = nn.functional.cosine_similarity(ig[:, None], tg[None], dim=-1)  # (4, 4)
    torch.testing.assert_close(scores, cos, atol=1e-6, rtol=0)
    with pytest.raises(Exception, match="num_parts"):
        create_model("tiny_tipcb", vocab_size=50, num_parts=-1)


def pedes_records():
    words = ["red", "blue", "green", "black", "white"]
    records = []
    for pid in range(5):
        split = "train" if pid < 3 else "val"
        for k in range(2):
            caps = [f"a person in {words[pid]} with bag {k}", f"someone wearing {words[pid]}"]
            records.append((f"p{pid}/{k}.jpg", pid + 1, caps, split))
    return records  # train: 6 images, 12 captions, 3 ids; val: 4 images, 8 captions, 2 ids


@pytest.mark.slow
def test_tiny_tipcb_trains_through_the_cli_and_evaluates_by_identity(tmp_path):
    root = write_pedes(tmp_path / "CUHK-PEDES", "cuhk_pedes", pedes_records())
    run = tmp_path / "run"
    extra = ["data.num_workers=0", "data.min_word_freq=1", "model.name=tiny_tipcb", "model.pretrained=false",
             "train.epochs=1", "train.batch_size=4", "train.max_steps_per_epoch=2", "train.warmup_steps=0",
             "eval.batch_size=8"]  # fmt: skip
    assert main(train_args(root, run, *extra, config="configs/tipcb_cuhk.yaml")) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("split") == "val" and "t2i_r1" in r for r in rows)
    assert any("sdm_loss" in r for r in rows)  # the model's own task (SDM by default) trained it
    assert (run / "checkpoints" / "best.pt").is_file()

    model, cfg, tokenizer = load_run(run / "checkpoints" / "best.pt")
    ds = open_split(cfg, "val")
    pids = image_pids(ds)
    assert pids.tolist() == [4, 4, 5, 5]
    m = evaluate_person_search(model, build_eval_data(cfg, ds, tokenizer, model), pids, torch.device("cpu"))
    assert list(m) == [*KEYS, *I2T_KEYS] and all(0 <= v <= 100 for v in m.values())
    data = build_eval_data(cfg, ds, tokenizer, model)  # reference: one batch of everything, scored directly
    with torch.no_grad():
        img = model.encode_image_features(next(iter(build_eval_loader(data.image_loader.dataset, 100))))
        txt = model.encode_text_features(next(iter(build_eval_loader(data.text_loader.dataset, 100))))
        scores = model.similarity(img, txt)  # (4, 8)
    chunked = compute_scores(model, data, torch.device("cpu"))  # what the evaluation ranks
    # batches of 8 vs one batch of everything: the same scores up to float32 rounding of BLAS kernels
    torch.testing.assert_close(chunked, scores)
    caption_pids = torch.tensor([4, 4, 4, 4, 5, 5, 5, 5])  # captions follow their images in file order
    # metrics compared on the evaluated matrix: a near-tie could flip between the two roundings above
    direct = person_search_metrics(chunked.t(), caption_pids, torch.tensor([4, 4, 5, 5]))
    back = person_search_metrics(chunked, torch.tensor([4, 4, 5, 5]), caption_pids)  # images query captions
    assert m == pytest.approx(
        {**{f"t2i_{k}": v for k, v in direct.items()}, **{f"i2t_{k}": v for k, v in back.items()}}
    )
