"""Training pretrained towers: unfreezing the last blocks / layers, the towers' own lr with layer-wise
decay, and the float16 disk cache of what stays frozen. The towers are the real architectures (EfficientNet-Lite0,
MiniLM-L6) randomly initialised (`pretrained=False`), on 32-64 px inputs."""

import logging

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("timm")

from crossmatch.config import LossConfig, TrainConfig  # noqa: E402
from crossmatch.data.transforms import build_image_transform  # noqa: E402
from crossmatch.engine.optim import create_optimizer  # noqa: E402
from crossmatch.errors import ConfigError, ModelError  # noqa: E402
from crossmatch.models.frozen_cache import DiskOutputCache, input_key  # noqa: E402
from crossmatch.models.pretrained import PretrainedDualConfig, PretrainedDualEncoder  # noqa: E402
from crossmatch.tasks import build_task  # noqa: E402

IDS = torch.tensor([[101, 7592, 2088, 102, 0, 0], [101, 2088, 2003, 1037, 3899, 102], [101, 3899, 102, 0, 0, 0]])


def model_of(**kw) -> PretrainedDualEncoder:
    torch.manual_seed(0)
    return PretrainedDualEncoder(PretrainedDualConfig(pretrained=False, embed_dim=8, **kw))


def batch_of(n: int = 3, side: int = 32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = IDS[:n]
    image = torch.randn(n, 3, side, side, generator=g)
    return {"image": image, "input_ids": ids, "attention_mask": ids != 0, "image_idx": torch.arange(n)}


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# --- unfreezing ----------------------------------------------------------------------------------------------


def test_unfreezing_makes_exactly_the_last_blocks_and_layers_trainable():
    model = model_of(unfreeze_image_blocks=2, unfreeze_text_layers=1)
    names = trainable(model)
    # Lite0's 16 blocks are stages (1, 2, 2, 3, 3, 4, 1): the last two are blocks.5.3 and blocks.6.0; then its head
    image = {n.removeprefix("image_tower.body.") for n in names if n.startswith("image_tower.")}
    assert {n.split(".")[0] if not n.startswith("blocks") else ".".join(n.split(".")[:3]) for n in image} == {
        "blocks.5.3",
        "blocks.6.0",
        "conv_head",
        "bn2",
    }
    all_image = {n for n, _ in model.image_tower.body.named_parameters()}
    expected = {n for n in all_image if n.startswith(("blocks.5.3.", "blocks.6.0.", "conv_head.", "bn2."))}
    assert image == expected
    text = {n.removeprefix("text_tower.model.") for n in names if n.startswith("text_tower.")}
    expected_text = {n for n, _ in model.text_tower.model.named_parameters() if n.startswith("encoder.layer.5.")}
    assert text == expected_text and expected_text  # not the pooler (unused), not layer 4, not the embeddings
    assert names - {"image_tower.body." + n for n in image} - {"text_tower.model." + n for n in text} == {
        "image_proj.weight",
        "image_proj.bias",
        "text_proj.weight",
        "text_proj.bias",
    }
    assert trainable(model_of()) == {"image_proj.weight", "image_proj.bias", "text_proj.weight", "text_proj.bias"}


def test_unfreezing_rejects_impossible_counts():
    with pytest.raises(ModelError, match="unfreeze_image_blocks=17: the tower has 16 blocks"):
        model_of(unfreeze_image_blocks=17)
    with pytest.raises(ModelError, match="unfreeze_text_layers needs model.freeze_text=true"):
        model_of(unfreeze_text_layers=1, freeze_text=False)


def test_a_train_step_leaves_frozen_batchnorm_statistics_and_weights_alone():
    model = model_of(unfreeze_image_blocks=1, unfreeze_text_layers=1)
    task = build_task(model, LossConfig(name="infonce"))
    task.train()
    body = model.image_tower.body
    frozen_bn, free_bn = body.blocks[5][3].bn1, body.blocks[6][0].bn1  # the last frozen block, the trainable one
    assert not frozen_bn.training and free_bn.training and not body.bn1.training
    assert not model.text_tower.model.encoder.layer[4].training and model.text_tower.model.encoder.layer[5].training
    before = {k: v.clone() for k, v in model.state_dict().items() if "blocks.5.3" in k or "layer.4." in k}
    free_mean = free_bn.running_mean.clone()
    opt = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.1)
    losses, _ = task.training_step(batch_of(3, 64))
    sum(losses.values()).backward()
    opt.step()
    after = model.state_dict()
    for k, v in before.items():  # weights and running_mean / running_var / num_batches_tracked
        assert torch.equal(v, after[k]), k
    assert not torch.equal(free_mean, free_bn.running_mean)  # the trainable block's BN did update: the test can fail


def test_the_split_forward_is_the_full_forward():
    model = model_of(unfreeze_image_blocks=3, unfreeze_text_layers=2).eval()
    b = batch_of(3, 64)
    with torch.no_grad():
        full = model.image_tower(b["image"])  # (3, 1280)
        split = model.image_tower.run_suffix(model.image_tower.run_prefix(b["image"]))
        tokens, sentence = model.text_tower(b["input_ids"], b["attention_mask"])  # (3, 6, 384), (3, 384)
        hidden = model.text_tower.run_prefix(b["input_ids"], b["attention_mask"])
        tokens2, sentence2 = model.text_tower.run_suffix(hidden, b["attention_mask"])
    torch.testing.assert_close(split, full, rtol=0, atol=0)  # the same modules in the same order
    # the same layers through the same mask; the reference runs inside BertModel.forward: equal up to rounding
    torch.testing.assert_close(sentence2, sentence, rtol=1e-5, atol=1e-5)


# --- tower lr and layer decay --------------------------------------------------------------------------------


def test_tower_lr_and_layer_decay_give_hand_computed_group_lrs():
    model = model_of(unfreeze_image_blocks=2, unfreeze_text_layers=1)
    task = build_task(model, LossConfig(name="infonce"))
    opt = create_optimizer(task, TrainConfig(lr=1e-3, tower_lr=1e-4, layer_decay=0.5))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(task.named_parameters())

    def lr(name: str) -> float:
        return lr_of[id(named["model." + name if name != "logit_scale" else name])]

    # image tower: 16 blocks, top depth 17; block k (1-based) has depth k: lr = 1e-4 * 0.5 ** (17 - k)
    assert lr("image_tower.body.conv_head.weight") == pytest.approx(1e-4)  # depth 17
    assert lr("image_tower.body.blocks.6.0.conv_pw.weight") == pytest.approx(5e-5)  # block 16
    assert lr("image_tower.body.blocks.5.3.conv_pw.weight") == pytest.approx(2.5e-5)  # block 15
    # text tower: 6 layers, top depth 7; layer 5 (0-based) has depth 6: 1e-4 * 0.5
    assert lr("text_tower.model.encoder.layer.5.output.dense.weight") == pytest.approx(5e-5)
    assert lr("image_proj.weight") == lr("text_proj.bias") == lr("logit_scale") == 1e-3  # heads: train.lr
    assert len(lr_of) == sum(p.requires_grad for p in task.parameters())
    assert {g["weight_decay"] for g in opt.param_groups[:2]} == {0.0}
    # tower_lr without decay: every tower parameter at 1e-4
    opt = create_optimizer(task, TrainConfig(lr=1e-3, tower_lr=1e-4))
    lrs = {g["lr"] for g in opt.param_groups if g["params"]}
    assert lrs == {1e-3, 1e-4}


def test_tower_lr_needs_a_model_with_towers():
    from crossmatch.models.registry import create_model

    task = build_task(create_model("tiny_vse", vocab_size=9), LossConfig())
    with pytest.raises(ConfigError, match="train.tower_lr: .* has no pretrained towers"):
        create_optimizer(task, TrainConfig(tower_lr=1e-4))


# --- the disk cache ------------------------------------------------------------------------------------------


def cached_model(tmp_path, **kw) -> PretrainedDualEncoder:
    model = model_of(cache_frozen=True, **kw)
    model.use_cache_dir(tmp_path / "cache")
    return model


@pytest.mark.parametrize("unfrozen", [0, 1])
def test_a_cached_epoch_gives_the_uncached_loss_to_float16_tolerance(tmp_path, unfrozen):
    model = cached_model(tmp_path, unfreeze_image_blocks=unfrozen, unfreeze_text_layers=unfrozen)
    task = build_task(model, LossConfig(name="infonce")).eval()  # eval: the unfrozen blocks without dropout
    b = batch_of(3, 64)
    calls = []
    model.image_tower.body.conv_stem.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        first = task.training_step(b)[0]["infonce_loss"]  # computes and stores
        second = task.training_step(b)[0]["infonce_loss"]  # reads the rows back
        model.config.cache_frozen = False
        plain = task.training_step(b)[0]["infonce_loss"]
    assert calls == [1, 1]  # the stem ran for the first pass and the uncached one, not for the cached one
    assert model.image_cache.hits == 3 and model.text_cache.hits == 3
    assert torch.equal(first, second)  # both read float16-rounded values: equality is real
    # the cached towers' outputs carry float16's relative rounding error (<= 2 ** -11 ~ 4.9e-4 each); through the
    # linear projection, the l2 normalisation and a 3 x 3 softmax (scale 14.3) the loss moves by well under 1e-2
    torch.testing.assert_close(first, plain, rtol=1e-2, atol=1e-3)
    assert (first - plain).abs() > 0 or unfrozen == 0  # (the rounding is there when prefix states are cached)


def test_changing_the_preprocessing_misses_the_cache_and_computes_afresh(tmp_path):
    model = cached_model(tmp_path).eval()
    image = torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    lite0 = build_image_transform(32, train=False, mean=[0.5] * 3, std=[0.5] * 3, resize="letterbox")
    imagenet = build_image_transform(32, train=False, resize="letterbox")  # ImageNet mean/std
    bigger = build_image_transform(40, train=False, mean=[0.5] * 3, std=[0.5] * 3, resize="letterbox")
    with torch.no_grad():
        for t in (lite0, imagenet, bigger, lite0):
            model.encode_image_features({"image": t(image)[None]})
        model.config.cache_frozen = False
        plain = model.encode_image_features({"image": imagenet(image)[None]})["embed"]
        model.config.cache_frozen = True
        cached = model.encode_image_features({"image": imagenet(image)[None]})["embed"]
    assert (model.image_cache.misses, model.image_cache.hits) == (3, 2)  # only the repeated lite0 input hit
    torch.testing.assert_close(cached, plain, rtol=2e-3, atol=2e-3)  # float16-rounded pooled features (see above)


def test_a_new_process_reads_the_rows_a_previous_one_wrote(tmp_path):
    b = batch_of()
    with torch.no_grad():
        first = cached_model(tmp_path).eval().encode_image_features(b)["embed"]
        again = cached_model(tmp_path).eval()
        second = again.encode_image_features(b)["embed"]
    assert again.image_cache.hits == 3 and again.image_cache.misses == 0
    assert torch.equal(first, second)


def _rows(root, keys, values, compute_calls):
    cache = DiskOutputCache(root, {"tower": "t"})

    def compute(rows):
        compute_calls.append(list(rows))
        return [values[i] for i in rows]

    return cache, cache.rows(keys, compute)


@pytest.mark.parametrize("damage", ["truncate", "flip", "index", "extra"])
def test_a_damaged_cache_is_detected_and_rebuilt(tmp_path, caplog, damage):
    values = [torch.arange(6, dtype=torch.float32).reshape(2, 3) + i for i in range(3)]  # exact in float16
    keys = [input_key(v) for v in values]
    calls = []
    cache, _ = _rows(tmp_path, keys, values, calls)
    rows = cache.rows_path.read_bytes()
    if damage == "truncate":
        cache.rows_path.write_bytes(rows[:-2])
    elif damage == "flip":
        cache.rows_path.write_bytes(rows[:10] + bytes([rows[10] ^ 0x40]) + rows[11:])
    elif damage == "index":
        cache.index_path.write_text("{not json")
    else:  # rows appended by a run killed before it wrote the index: harmless, cut off
        cache.rows_path.write_bytes(rows + b"\x00" * 8)
    with caplog.at_level(logging.WARNING, logger="crossmatch.models.frozen_cache"):
        cache2, out = _rows(tmp_path, keys, values, calls)
    for got, want in zip(out, values, strict=True):
        assert torch.equal(got, want)
    if damage == "extra":
        assert calls == [[0, 1, 2]] and not caplog.records and cache2.rows_path.stat().st_size == len(rows)
    else:
        assert calls == [[0, 1, 2], [0, 1, 2]]  # everything recomputed, nothing read from the damaged file
        assert "rebuilding it" in caplog.text
        assert DiskOutputCache(tmp_path, {"tower": "t"}).rows(keys, lambda r: 1 / 0)  # the rebuilt cache is whole


def test_another_unfreezing_or_other_weights_use_another_cache_folder(tmp_path):
    a = cached_model(tmp_path).eval()
    b = cached_model(tmp_path, unfreeze_image_blocks=1).eval()
    with torch.no_grad():
        a.encode_image_features(batch_of(1, 64))
        b.encode_image_features(batch_of(1, 64))
        torch.nn.init.zeros_(b.image_tower.body.conv_stem.weight)  # other frozen weights (e.g. another checkpoint)
        c = cached_model(tmp_path, unfreeze_image_blocks=1).eval()
        c.image_tower.load_state_dict(b.image_tower.state_dict())
        c.encode_image_features(batch_of(1, 64))
    folders = {a.image_cache.folder, b.image_cache.folder, c.image_cache.folder}
    assert len(folders) == 3 and c.image_cache.hits == 0


def test_a_named_cache_dir_is_used_outside_a_run_too(tmp_path):
    model = model_of(cache_frozen=True, cache_dir=str(tmp_path / "shared")).eval()
    with torch.no_grad():
        model.encode_image_features(batch_of())
        model.encode_text_features(batch_of())
    assert isinstance(model.image_cache, DiskOutputCache) and isinstance(model.text_cache, DiskOutputCache)
    assert model.image_cache.folder.parent == tmp_path / "shared" / "image" and model.text_cache.misses == 3
