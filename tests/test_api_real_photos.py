"""Real photos: model-owned preprocessing (letterbox, transparency, EXIF) and the open_clip-style Python API
(crossmatch.create_model_and_transforms / load / score). `crossmatch data tuxpaint`, which builds a dataset of
real pictures, is tested in tests/data/test_tuxpaint.py."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import crossmatch
from crossmatch.config import load_config
from crossmatch.data.transforms import WHITE, build_image_transform, load_image, to_rgb
from crossmatch.errors import ConfigError
from crossmatch.runs import resolve_preprocess

FIXTURES = Path(__file__).parent / "fixtures"


# --- preprocessing ---------------------------------------------------------------------------------------


def test_letterbox_pads_the_short_side_with_the_background_and_moves_boxes():
    # a 2 x 4 (H x W) black image -> 4 x 4: rows 0 and 3 are the fill colour, rows 1-2 the image
    t = build_image_transform(4, train=False, mean=[0, 0, 0], std=[1, 1, 1], resize="letterbox", background=[255, 0, 0])
    out = t(torch.zeros(3, 2, 4, dtype=torch.uint8))  # (3, 4, 4) floats in [0, 1]
    assert out.shape == (3, 4, 4)
    assert out[:, 0].tolist() == [[1.0] * 4, [0.0] * 4, [0.0] * 4] and out[:, 3].tolist() == out[:, 0].tolist()
    assert out[:, 1:3].abs().sum() == 0
    from crossmatch.data.transforms import apply_transform

    _, boxes = apply_transform(t, torch.zeros(3, 20, 40, dtype=torch.uint8), [[0.0, 0.0, 40.0, 20.0]])
    assert boxes.tolist() == [[0.0, 1.0, 4.0, 3.0]]  # scaled by 4/40 and shifted down by the 1-pixel bar


def test_transparent_pixels_become_the_background_not_their_hidden_colour():
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))  # hidden black, fully transparent
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    assert list(to_rgb(rgba).get_flattened_data()) == [WHITE, (10, 20, 30)]
    assert list(to_rgb(rgba, (0, 128, 0)).get_flattened_data())[0] == (0, 128, 0)
    half = Image.new("LA", (1, 1), (0, 128))  # black at alpha 128/255 over white: 255 * (1 - 128/255) = 127
    assert list(to_rgb(half).get_flattened_data()) == [(127, 127, 127)]
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([0, 0, 0, 200, 0, 0])
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0  # palette entry 0 is transparent
    assert list(to_rgb(pal).get_flattened_data()) == [WHITE, (200, 0, 0)]


def test_exif_orientation_is_applied_when_decoding(tmp_path):
    im = Image.new("RGB", (4, 2), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a 4 x 2 file is shown 2 wide x 4 high
    im.save(tmp_path / "r.jpg", exif=exif)
    im.save(tmp_path / "plain.png")
    assert tuple(load_image(tmp_path / "r.jpg").shape) == (3, 4, 2)
    assert tuple(load_image(tmp_path / "plain.png").shape) == (3, 2, 4)


def test_towers_declare_their_own_preprocessing():
    pytest.importorskip("timm")
    from crossmatch.models.pretrained import ImageTower

    lite0 = ImageTower("efficientnet_lite0", pretrained=False)
    assert lite0.preprocess["mean"] == [0.5] * 3 and lite0.preprocess["std"] == [0.5] * 3
    assert lite0.preprocess["interpolation"] == "bicubic" and "size" not in lite0.preprocess  # any input size
    resnet = ImageTower("resnet18", pretrained=False)  # a timm tower: timm's resolve_data_config
    assert resnet.preprocess["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_resolve_preprocess_fills_the_models_values_keeps_overrides_and_defaults_for_scratch_models():
    cfg = load_config(None, ["data.image_size=96", "data.resize=letterbox"])
    lite0 = SimpleNamespace(
        preprocess={"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize": "shortest"}
    )
    d = resolve_preprocess(cfg, lite0).data
    assert (d.image_mean, d.image_std, d.interpolation) == ([0.5] * 3, [0.5] * 3, "bicubic")
    assert d.resize == "letterbox" and d.image_size == 96 and d.background == [255, 255, 255]
    d = resolve_preprocess(cfg, torch.nn.Linear(1, 1)).data  # no preprocess: the defaults, written out
    assert d.image_mean == [0.485, 0.456, 0.406] and d.image_std == [0.229, 0.224, 0.225]
    assert d.interpolation == "bilinear" and d.image_size == 96


def test_a_bad_background_is_refused_by_name():
    from crossmatch.config import validate_config

    with pytest.raises(ConfigError, match="data.background"):
        validate_config(load_config(None, ["data.background=[300, 0, 0]"]))


# --- Python API --------------------------------------------------------------------------------------------


def test_load_gives_preprocess_tokenizer_and_embeddings_of_a_legacy_checkpoint(tmp_path):
    model = crossmatch.load(FIXTURES / "legacy_tiny_vse.pt")
    pp, tok = model.preprocess, model.tokenizer
    assert pp["mean"] == [0.485, 0.456, 0.406] and pp["resize"] == "squash"  # 0.1.0's defaults, unchanged
    Image.new("RGBA", (40, 20), (0, 0, 255, 255)).save(tmp_path / "a.png")
    pil = Image.open(tmp_path / "a.png")
    x = [pp(pil), pp(tmp_path / "a.png"), pp(load_image(tmp_path / "a.png"))]
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2]) and x[0].shape == (3, pp["size"], pp["size"])
    ids = tok(["a red circle", "a blue square left of a red circle"])  # (2, L) padded with 0
    assert ids.shape[0] == 2 and (ids[0] != 0).sum() < (ids[1] != 0).sum()
    with torch.no_grad():
        img, txt = model.encode_image(torch.stack(x)), model.encode_text(ids)  # (3, E), (2, E)
    assert img.shape[0] == 3 and txt.shape == (2, img.shape[1])
    torch.testing.assert_close(img.norm(dim=1), torch.ones(3))
    # score = cosine of the embeddings (dual encoder); same batch shapes -> equal up to float32 rounding
    torch.testing.assert_close(crossmatch.score(model, images=[pil] * 3, texts=batch_texts()), img @ txt.t())


def batch_texts() -> list[str]:
    return ["a red circle", "a blue square left of a red circle"]


def test_score_reranks_a_fusion_model_and_matches_brute_force_when_every_pair_is_a_candidate():
    model = crossmatch.load(FIXTURES / "legacy_tiny_albef.safetensors")
    images = [
        torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        for i in range(3)
    ]
    texts = ["a red circle", "a green square", "a blue triangle above a red circle", "a circle"]
    s = crossmatch.score(model, images=images, texts=texts, rerank_k=10)  # k >= N, M: every pair re-scored
    assert torch.equal(s, crossmatch.score(model, images=images, texts=texts, direction="i2t", rerank_k=10))
    pixels = torch.stack([model.preprocess(im) for im in images])
    img, txt = model.encode_image_features({"image": pixels}), model.encode_text_features(model.tokenizer.batch(texts))
    ref = torch.tensor([[model.score_pairs(slice1(img, i), slice1(txt, t)).item() for t in range(4)] for i in range(3)])
    torch.testing.assert_close(s.float(), ref, rtol=1e-4, atol=1e-5)  # batched vs one-pair forward passes
    stage1 = crossmatch.score(model, images=images, texts=texts, rerank_k=0)
    torch.testing.assert_close(stage1, img["embed"] @ txt["embed"].t(), rtol=1e-4, atol=1e-5)


def slice1(feats: dict, i: int) -> dict:
    return {k: v[i : i + 1] for k, v in feats.items()}


def test_create_model_and_transforms_takes_a_checkpoint_and_refuses_an_unknown_name():
    model, _, pp = crossmatch.create_model_and_transforms(str(FIXTURES / "legacy_tiny_vse.pt"))
    assert model.preprocess is pp and callable(pp) and callable(model.tokenizer)
    with pytest.raises(crossmatch.errors.ModelError, match="no_such_model"):
        crossmatch.create_model_and_transforms("no_such_model")


def test_create_model_and_transforms_of_a_registered_name_takes_the_towers_preprocessing():
    pytest.importorskip("transformers")
    pytest.importorskip("timm")
    model, _, pp = crossmatch.create_model_and_transforms("vse_pretrained", overrides=["model.embed_dim=8"])
    assert pp["mean"] == [0.5] * 3 and pp["size"] == 224
    emb = model.encode_text(crossmatch.get_tokenizer("vse_pretrained")(["a frog."]))
    assert emb.shape == (1, 8)


# --- frozen-tower cache ---------------------------------------------------------------------------------------


def test_cached_frozen_towers_give_the_uncached_embeddings_and_skip_the_second_forward():
    pytest.importorskip("transformers")
    pytest.importorskip("timm")
    from crossmatch.models.pretrained import PretrainedDualConfig, PretrainedDualEncoder

    torch.manual_seed(0)
    model = PretrainedDualEncoder(PretrainedDualConfig(pretrained=False, embed_dim=8, cache_frozen=True)).eval()
    calls = []
    model.image_tower.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    images = torch.randn(3, 3, 32, 32)
    ids = torch.tensor([[101, 7592, 102, 0], [101, 2088, 2003, 102]])
    batch = {"image": images, "input_ids": ids, "attention_mask": ids != 0}
    with torch.no_grad():
        first_img, first_txt = model.encode_image_features(batch)["embed"], model.encode_text_features(batch)["embed"]
        # the same items again, in another order and batch: the tower runs only for the one new image
        again = model.encode_image_features({"image": torch.cat([images[[2, 0]], torch.randn(1, 3, 32, 32)])})["embed"]
        model.config.cache_frozen = False
        plain_img, plain_txt = model.encode_image_features(batch)["embed"], model.encode_text_features(batch)["embed"]
    assert calls == [3, 1, 3] and model.image_cache.hits == 2
    # cached rows were computed in a batch of 3, the reference too: the same kernels, equal up to rounding
    torch.testing.assert_close(first_img, plain_img)
    torch.testing.assert_close(again[:2], plain_img[[2, 0]])
    torch.testing.assert_close(first_txt, plain_txt)
    # a different preprocessing (other pixels) is another key: never a stale hit
    assert len(model.image_cache.store) == 4


@pytest.mark.parametrize("name", ["vse", "albef", "vilt", "tipcb"])
def test_score_gives_an_image_by_caption_matrix_for_every_family(name):
    path = next(p for p in sorted(FIXTURES.glob(f"legacy_tiny_{name}.*")) if "expected" not in p.name)
    model = crossmatch.load(path)
    gen = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, 24, 16), dtype=torch.uint8, generator=gen) for _ in range(2)]
    texts = ["a red circle", "a blue square", "a green triangle"]
    s = crossmatch.score(model, images=images, texts=texts, rerank_k=0)
    pixels = torch.stack([model.preprocess(im) for im in images])
    with torch.no_grad():
        ref = model.similarity(
            model.encode_image_features({"image": pixels}), model.encode_text_features(model.tokenizer.batch(texts))
        )
    assert s.shape == (2, 3)
    torch.testing.assert_close(s, ref.float())  # the same batches through the same calls


def test_a_vse_pretrained_checkpoint_from_before_model_owned_preprocessing_keeps_imagenet_stats(tmp_path):
    """A vse_pretrained checkpoint as 0.1.0 wrote it (no preprocessing fields in its data section, no
    image_prior in its model section) is scored on what it was trained on: ImageNet mean/std, squashed, not
    Lite0's 0.5/0.5 that a new run takes. (A real one holds 100 MB of tower weights; this one is written here in
    the same format, the towers randomly initialised.)"""
    pytest.importorskip("transformers")
    pytest.importorskip("timm")
    from crossmatch.data.tokenizer import build_tokenizer
    from crossmatch.data.transforms import build_image_transform
    from crossmatch.models.pretrained import PretrainedDualConfig, PretrainedDualEncoder

    torch.manual_seed(0)
    old = PretrainedDualEncoder(PretrainedDualConfig(pretrained=False, embed_dim=8)).eval()
    model_section = {"name": "vse_pretrained", "text_tower": "minilm", "text_pooling": "mean"}
    model_section |= {"image_tower": "efficientnet_lite0", "pretrained": False, "freeze_text": True}
    model_section |= {"freeze_image": True, "embed_dim": 8, "vocab_size": 30522}
    data = {"root": str(tmp_path), "format": "karpathy", "image_size": 32, "augment": False, "tokenizer": "minilm"}
    tok = build_tokenizer("minilm", [], max_words=32)
    ckpt = {"model": old.state_dict(), "config": {"data": data, "model": model_section}, "tokenizer": tok.to_str()}
    torch.save(ckpt, tmp_path / "old.pt")
    model = crossmatch.load(tmp_path / "old.pt")
    pp = model.preprocess
    assert pp["mean"] == [0.485, 0.456, 0.406] and pp["resize"] == "squash"  # 0.1.0's, not the tower's own
    assert model.prior is None and model.image_proj.in_features == 1280  # no class-name prior in an old model
    image = torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    old_transform = build_image_transform(32, train=False)  # 0.1.0's eval transform: ImageNet stats, squash
    with torch.no_grad():
        expected = old.encode_image_features({"image": old_transform(image)[None]})["embed"]
    with torch.no_grad():
        got = model.encode_image(pp(image)[None])
    assert torch.equal(got, expected)  # the same weights, pixels and batch shape
