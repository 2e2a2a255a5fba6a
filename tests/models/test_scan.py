"""SCAN model (Lee et al., ECCV 2018): region sources, scores, word attention, the precomputed-feature format,
training through the CLI, and `search --explain`. Registry-wide checks (gradients, NaN) are in test_registry.py."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from crossmatch.cli.main import main
from crossmatch.config import DataConfig
from crossmatch.data.formats import open_split
from crossmatch.data.precomputed import PrecomputedFeatures
from crossmatch.errors import DataError, ModelError
from crossmatch.models import create_model
from crossmatch.models.layers import l2norm, pool_boxes
from crossmatch.models.scan import scan_similarity
from crossmatch.search.explain import draw_attention

R_PRE, C_PRE = 7, 64  # precomputed regions and feature width in the tests


def batch(B=3, L=6, size=32, vocab=50, image=None):
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([L, 2, 4, 1][:B])
    mask = torch.arange(L)[None] < lengths[:, None]
    return {
        "image": torch.randn(B, 3, size, size, generator=g) if image is None else image,
        "input_ids": torch.randint(5, vocab, (B, L), generator=g) * mask,
        "attention_mask": mask,
        "image_idx": torch.arange(B),
        "boxes": torch.tensor([[[2.0, 3, 14, 12], [16, 16, 30, 31], [0, 0, 0, 0]]]).repeat(B, 1, 1),
        "box_mask": torch.tensor([[True, True, False], [True, False, False], [False, False, False]])[:B],
    }


@pytest.mark.parametrize(("regions", "n_regions"), [("grid", 16), ("boxes", 4), ("precomputed", R_PRE)])
def test_forward_shapes(regions, n_regions):
    model = create_model("tiny_scan", vocab_size=50, regions=regions, feature_dim=C_PRE).eval()
    image = torch.randn(3, R_PRE, C_PRE) if regions == "precomputed" else None
    with torch.no_grad():
        out = model.forward_features(batch(image=image))
    assert model.needs_boxes == (regions == "boxes")
    assert out["regions"].shape == (3, n_regions, 16) and out["words"].shape == (3, 6, 16)
    assert out["lengths"].dtype == torch.long and out["lengths"].tolist() == [6, 2, 4]
    assert out["scores"].shape == (3, 3) and torch.isfinite(out["scores"]).all()
    torch.testing.assert_close(out["regions"].norm(dim=-1), torch.ones(3, n_regions))


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_similarity_is_scan_similarity_and_ignores_padding(direction):
    model = create_model("tiny_scan", vocab_size=50, direction=direction, agg_func="Mean", lambda_softmax=5.0).eval()
    b = batch()
    with torch.no_grad():
        img, txt = model.encode_image_features(b), model.encode_text_features(b)
        scores = model.similarity(img, txt)
        ref = scan_similarity(img["regions"], txt["words"], txt["lengths"], direction, "clipped_l2norm", "Mean", 5.0)
        padded = {**txt, "words": F.pad(txt["words"], (0, 0, 0, 3))}  # the evaluator zero-pads dim 1
    torch.testing.assert_close(scores, ref)
    torch.testing.assert_close(model.similarity(img, padded), scores)


def test_box_regions_are_the_image_mean_then_pooled_boxes_then_grid_cells():
    model = create_model("tiny_scan", vocab_size=50, regions="boxes").eval()
    b = batch()
    with torch.no_grad():
        feats = model.region_features(b)  # (3, 4, C)
        fmap = model.image_tower(b["image"])  # (3, C, 4, 4)
        direct = pool_boxes(fmap, b["boxes"][:, :2], 32)  # (3, 2, C)
        cells = torch.tensor([[0.0, 0, 16, 16], [16, 0, 32, 16], [0, 16, 16, 32]]).expand(3, 3, 4)
        cell_feats = pool_boxes(fmap, cells.contiguous(), 32)  # (3, 3, C): the 2 x 2 grid cells that fill slots
    torch.testing.assert_close(feats[:, 0], fmap.mean((2, 3)))
    torch.testing.assert_close(feats[0, 1:3], direct[0])  # two real boxes
    torch.testing.assert_close(feats[0, 3], cell_feats[0, 2])  # slot 3 empty: cell 2
    torch.testing.assert_close(feats[1, 1], direct[1, 0])
    torch.testing.assert_close(feats[1, 2:], cell_feats[1, 1:])
    torch.testing.assert_close(feats[2, 1:], cell_feats[2])  # no real box
    flat = feats.flatten(0, 1)
    assert torch.cdist(flat, flat).add(torch.eye(len(flat)) * 1e3).min() > 0  # every region distinct


def test_box_position_adds_each_regions_place_and_size():
    b = batch()  # 32 x 32 images; image 0 has boxes (2, 3, 14, 12) and (16, 16, 30, 31), slot 3 a grid cell
    torch.manual_seed(0)
    plain = create_model("tiny_scan", vocab_size=50, regions="boxes").eval()
    torch.manual_seed(0)
    placed = create_model("tiny_scan", vocab_size=50, regions="boxes", box_position=True).eval()
    geo = placed.box_geometry(b)  # (3, 4, 5)
    torch.testing.assert_close(geo[0, 0], torch.tensor([0.0, 0, 1, 1, 1]))  # the whole image
    # (2/32, 3/32, 14/32, 12/32), area (12/32) * (9/32)
    torch.testing.assert_close(geo[0, 1], torch.tensor([2 / 32, 3 / 32, 14 / 32, 12 / 32, 12 * 9 / 32**2]))
    torch.testing.assert_close(geo[0, 3], torch.tensor([0.0, 0.5, 0.5, 1.0, 0.25]))  # empty slot: grid cell 2
    with torch.no_grad():
        feats = placed.region_features(b)  # (3, 4, C): the pooled features are the plain model's
        expect = l2norm(placed.image_proj(feats) + placed.box_proj(geo))
        torch.testing.assert_close(placed.encode_image_features(b)["regions"], expect)
        # without the position term the regions are the plain model's (same seed: the towers are built first)
        torch.nn.init.zeros_(placed.box_proj.weight)
        torch.nn.init.zeros_(placed.box_proj.bias)
        torch.testing.assert_close(
            placed.encode_image_features(b)["regions"], plain.encode_image_features(b)["regions"]
        )
    assert "box_proj.weight" not in plain.state_dict()  # off by default: checkpoints of before load as they were
    with pytest.raises(ModelError, match="box_position needs model.regions=boxes"):
        create_model("tiny_scan", vocab_size=50, regions="grid", box_position=True)


def test_word_attention_rows_sum_to_one_and_match_a_hand_computation():
    model = create_model("tiny_scan", vocab_size=50).eval()
    b = batch()
    with torch.no_grad():
        img, txt = model.encode_image_features(b), model.encode_text_features(b)
        one_img = {"regions": img["regions"][1:2]}
        one_txt = {"words": txt["words"][2:3], "lengths": txt["lengths"][2:3]}
        att = model.word_attention(one_img, one_txt)  # (4, 16)
    assert att.shape == (4, 16)
    torch.testing.assert_close(att.sum(-1), torch.ones(4))
    regions, words = img["regions"][1], txt["words"][2, :4]
    expected = torch.empty(4, 16)
    for w in range(4):
        z = []
        for r in range(16):
            raw = [float(regions[r] @ words[k]) for k in range(4)]
            clipped = [x if x > 0 else 0.1 * x for x in raw]
            z.append(9.0 * clipped[w] / (sum(x * x for x in clipped) ** 0.5 + 1e-8))
        e = [np.exp(v - max(z)) for v in z]
        expected[w] = torch.tensor([v / sum(e) for v in e])
    torch.testing.assert_close(att, expected)


def test_draw_attention_grid_and_boxes_width_grows_with_words(tmp_path):
    image = torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0, 1, 1], [0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 1, 1]])
    sizes = []
    for n in (2, 5):
        att = torch.softmax(torch.randn(n, 16), -1)
        att_boxes = torch.softmax(torch.randn(n, 3), -1)
        out = draw_attention([image, image], ["w"] * n, [att, att_boxes], [(4, 4), boxes], tmp_path / f"{n}.png")
        sizes.append(Image.open(out).size)
    assert sizes[1][0] > sizes[0][0] and sizes[1][1] == sizes[0][1]


# ---- SCAN's precomputed-feature format -------------------------------------------------------------------


def write_precomp(root, split, n_img, repeat=1, caps_per_img=5, dtype=np.float16, seed=0):
    """`{split}_ims.npy` (n_img * repeat, R_PRE, C_PRE) + `{split}_caps.txt` with `caps_per_img` per image."""
    root.mkdir(parents=True, exist_ok=True)
    feats = np.random.default_rng(seed).standard_normal((n_img, R_PRE, C_PRE)).astype(dtype)
    np.save(root / f"{split}_ims.npy", np.repeat(feats, repeat, axis=0))
    colours = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
    lines = [f"a {colours[i % 8]} thing number {k}" for i in range(n_img) for k in range(caps_per_img)]
    (root / f"{split}_caps.txt").write_text("\n".join(lines) + "\n")
    return feats


def test_precomputed_maps_im_div_and_memmap(tmp_path):
    feats = write_precomp(tmp_path, "train", 6)
    ds = open_split(DataConfig(root=str(tmp_path), format="scan_precomputed"), "train")
    assert isinstance(ds.features, np.memmap)  # np.load(mmap_mode="r"): rows stay on disk
    assert len(ds.images) == 6 and len(ds.captions) == 30 and ds.twins == []
    assert ds.txt_to_img == [j // 5 for j in range(30)]
    assert ds.img_to_txt[4] == [20, 21, 22, 23, 24] and ds.images[4].imgid == 4
    assert ds.images[0].path == tmp_path / "train_ims.npy"
    item = ds.image_view(None, 8)[4]
    assert item["image_idx"] == 4 and item["image"].dtype == torch.float32
    np.testing.assert_array_equal(item["image"].numpy(), feats[4].astype(np.float32))


def test_precomputed_one_caption_per_row_and_repeated_rows(tmp_path):
    write_precomp(tmp_path / "a", "test", 10, caps_per_img=1)  # N == n_captions, distinct rows: im_div 1
    ds = PrecomputedFeatures(tmp_path / "a", "test")
    assert len(ds.images) == 10 and ds.txt_to_img == list(range(10))
    feats = write_precomp(tmp_path / "b", "test", 2, repeat=5)  # each image stored 5 times, 5 captions each
    ds = PrecomputedFeatures(tmp_path / "b", "test")
    assert len(ds.images) == 2 and ds.txt_to_img == [0] * 5 + [1] * 5
    np.testing.assert_array_equal(ds.image_view(None)[1]["image"].numpy(), feats[1].astype(np.float32))
    write_precomp(tmp_path / "c", "test", 3, caps_per_img=4)
    with pytest.raises(DataError, match="12 captions for 3 feature rows"):
        PrecomputedFeatures(tmp_path / "c", "test")


def test_precomputed_karpathy_json_variant(tmp_path):
    feats = np.arange(3 * R_PRE * C_PRE, dtype=np.float32).reshape(3, R_PRE, C_PRE)
    np.save(tmp_path / "val_ims.npy", feats)
    entries = [
        {"filename": f"{i}.png", "split": "val", "feature_row": row, "sentences": [{"raw": c} for c in caps]}
        for i, (row, caps) in enumerate([(2, ["a", "b"]), (0, ["c"]), (1, ["d", "e", "f"])])
    ]
    (tmp_path / "val_karpathy.json").write_text(json.dumps({"images": entries}))
    ds = PrecomputedFeatures(tmp_path, "val")
    assert ds.captions == list("abcdef") and ds.txt_to_img == [0, 0, 1, 2, 2, 2]
    assert ds.img_to_txt == [[0, 1], [2], [3, 4, 5]]
    np.testing.assert_array_equal(ds.image_view(None)[0]["image"].numpy(), feats[2])


# ---- end to end through the CLI --------------------------------------------------------------------------

TINY = ["model.name=tiny_scan", "model.embed_dim=16", "model.word_dim=8", "train.epochs=1"]
STEPS = ["train.batch_size=8", "train.max_steps_per_epoch=2", "eval.batch_size=16"]


def test_train_on_precomputed_features_then_explain_is_refused(tmp_path, capsys):
    for split, n in (("train", 6), ("dev", 3)):
        write_precomp(tmp_path / "precomp", split, n, seed=len(split))
    args = ["train", "configs/scan_t2i_lse.yaml", "--run-dir", str(tmp_path / "run"), *TINY, *STEPS]
    over = [f"data.root={tmp_path / 'precomp'}", "model.regions=precomputed", f"model.feature_dim={C_PRE}"]
    assert main([*args, *over]) == 0
    assert '"step": 2' in (tmp_path / "run" / "metrics.jsonl").read_text()
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.pt")
    capsys.readouterr()
    assert main(["search", ckpt, "--query", "a red thing", "--split", "val", "--explain", "--top-k", "2"]) == 2
    assert "precomputed region features" in capsys.readouterr().err


def test_train_with_box_regions_then_search_explain(shapes_root, tmp_path, capsys, monkeypatch):
    args = ["train", "configs/scan_shapes_boxes.yaml", "--run-dir", str(tmp_path / "run"), *TINY, *STEPS]
    assert main([*args, f"data.root={shapes_root}", "data.image_size=32"]) == 0
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.pt")
    query = json.loads((shapes_root / "dataset.json").read_text())["images"][-1]["sentences"][0]["raw"]
    sizes = []
    for n_words, q in ((2, "a circle"), (len(query.split()), query)):
        gallery = tmp_path / f"g{n_words}.png"
        assert main(["search", ckpt, "--query", q, "--top-k", "3", "--out", str(gallery), "--explain"]) == 0
        picture = tmp_path / f"g{n_words}_explain.png"
        assert picture.is_file() and gallery.is_file()
        sizes.append(Image.open(picture).size)
    assert sizes[1][0] > sizes[0][0] and sizes[0][1] == sizes[1][1]  # a panel per word, a row per top image

    import crossmatch.cli.commands as commands
    import crossmatch.runs as runs

    _, cfg, tokenizer = runs.load_run(ckpt)
    cfg.model = {"name": "tiny_vse"}
    monkeypatch.setattr(runs, "load_run", lambda *a, **k: (create_model("tiny_vse", vocab_size=50), cfg, tokenizer))
    with pytest.raises(ModelError, match="model tiny_vse has no word attention to explain"):
        commands.run_search(ckpt, "a circle", explain=True)
