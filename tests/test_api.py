"""crossmatch.api: `score` ranks as the Evaluator ranks, with the Evaluator's two-stage code (retrieval/rerank.py);
a deep copy of a loaded model embeds with its own weights."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

import crossmatch
from crossmatch.config import EvalConfig
from crossmatch.data.loaders import build_eval_loader
from crossmatch.retrieval import evaluate as evaluate_module
from crossmatch.retrieval.evaluate import EvalData
from crossmatch.retrieval.evaluator import Evaluator

RERANK_K = 3  # of 12 images and 60 captions: most pairs stay below the candidates, in stage-1 order


def shapes_test_split(root):
    """(image paths, captions, (N_txt,) image of each caption) of the shapes test split."""
    entries = [e for e in json.loads((root / "dataset.json").read_text())["images"] if e["split"] == "test"]
    images = [root / "images" / e["filename"] for e in entries]
    texts = [s["raw"] for e in entries for s in e["sentences"]]
    return images, texts, torch.tensor([i for i, e in enumerate(entries) for _ in e["sentences"]])


def evaluator_matrices(model, pixels, texts, txt_to_img, cfg: EvalConfig, monkeypatch) -> tuple[torch.Tensor, ...]:
    """The (i2t, t2i) matrices the Evaluator ranks, read where it hands them to the metrics."""
    seen = []

    def spy(s_i2t, s_t2i, t2i, twins=()):
        seen.append((s_i2t, s_t2i))
        return split_metrics(s_i2t, s_t2i, t2i, twins)

    split_metrics = evaluate_module.split_metrics
    monkeypatch.setattr(evaluate_module, "split_metrics", spy)
    ids = model.tokenizer.tokenizer.encode_batch(texts)  # what crossmatch.score's tokenizer.batch collates
    data = EvalData(
        build_eval_loader([{"image": p} for p in pixels], cfg.batch_size),
        build_eval_loader([{"input_ids": i} for i in ids], cfg.batch_size),
        txt_to_img,
        [],
    )
    Evaluator(data, cfg, torch.device("cpu"))(model)
    assert len(seen) == 1  # one fold
    return seen[0]


@pytest.mark.parametrize("name", ["tiny_albef", "tiny_vilt"])
def test_score_is_the_evaluators_matrix_of_each_direction(shapes_root, monkeypatch, name):
    """The same inputs, encoding batches, score chunks and re-rank batches: exactly equal (not merely close)."""
    torch.manual_seed(0)
    overrides = ["data.image_size=32", f"eval.rerank_k={RERANK_K}", "eval.chunk_size=5", "eval.rerank_batch=7"]
    model, _, preprocess = crossmatch.create_model_and_transforms(name, overrides=overrides, data_root=str(shapes_root))
    cfg = model.run_config.eval
    assert cfg.batch_size >= 60  # one encoding batch each side: captions padded to the same length both ways
    images, texts, txt_to_img = shapes_test_split(shapes_root)
    s_i2t, s_t2i = (crossmatch.score(model, images, texts, direction=d) for d in ("i2t", "t2i"))
    pixels = [preprocess(p) for p in images]
    want_i2t, want_t2i = evaluator_matrices(model, pixels, texts, txt_to_img, cfg, monkeypatch)
    assert s_i2t.dtype == s_t2i.dtype == torch.float64  # re-ranked (rerank's merged scores)
    assert not torch.equal(s_i2t, s_t2i)  # the two directions re-rank different candidates
    assert torch.equal(s_i2t, want_i2t)
    assert torch.equal(s_t2i, want_t2i)


def test_a_deep_copy_with_new_weights_embeds_with_them(shapes_root, tmp_path):
    """Change the copy's weights: the copy's embeddings change, the original's do not, and the copy's equal a
    fresh computation with the copy's own tensor face."""
    torch.manual_seed(0)
    model, _, _ = crossmatch.create_model_and_transforms(
        "tiny_vse", overrides=["data.image_size=32"], data_root=str(shapes_root)
    )
    path = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    texts = ["a red circle", "a blue square"]
    before_txt, before_img = model.encode(texts), model.encode([path])
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(-2.0).add_(0.1)
    got_txt, got_img = twin.encode(texts), twin.encode([path])
    assert not np.allclose(got_txt, before_txt) and not np.allclose(got_img, before_img)
    np.testing.assert_array_equal(model.encode(texts), before_txt)  # the original keeps its weights
    np.testing.assert_array_equal(model.encode([path]), before_img)
    with torch.no_grad():
        fresh_txt = twin.encode_text(twin.tokenizer(texts)).numpy()
        fresh_img = twin.encode_image(twin.preprocess(path)[None]).numpy()
    np.testing.assert_allclose(got_txt, fresh_txt, rtol=1e-5, atol=1e-6)  # encode batches as it likes: last bits
    np.testing.assert_allclose(got_img, fresh_img, rtol=1e-5, atol=1e-6)
    twin_scores = crossmatch.score(twin, [path], texts)
    assert not torch.allclose(twin_scores, crossmatch.score(model, [path], texts))
