"""open_clip's contract on every model (models/protocols.py): a loop written exactly as open_clip-based tools
write it ranks a split as `crossmatch evaluate` does; tokenizer, encode_*, forward and logit_scale as open_clip
returns them; sentence-transformers' encode; crossmatch.score per direction; deep copies."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import crossmatch
from crossmatch.cli.main import main
from crossmatch.config import LossConfig, config_to_dict
from crossmatch.engine.checkpoint import atomic_save
from crossmatch.errors import DataError, ModelError
from crossmatch.models.protocols import ClipLike, FeatureEncoder, PairScorer, SavesPretrained, SentenceEncoder
from crossmatch.runs import build_untrained_run


def untrained_checkpoint(root: Path, path: Path, name: str, *overrides: str) -> Path:
    """A checkpoint of model `name` with seeded random weights and its run's tokenizer (no training)."""
    torch.manual_seed(0)
    model, cfg, tok = build_untrained_run(name, str(root), ["data.image_size=32", *overrides])
    atomic_save({"model": model.state_dict(), "config": config_to_dict(cfg), "tokenizer": tok.to_str()}, path)
    return path


def open_clip_recalls(run: Path, root: Path, split: str) -> dict[str, float]:
    """R@1/5/10 of a split computed as open_clip-based retrieval benchmarks do."""
    model, preprocess = crossmatch.create_model_from_pretrained(str(run))
    tokenizer = crossmatch.get_tokenizer(str(run))
    dev = "cpu"
    entries = [e for e in json.loads((root / "dataset.json").read_text())["images"] if e["split"] == split]
    images = torch.stack([preprocess(Image.open(root / "images" / e["filename"])) for e in entries])  # (N, 3, S, S)
    texts = [s["raw"] for e in entries for s in e["sentences"]]
    txt_to_img = torch.tensor([i for i, e in enumerate(entries) for _ in e["sentences"]])  # (M,)
    with torch.no_grad():
        image_features = F.normalize(model.encode_image(images.to(dev)), dim=-1)  # (N, E)
        text_features = F.normalize(model.encode_text(tokenizer(texts).to(dev)), dim=-1)  # (M, E)
    scores = text_features @ image_features.T  # (M, N)
    assert scores.flatten().unique().numel() == scores.numel(), "ties would make the ranking arbitrary"
    out = {}
    for k in (1, 5, 10):
        top_images = scores.topk(k, dim=1).indices  # (M, k)
        out[f"t2i_r{k}"] = 100.0 * (top_images == txt_to_img[:, None]).any(1).float().mean().item()
        top_texts = scores.T.topk(k, dim=1).indices  # (N, k): any caption of the image in the top k
        hit = (txt_to_img[top_texts] == torch.arange(len(entries))[:, None]).any(1)
        out[f"i2t_r{k}"] = 100.0 * hit.float().mean().item()
    return out


@pytest.mark.parametrize("name", ["tiny_vse", "tiny_clip"])
def test_an_open_clip_style_loop_gives_the_recalls_of_crossmatch_evaluate(shapes_root, tmp_path, name):
    ckpt = untrained_checkpoint(shapes_root, tmp_path / f"{name}.pt", name)
    assert main(["evaluate", str(ckpt), "--split", "test", "--json", str(tmp_path / "m.json")]) == 0
    expected = json.loads((tmp_path / "m.json").read_text())
    got = open_clip_recalls(ckpt, shapes_root, "test")
    assert got == pytest.approx({k: expected[k] for k in got}, abs=1e-3)  # the JSON rounds to 4 decimals
    assert len(set(got.values())) > 1  # not a degenerate ranking


@pytest.mark.parametrize("name", sorted(crossmatch.list_models("tiny")))
def test_every_tiny_model_has_the_tensor_face(name):
    torch.manual_seed(0)
    model = crossmatch.create_model(name, data_defaults={"vocab_size": 50, "image_size": 32}).eval()
    assert isinstance(model, ClipLike) and isinstance(model, FeatureEncoder)
    assert isinstance(model, SentenceEncoder) and isinstance(model, SavesPretrained)
    images, tokens = torch.randn(3, 3, 32, 32), torch.tensor([[7, 8, 9], [10, 11, 0], [12, 0, 0]])  # (3, 3) 0-padded
    with torch.no_grad():
        img, txt = model.encode_image(images), model.encode_text(tokens)  # (3, E), (3, E)
        feats = model.encode_text_features({"input_ids": tokens, "attention_mask": tokens != 0})
        out = model(images, tokens)
    assert img.shape == txt.shape and img.ndim == 2 and img.shape[0] == 3
    torch.testing.assert_close(txt, model.text_embedding(feats))  # masks derived from the padding
    assert len(out) == 3 and torch.equal(out[2], model.logit_scale.exp())
    torch.testing.assert_close(out[0], F.normalize(img, dim=-1))
    with torch.no_grad():  # one caption alone, unpadded, embeds as it does in a padded batch
        alone = model.encode_text(tokens[2:, :1])
    torch.testing.assert_close(alone, txt[2:], rtol=1e-5, atol=1e-6)  # batch shape: last-bit differences only


def test_logit_scale_is_the_contrastive_tasks_and_siglip_adds_logit_bias(tmp_path):
    from crossmatch.tasks import build_task

    hinge = crossmatch.create_model("tiny_vse", vocab_size=20)
    assert hinge.logit_scale.item() == 0.0 and hinge.logit_bias is None  # log 1: no learned scale
    model = crossmatch.create_model("tiny_vse", vocab_size=20)
    task = build_task(model, LossConfig(name="siglip", init_logit_scale=2.0))
    assert model.logit_scale is task.logit_scale and model.logit_bias is task.logit_bias  # one tensor, two owners
    assert model.state_dict()["logit_scale"].item() == 2.0 and model.state_dict()["logit_bias"].item() == -10.0
    assert set(task.loss_state_dict()) == {"logit_scale", "logit_bias"}  # checkpoints keep their 0.1.0 layout
    assert sum(p is task.logit_scale for p in task.parameters()) == 1  # the optimiser sees it once
    fresh = crossmatch.create_model("tiny_vse", vocab_size=20)
    fresh.load_state_dict(model.state_dict())  # an eval-time rebuild gets the bias slot from the weights
    out = fresh(torch.zeros(2, 3, 32, 32), torch.tensor([[5, 6], [7, 0]]))
    assert len(out) == 4 and out[2].item() == pytest.approx(np.exp(2.0)) and out[3].item() == -10.0


def test_a_legacy_checkpoint_takes_its_learned_scale_from_the_loss_entry(tmp_path):
    state = {"model": crossmatch.create_model("tiny_vse", vocab_size=20).state_dict()}
    legacy = tmp_path / "legacy.pt"
    from crossmatch.config import load_config
    from crossmatch.data.tokenizer import CaptionTokenizer

    tok = CaptionTokenizer.train(["a red circle", "a blue square"])
    cfg = load_config(None, ["model.name=tiny_vse", "data.image_size=32", f"model.vocab_size={tok.vocab_size}"])
    weights = crossmatch.create_model("tiny_vse", vocab_size=tok.vocab_size).state_dict()
    del weights["logit_scale"]  # 0.1.0 kept it outside the model
    state = {"model": weights, "config": config_to_dict(cfg), "tokenizer": tok.to_str()}
    atomic_save({**state, "loss": {"logit_scale": torch.tensor(3.5)}}, legacy)
    assert crossmatch.load(legacy).logit_scale.item() == 3.5


def test_tokenizer_returns_a_padded_long_tensor_and_a_word_vocabulary_name_asks_for_the_run(shapes_root, tmp_path):
    ckpt = untrained_checkpoint(shapes_root, tmp_path / "vse.pt", "tiny_vse")
    tokenizer = crossmatch.get_tokenizer(str(ckpt))
    ids = tokenizer(["a red circle", "circle"])
    assert ids.dtype == torch.long and ids.shape == (2, 3) and ids[1, 1:].tolist() == [0, 0]
    assert torch.equal(tokenizer("circle"), ids[1:, :1])
    clip_ids = crossmatch.get_tokenizer("tiny_clip")(["a red circle"])
    assert clip_ids[0, 0].item() == 49406 and clip_ids[0, -1].item() == 49407  # [SOT] words [EOT]
    with pytest.raises(ModelError, match=r"learns its vocabulary .* run folder"):
        crossmatch.get_tokenizer("tiny_vse")


def test_create_model_and_transforms_returns_open_clips_triple(shapes_root, tmp_path):
    ckpt = untrained_checkpoint(shapes_root, tmp_path / "vse.pt", "tiny_vse")
    model, preprocess_train, preprocess_val = crossmatch.create_model_and_transforms(str(ckpt))
    photo = Image.new("RGB", (40, 30), (200, 30, 30))
    assert preprocess_val(photo).shape == preprocess_train(photo).shape == (3, 32, 32)
    assert not model.training and crossmatch.from_pretrained is crossmatch.load
    half, _, _ = crossmatch.create_model_and_transforms(str(ckpt), precision="bf16")
    assert next(half.parameters()).dtype == torch.bfloat16 and half.encode([photo]).dtype == np.float32
    clip, _, pp = crossmatch.create_model_and_transforms("tiny_clip", overrides=["data.resize=letterbox"])
    assert pp["resize"] == "letterbox" and clip.encode_image(pp(photo)[None]).shape == (1, 32)
    with pytest.raises(ModelError, match="precision='fp8'"):
        crossmatch.create_model_and_transforms(str(ckpt), precision="fp8")


def test_encode_follows_sentence_transformers(shapes_root, tmp_path):
    model = crossmatch.load(untrained_checkpoint(shapes_root, tmp_path / "vse.pt", "tiny_vse"))
    texts = ["a red circle", "a blue square", "a green star"]
    arr = model.encode(texts, batch_size=2)
    assert isinstance(arr, np.ndarray) and arr.dtype == np.float32 and arr.shape == (3, 16)
    ref = model.encode_text(model.tokenizer(texts)).detach().numpy()
    np.testing.assert_allclose(arr, ref, rtol=1e-5, atol=1e-6)  # batches of 2 vs 3: last bits only
    assert model.encode("a red circle").shape == (16,)
    t = model.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    assert isinstance(t, torch.Tensor) and torch.allclose(t.norm(dim=-1), torch.ones(3))
    listed = model.encode(texts, convert_to_numpy=False)
    assert isinstance(listed, list) and len(listed) == 3 and listed[0].shape == (16,)
    path = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    by_path, by_pil = model.encode([path]), model.encode([Image.open(path)])
    np.testing.assert_array_equal(by_path, by_pil)
    with pytest.raises(DataError, match="one kind per call"):
        model.encode(["a caption", path])


def test_a_deep_copy_embeds_with_its_own_weights(shapes_root, tmp_path):
    model = crossmatch.load(untrained_checkpoint(shapes_root, tmp_path / "vse.pt", "tiny_vse"))
    before = model.encode(["a red circle"])
    twin = copy.deepcopy(model)
    with torch.no_grad():
        model.text_proj.weight.zero_()
        model.text_proj.bias.zero_()
    np.testing.assert_array_equal(twin.encode(["a red circle"]), before)
    assert not np.allclose(model.encode(["a red circle"]), before)


def test_score_equals_the_evaluators_matrix_for_each_direction(shapes_root, tmp_path):
    """ALBEF re-ranks each direction's top-k: the metrics of score(i2t) / score(t2i) are `crossmatch evaluate`'s."""
    from crossmatch.retrieval.evaluate import split_metrics

    ckpt = untrained_checkpoint(shapes_root, tmp_path / "albef.pt", "tiny_albef", "eval.rerank_k=3")
    assert main(["evaluate", str(ckpt), "--split", "test", "--json", str(tmp_path / "m.json")]) == 0
    expected = json.loads((tmp_path / "m.json").read_text())
    model = crossmatch.load(ckpt)
    entries = [e for e in json.loads((shapes_root / "dataset.json").read_text())["images"] if e["split"] == "test"]
    images = [shapes_root / "images" / e["filename"] for e in entries]
    texts = [s["raw"] for e in entries for s in e["sentences"]]
    t2i = torch.tensor([i for i, e in enumerate(entries) for _ in e["sentences"]])
    s_i2t, s_t2i = (crossmatch.score(model, images, texts, direction=d) for d in ("i2t", "t2i"))
    assert not torch.equal(s_i2t, s_t2i)  # the two directions re-rank different candidates
    got = split_metrics(s_i2t, s_t2i, t2i)
    assert got == pytest.approx({k: expected[k] for k in got}, abs=1e-3)
    stage1 = crossmatch.score(model, images, texts, rerank_k=0)  # the ITC first stage: open_clip's dot product
    with torch.no_grad():
        pixels = torch.stack([model.preprocess(p) for p in images])
        itc = model.encode_image(pixels) @ model.encode_text(model.tokenizer(texts)).T  # (N, M)
    torch.testing.assert_close(stage1, itc, rtol=1e-5, atol=1e-6)  # batch shapes differ: last bits only
    with pytest.raises(ModelError, match="direction='both'"):
        crossmatch.score(model, images, texts, direction="both")


def test_scan_documents_a_pooled_first_stage_embedding():
    model = crossmatch.create_model("tiny_scan", vocab_size=20).eval()
    tokens = torch.tensor([[5, 6, 0]])
    with torch.no_grad():
        words = model.encode_text_features({"input_ids": tokens, "attention_mask": tokens != 0})["words"]
        torch.testing.assert_close(model.encode_text(tokens), words[:, :2].mean(1))  # real words only
    assert not isinstance(model, PairScorer)
