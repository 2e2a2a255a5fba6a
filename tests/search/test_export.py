"""ONNX export (`crossmatch export CKPT --onnx DIR`): the unpacked GRU against the packed one, both graphs
through onnxruntime against the torch model, the exported tokenizer against training's, and the
one-line refusal of models that are not dual encoders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crossmatch.data.loaders import pad_sequences
from crossmatch.data.tokenizer import CaptionTokenizer
from crossmatch.errors import ModelError
from crossmatch.models.layers import GRUTextEncoder
from tests import helpers

CAPTIONS = ["a red circle left of a blue square", "two green triangles above a small star", "one big yellow square"]
TEXTS = ["a blue square", "a red circle left of a blue square above two green triangles and one star", "", "zebra"]
# Tolerance of embeddings computed by two runtimes (different GEMM kernels and summation orders), per element
# of l2-normalised vectors; the bound.
ATOL = 1e-4


def tokenizer(max_words: int = 12) -> CaptionTokenizer:
    return CaptionTokenizer.train(CAPTIONS, max_words=max_words)


def batch_of(tok: CaptionTokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    ids, mask = pad_sequences(tok.encode_batch(texts))  # (B, L) each, as collate builds them
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def image_embed(model, images: torch.Tensor) -> np.ndarray:
    """The torch model's (B, E) image embeddings: what the exported image graph must give."""
    return model.encode_image_features({"image": images})["embed"].numpy()


@torch.no_grad()
def text_embed(model, batch: dict[str, torch.Tensor]) -> np.ndarray:
    """The torch model's (B, E) caption embeddings: what the exported text graph must give."""
    return model.encode_text_features(batch)["embed"].numpy()


@pytest.mark.parametrize("bidirectional", [False, True])
def test_unpacked_gru_equals_the_packed_one(bidirectional):
    from crossmatch.search.export import UnpackedGRU

    torch.manual_seed(0)
    enc = GRUTextEncoder(20, word_dim=6, hidden=5, bidirectional=bidirectional).eval()
    lengths = torch.tensor([7, 1, 4, 0, 7])  # 0: an empty mask, which packing treats as one word
    mask = torch.arange(7)[None] < lengths[:, None]  # (5, 7)
    ids = torch.randint(5, 20, (5, 7)) * mask
    with torch.no_grad():
        words, sentence = enc(ids, mask)
        words2, sentence2 = UnpackedGRU(enc)(ids, mask)
    # The same recurrences on other batch shapes (packing shrinks the batch step by step): last bits differ.
    torch.testing.assert_close(sentence2, sentence, atol=1e-6, rtol=0)
    torch.testing.assert_close(words2, words, atol=1e-6, rtol=0)  # padded positions: zero in both
    assert words2[1, 1:].abs().max() == 0 and words2[3, 1:].abs().max() == 0


def save_tiny_checkpoint(path, name: str, *overrides: str):
    return helpers.save_tiny_checkpoint(path, name, *overrides, captions=CAPTIONS)


def test_vse_cnn_exports_quietly_through_the_cli_with_overrides_and_matches_torch(tmp_path, capsys):
    """The vse_cnn setup (tiny_vse, bidirectional GRU), end to end: a checkpoint, `crossmatch export` with a
    key=value override, both graphs and tokenizer.json alone against the torch model."""
    pytest.importorskip("onnxruntime")
    from crossmatch.cli.main import main
    from crossmatch.runs import load_run
    from crossmatch.search.export import OnnxDualEncoder

    ckpt = save_tiny_checkpoint(tmp_path / "m.pt", "tiny_vse", "model.bidirectional=true")
    assert main(["export", str(ckpt), "--onnx", str(tmp_path / "onnx"), "data.image_mean=[0.5,0.5,0.5]"]) == 0
    out = capsys.readouterr().out
    assert "[torch.onnx]" not in out and len(out.splitlines()) == 2  # the files line and the parity line
    assert out.startswith("exported tiny_vse (dual_encoder)") and "max abs diff" in out
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == [
        "crossmatch_onnx.json",
        "image_encoder.onnx",
        "text_encoder.onnx",
        "tokenizer.json",
    ]
    saved = json.loads((tmp_path / "onnx" / "crossmatch_onnx.json").read_text())
    assert saved["kind"] == "dual_encoder"
    assert saved["image_encoder"]["inputs"]["image"]["shape"] == ["batch", 3, 32, 32]
    assert saved["image_encoder"]["outputs"] == {"embed": {"shape": ["batch", 16], "dtype": "float32"}}
    assert saved["text_encoder"]["outputs"] == {"embed": {"shape": ["batch", 16], "dtype": "float32"}}
    assert saved["preprocessing"]["mean"] == [0.5, 0.5, 0.5]  # the override, not ImageNet's stored mean
    assert saved["preprocessing"]["std"] == [0.229, 0.224, 0.225] and saved["tokenizer"]["max_words"] == 8
    assert max(saved["parity"]["max_abs_diff"].values()) <= ATOL

    model, _, tok = load_run(ckpt)
    onnx = OnnxDualEncoder(tmp_path / "onnx")
    ids, mask = onnx.tokenize(TEXTS)  # tokenizer.json alone, as another runtime would use it
    ref = batch_of(tok, TEXTS)
    assert np.array_equal(ids, ref["input_ids"].numpy()) and np.array_equal(mask, ref["attention_mask"].numpy())
    assert ids.shape == (4, 8)  # the long caption is cut to max_words; the empty one is [UNK]

    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))  # another batch size than export
    img_ref, txt_ref = image_embed(model, images), text_embed(model, ref)
    assert np.abs(onnx.encode_image(images.numpy()) - img_ref).max() <= ATOL
    assert np.abs(onnx.encode_text(TEXTS) - txt_ref).max() <= ATOL
    assert np.abs(onnx.encode_text(TEXTS[:1]) - txt_ref[:1]).max() <= ATOL  # batch 1, length 3


@pytest.mark.parametrize(
    ("name", "reason"),
    [("tiny_scan", "not the dot product of one vector per side"), ("tiny_albef", "score_pairs")],
)
def test_models_that_are_not_dual_encoders_are_refused_naming_their_towers(name, reason, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from crossmatch.cli.main import main

    ckpt = save_tiny_checkpoint(tmp_path / "m.pt", name)
    assert main(["export", str(ckpt), "--onnx", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"crossmatch: error: model {name} is not a dual encoder")
    assert reason in err and "--towers" in err and not (tmp_path / "out" / "image_encoder.onnx").exists()


def test_a_bad_override_of_export_is_a_one_line_error(tmp_path, capsys):
    from crossmatch.cli.main import main

    ckpt = save_tiny_checkpoint(tmp_path / "m.pt", "tiny_vse")
    assert main(["export", str(ckpt), "--onnx", str(tmp_path / "out"), "data.image_sise=48"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.image_sise" in err and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_towers_of_scan_and_albef_match_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from crossmatch.cli.export import run_export
    from crossmatch.runs import load_run

    for name in ("tiny_scan", "tiny_albef"):
        ckpt = save_tiny_checkpoint(tmp_path / f"{name}.pt", name)
        info = run_export(str(ckpt), str(tmp_path / name), towers=True)
        assert info["kind"] == "towers" and max(info["parity"]["max_abs_diff"].values()) <= ATOL
        model, _, tok = load_run(ckpt)
        batch = batch_of(tok, TEXTS)
        sess = ort.InferenceSession(str(tmp_path / name / "text_tower.onnx"), providers=["CPUExecutionProvider"])
        keys = sorted(info["text_encoder"]["outputs"])
        got = dict(zip(keys, sess.run(keys, {k: v.long().numpy() for k, v in batch.items()}), strict=True))
        with torch.no_grad():
            ref = model.encode_text_features(batch)
        if name == "tiny_scan":  # per-word features on real words; the lengths exactly
            assert info["text_encoder"]["outputs"]["words"]["shape"] == ["batch", "length", 16]
            assert np.array_equal(got["lengths"], ref["lengths"].numpy())
            real = batch["attention_mask"].numpy()[..., None]
            assert np.abs((got["words"] - ref["words"].numpy()) * real).max() <= ATOL
        else:
            assert info["text_encoder"]["outputs"]["tokens"]["shape"][1] == "length + 1"  # the prepended [CLS]
            assert np.abs(got["embed"] - ref["embed"].numpy()).max() <= ATOL


@pytest.mark.slow
def test_vse_pretrained_with_cached_frozen_towers_and_the_class_prior_matches_torch(tmp_path):
    """vse_pretrained as configs/vse_pretrained_tux.yaml sets it up (model.cache_frozen, model.image_prior), with a
    tiny random BERT folder and timm's test_efficientnet (no weights needed): the graphs compute the towers that
    the model caches, and equal the cached model's embeddings."""
    pytest.importorskip("onnxruntime")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("timm")
    from crossmatch.models.registry import create_model
    from crossmatch.search.export import OnnxDualEncoder, export_onnx

    tok = tokenizer()
    bert = tmp_path / "bert"
    transformers.BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
    ).save_pretrained(bert)
    tok.save(bert / "tokenizer.json")  # the class-name prior embeds ImageNet's names with the text tower's tokenizer
    torch.manual_seed(0)
    kw = {"text_tower": str(bert), "image_tower": "test_efficientnet", "pretrained": False, "embed_dim": 8}
    model = create_model("vse_pretrained", cache_frozen=True, image_prior="class_names", **kw).eval()
    info = export_onnx(model, tok, 64, tmp_path / "onnx", model_name="vse_pretrained")
    assert max(info["parity"]["max_abs_diff"].values()) <= ATOL
    assert model.config.cache_frozen and not model.image_cache.store  # the model keeps caching; export read no cache
    onnx = OnnxDualEncoder(tmp_path / "onnx")
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    # through the memory caches: each item's frozen outputs computed once, then read
    txt_ref, img_ref = text_embed(model, batch_of(tok, TEXTS)), image_embed(model, images)
    # the cached path ran: 3 images, 3 distinct token sequences ("" and "zebra" are both [UNK])
    assert len(model.image_cache.store) == 3 and len(model.text_cache.store) == 3
    assert np.abs(onnx.encode_text(TEXTS) - txt_ref).max() <= ATOL
    assert np.abs(onnx.encode_image(images.numpy()) - img_ref).max() <= ATOL


@pytest.mark.slow
def test_tiny_clip_exports_its_bpe_tokenizer_and_matches_torch(tmp_path):
    """The clip family: the graphs, and CLIP's BPE as a tokenizer.json that gives open_clip's ids."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("open_clip")
    from crossmatch.cli.export import run_export
    from crossmatch.config import config_to_dict, load_config
    from crossmatch.engine.checkpoint import atomic_save
    from crossmatch.runs import build_model, build_run_tokenizer, load_run, resolved_model_section
    from crossmatch.search.export import OnnxDualEncoder

    cfg = load_config(None, ["model.name=tiny_clip", "data.image_size=32"])
    tok = build_run_tokenizer(cfg, lambda: [])  # the family's own: CLIP's BPE, 16 tokens
    torch.manual_seed(0)
    model, cfg = build_model(cfg, tok)
    cfg.model = resolved_model_section("tiny_clip", model)
    ckpt = tmp_path / "clip.pt"
    atomic_save({"model": model.state_dict(), "config": config_to_dict(cfg), "tokenizer": tok.to_str()}, ckpt)
    info = run_export(str(ckpt), str(tmp_path / "onnx"))
    assert max(info["parity"]["max_abs_diff"].values()) <= ATOL
    model, _, tok = load_run(ckpt)
    onnx = OnnxDualEncoder(tmp_path / "onnx")
    texts = [*TEXTS, "Zebras' 12 café déjà-vu,  OK!"]  # case, apostrophes, digits, accents, runs of spaces
    ids, mask = onnx.tokenize(texts)
    ref = batch_of(tok, texts)
    assert np.array_equal(ids, ref["input_ids"].numpy()) and np.array_equal(mask, ref["attention_mask"].numpy())
    assert ids[2].tolist()[:2] == [49406, 49407] and ids.shape[1] == 16  # "" is [SOT, EOT]; cut to the context
    assert np.abs(onnx.encode_text(texts) - text_embed(model, ref)).max() <= ATOL


def test_missing_onnx_export_folder_is_a_one_line_error(tmp_path):
    pytest.importorskip("onnxruntime")
    from crossmatch.search.export import OnnxDualEncoder

    with pytest.raises(ModelError, match="not a crossmatch ONNX export"):
        OnnxDualEncoder(tmp_path)


def test_the_manifest_records_the_runs_own_preprocessing():
    from crossmatch.data.tokenizer import CaptionTokenizer
    from crossmatch.search.export import DUAL_FILES, manifest

    tok = CaptionTokenizer.train(["a red circle"], max_words=8)
    keys, shapes = {"image": ["embed"], "text": ["embed"]}, {"image": {"embed": [1]}, "text": {"embed": [1]}}
    clip_like = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
    info = manifest("m", 32, tok, DUAL_FILES, keys, shapes, False, {**clip_like, "resize": "shortest"})
    pp = info["preprocessing"]
    assert pp["mean"] == clip_like["mean"] and pp["std"] == clip_like["std"] and "centre crop" in pp["resize_mode"]
    default = manifest("m", 32, tok, DUAL_FILES, keys, shapes, False)["preprocessing"]
    assert default["mean"] == [0.485, 0.456, 0.406] and "no crop" in default["resize_mode"]
