"""IRRA's objective (tasks/irra.py) and the shared BERT masking (tasks/masking.py): only real tokens are
masked, the 80/10/10 split, the masked-token loss against a hand loop, the task's loss terms, and a tall-image
run of the people data through the CLI: train, evaluate, export, save_pretrained."""

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("open_clip")

from crossmatch.config import LossConfig  # noqa: E402
from crossmatch.errors import ConfigError  # noqa: E402
from crossmatch.models import create_model  # noqa: E402
from crossmatch.tasks import build_task  # noqa: E402
from crossmatch.tasks.irra import mask_caption, maskable_tokens  # noqa: E402
from crossmatch.tasks.masking import IGNORE, masked_token_loss  # noqa: E402

SOT, EOT, MASK = 49406, 49407, 49405


def captions(lengths: list[int], L: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) CLIP-style ids [SOT] words [EOT] then 0-padding, and the mask, for captions of `lengths` tokens."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]  # (B, L)
    ids = torch.randint(1, MASK, (B, L), generator=g) * mask
    for b, n in enumerate(lengths):
        ids[b, 0], ids[b, n - 1] = SOT, EOT
    return ids, mask


def test_only_the_words_between_sot_and_eot_are_maskable():
    _, mask = captions([5, 3, 2, 1], 6)
    expected = torch.tensor(
        [[0, 1, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool
    )
    assert torch.equal(maskable_tokens(mask), expected)
    ids, mask = captions([5, 3, 2, 1], 6)
    torch.manual_seed(0)
    masked, labels = mask_caption(ids, mask, MASK, prob=1.0)  # every maskable token chosen
    assert torch.equal(labels != IGNORE, expected) and torch.equal(labels[expected], ids[expected])
    assert torch.equal(masked[~expected], ids[~expected])  # pad, SOT and EOT never change


def test_the_80_10_10_split_on_a_large_sample():
    ids, mask = captions([40] * 5000, 48, seed=1)  # 5000 x 38 = 190,000 maskable words
    torch.manual_seed(1)
    masked, labels = mask_caption(ids, mask, MASK, prob=0.15)
    maskable = maskable_tokens(mask)
    chosen = labels != IGNORE
    assert not (chosen & ~maskable).any()
    n_maskable, n = int(maskable.sum()), int(chosen.sum())
    to_mask = (masked[chosen] == MASK).float().mean().item()
    kept = (masked[chosen] == ids[chosen]).float().mean().item()
    swapped = 1 - to_mask - kept  # random ids in [1, MASK): equal to the original 1 time in 49,404 only
    # Binomial standard errors: chosen share sqrt(.15 * .85 / 190k) = 0.0008; of n ~ 28,500 chosen,
    # 0.8 -> 0.0024 and 0.1 -> 0.0018. Tolerances are about 5 of them: a wrong split (e.g. 90/5/5) is far out.
    assert abs(n / n_maskable - 0.15) < 0.004
    assert abs(to_mask - 0.8) < 0.012 and abs(swapped - 0.1) < 0.009 and abs(kept - 0.1) < 0.009
    assert not (masked[chosen & (masked != MASK)] >= MASK).any()  # random ids never special


def test_the_masked_token_loss_is_cross_entropy_at_the_masked_positions_only():
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 7)
    feats = torch.randn(2, 3, 4)
    labels = torch.tensor([[IGNORE, 5, IGNORE], [2, IGNORE, 6]])
    total, count = 0.0, 0
    for b in range(2):
        for i in range(3):
            if labels[b, i] != IGNORE:
                total = total - F.log_softmax(head(feats[b, i]), dim=-1)[labels[b, i]]
                count += 1
    torch.testing.assert_close(masked_token_loss(head, feats, labels), total / count)
    none = masked_token_loss(head, feats, torch.full((2, 3), IGNORE))
    none.backward()
    assert none.item() == 0.0 and head.weight.grad is not None  # nothing drawn: zero, still on the graph


def irra_batch(B=4, seed=0):
    ids, mask = captions([7, 5, 6, 4][:B], 7, seed)
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(B, 3, 64, 24, generator=g), "input_ids": ids, "attention_mask": mask,
            "image_idx": torch.arange(B), "pid": torch.tensor([0, 0, 1, 2][:B])}  # fmt: skip


def test_the_task_logs_sdm_and_weighted_mlm_terms():
    from crossmatch.losses.identity import SdmLoss

    torch.manual_seed(0)
    model = create_model("tiny_irra", data_defaults={"image_size": [64, 24]})
    batch = irra_batch()
    terms = {}
    for weight in (1.0, 2.5):
        cfg = LossConfig(name="sdm")
        cfg.identity.mlm_weight = weight
        task = build_task(model, cfg)
        torch.manual_seed(5)  # the same masks
        terms[weight], _ = task.training_step(batch)
    assert set(terms[1.0]) == {"sdm_loss", "mlm_loss"}
    torch.testing.assert_close(terms[2.5]["mlm_loss"], 2.5 * terms[1.0]["mlm_loss"])
    img = model.encode_image_features(batch)["embed"]
    txt = model.encode_text_features(batch)["embed"]
    torch.testing.assert_close(terms[1.0]["sdm_loss"], SdmLoss(0.02)(img, txt, batch["pid"]))  # by pid
    bad = LossConfig(name="sdm")
    bad.identity.name = "cmpm"
    with pytest.raises(ConfigError, match="irra trains with sdm"):
        build_task(model, bad)


def test_the_id_term_is_the_shared_identity_classifier_on_both_embeddings():
    from crossmatch.losses.identity import IdentityClassifierLoss

    torch.manual_seed(0)
    model = create_model("tiny_irra", data_defaults={"image_size": [64, 24]})
    batch = irra_batch()
    cfg = LossConfig(name="sdm")
    cfg.identity.id_weight = 0.5
    task = build_task(model, cfg)
    task.use_identities(batch["pid"].tolist())
    terms, _ = task.training_step(batch)
    assert set(terms) == {"sdm_loss", "id_loss", "mlm_loss"}
    img = model.encode_image_features(batch)["embed"]
    txt = model.encode_text_features(batch)["embed"]
    classifier = IdentityClassifierLoss(batch["pid"].tolist(), img.shape[1])
    classifier.load_state_dict(task.id_loss.state_dict())
    torch.testing.assert_close(terms["id_loss"], 0.5 * classifier(img, txt, batch["pid"]))
    assert not any(k.startswith("id_loss") for k in model.state_dict())  # training-only: in the task


@pytest.mark.slow
def test_a_tall_people_run_trains_evaluates_exports_and_saves_without_the_training_modules(tmp_path):
    from safetensors.torch import load_file

    import crossmatch
    from crossmatch.cli.main import main

    data, run = tmp_path / "people", tmp_path / "run"
    assert main(["data", "people", "--out", str(data), "--train", "6", "--val", "2", "--test", "2"]) == 0
    args = ["train", "configs/people_irra_tiny.yaml", "--run-dir", str(run), f"data.root={data}",
            "data.num_workers=0", "train.batch_size=8", "train.epochs=1", "train.max_steps_per_epoch=1",
            "train.warmup_steps=0", "eval.batch_size=16"]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("mlm_loss" in r for r in rows) and any("sdm_loss" in r for r in rows)
    report = tmp_path / "test.json"
    assert main(["evaluate", str(run / "checkpoints" / "best.pt"), "--json", str(report)]) == 0
    assert "t2i_r1" in json.loads(report.read_text())

    model = crossmatch.load(run / "checkpoints" / "best.pt")  # the checkpoint keeps the cross-modal encoder ...
    assert model.clip.visual.grid_size == (16, 6) and model.training_only_keys()
    folder = model.save_pretrained(tmp_path / "hf")
    saved = load_file(str(folder / "model.safetensors"))  # ... save_pretrained leaves it out
    assert not set(saved) & set(model.training_only_keys())
    assert set(saved) | set(model.training_only_keys()) == set(model.state_dict())
    again = crossmatch.from_pretrained(folder)
    texts = ["a woman in a red coat", "a man with a black bag"]
    torch.testing.assert_close(again.encode(texts, convert_to_tensor=True), model.encode(texts, convert_to_tensor=True))

    pytest.importorskip("onnxruntime")
    from crossmatch.cli.export import run_export

    best = run / "checkpoints" / "best.pt"
    info = run_export(str(best), str(tmp_path / "onnx"))  # the dual-encoder towers at 128 x 48
    assert max(info["parity"]["max_abs_diff"].values()) <= 1e-4
