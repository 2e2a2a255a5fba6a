"""The engine speed-ups change no result: each fast path against the plain one it replaced, plus the
quick-validation subset, the data-wait log and the training curves. Timings live in benchmarks/."""

from __future__ import annotations

import json
import struct

import pytest
import torch
import torch.nn.functional as F

from crossmatch.config import load_config, validate_config
from crossmatch.data.datasets import ImageCaptionDataset, PairView
from crossmatch.data.precomputed import PrecomputedFeatures
from crossmatch.data.tokenizer import CaptionTokenizer
from crossmatch.data.transforms import build_image_transform
from crossmatch.errors import ConfigError, DataError
from crossmatch.models import scan_scoring
from crossmatch.models.layers import SmallCNN
from crossmatch.search.curves import plot_curves, read_curves
from tests.helpers import tiny_cfg, write_karpathy

ENTRIES = [
    {"split": "val", "captions": ["a red circle", "a crimson disc"], "twin": 1},
    {"split": "val", "captions": ["a blue square"], "twin": 0},
    {"split": "val", "captions": ["green star", "a star", "green"], "twin": 3},
    {"split": "val", "captions": ["a star that is green"], "twin": 2},
    {"split": "val", "captions": ["a yellow cross"]},
]


def test_first_images_keeps_a_prefix_of_images_captions_and_twins(tmp_path):
    ds = ImageCaptionDataset(write_karpathy(tmp_path, ENTRIES), "val")
    sub = ds.first_images(3)
    assert [r.imgid for r in sub.images] == [0, 1, 2]
    assert sub.captions == ["a red circle", "a crimson disc", "a blue square", "green star", "a star", "green"]
    assert sub.txt_to_img == [0, 0, 1, 2, 2, 2] and sub.img_to_txt == [[0, 1], [2], [3, 4, 5]]
    assert sub.twins == [(0, 1)]  # (2, 3) lost image 3
    assert len(ds.images) == 5 and ds.twins == [(0, 1), (2, 3)]  # the split itself is untouched
    assert ds.first_images(0) is ds and ds.first_images(5) is ds and ds.first_images(9) is ds


def test_first_images_of_precomputed_features_cuts_the_rows(tmp_path):
    import numpy as np

    np.save(tmp_path / "val_ims.npy", np.arange(4 * 2 * 3, dtype=np.float32).reshape(4, 2, 3))
    (tmp_path / "val_caps.txt").write_text("".join(f"caption {i} of {i // 5}\n" for i in range(20)))
    ds = PrecomputedFeatures(tmp_path, "val")
    sub = ds.first_images(2)
    assert len(sub.images) == 2 and len(sub.captions) == 10 and sub.txt_to_img == [0] * 5 + [1] * 5
    view = sub.image_view()
    assert len(view) == 2 and view[1]["image"][0, 0] == 6.0  # row 1 of the features


def test_first_images_refuses_captions_out_of_image_order(tmp_path):
    ds = ImageCaptionDataset(write_karpathy(tmp_path, ENTRIES), "val")
    ds.txt_to_img = [0, 1, 0, 2, 2, 2, 3, 4]  # caption 2 belongs to image 0: not a prefix
    with pytest.raises(DataError, match="not in image order"):
        ds.first_images(1)


def test_max_images_is_validated_and_limits_validation_only(shapes_root, tmp_path):
    with pytest.raises(ConfigError, match="eval.max_images=-1"):
        validate_config(load_config(None, ["eval.max_images=-1"]))
    from crossmatch.engine.distributed import init_distributed
    from crossmatch.runs import build_trainer, make_evaluator

    cfg = tiny_cfg(shapes_root, "eval.max_images=5")
    trainer, cfg = build_trainer(cfg, tmp_path / "run", init_distributed("cpu"))
    data = trainer.evaluator.data
    assert len(data.image_loader.dataset) == 5 and len(data.text_loader.dataset) == 25  # 5 captions each
    assert int(data.txt_to_img.max()) == 4
    metrics = trainer.evaluate()
    tok = CaptionTokenizer.from_str(trainer.sinks.extra_state["tokenizer"])
    # the same 5 images evaluated by a fresh Evaluator give the same metrics: the subset is the first 5
    again = make_evaluator(cfg, "val", tok, trainer.model, torch.device("cpu"), max_images=5)(trainer.model)
    assert metrics == again and set(metrics) >= {"rsum", "i2t_r1"}
    test = make_evaluator(cfg, "test", tok, trainer.model, torch.device("cpu"))
    assert len(test.data.image_loader.dataset) == 12  # `crossmatch evaluate` sees the whole split
    trainer.close()


def test_channels_last_cnn_matches_the_plain_layout():
    torch.manual_seed(3)
    cnn = SmallCNN((4, 4, 8))
    x = torch.randn(3, 3, 32, 32)
    out = cnn(x)
    ref = cnn.body(x)  # NCHW, as before
    assert out.shape == ref.shape == (3, 8, 4, 4)
    # oneDNN's NHWC kernels sum in another order: a few float32 ulps on O(1) activations
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_seeding_an_item_touches_only_the_cpu_generator(shapes_root):
    ds = ImageCaptionDataset(shapes_root, "train")
    view = PairView(ds, CaptionTokenizer.train(ds.captions), build_image_transform(32, train=True))
    before = torch.get_rng_state()
    a = view[(3, 11)]
    assert torch.equal(torch.get_rng_state(), before)  # the global stream is restored
    torch.manual_seed(123)  # another global state: the item's crop does not depend on it
    torch.testing.assert_close(view[(3, 11)]["image"], a["image"])
    torch.default_generator.manual_seed(11)  # what the item seeds: the CPU generator with its seed
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(11)
        expected = view.images[view.captions[3]["image_idx"]]["image"]
    torch.testing.assert_close(a["image"], expected)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("grad", [False, True])
def test_length_sorted_chunks_equal_unsorted_scoring(direction, grad, monkeypatch):
    g = torch.Generator().manual_seed(4)
    images = F.normalize(torch.randn(7, 4, 16, generator=g), dim=-1)
    captions = F.normalize(torch.randn(23, 11, 16, generator=g), dim=-1)
    cap_lens = torch.randint(1, 12, (23,), generator=g)
    cap_lens[5] = 11
    captions[torch.arange(11) >= cap_lens[:, None]] = float("nan")  # padding is never read
    lam = {"lambda_softmax": 4.0, "lambda_lse": 5.0} if direction == "i2t" else {}

    def scores(sort: bool) -> torch.Tensor:
        monkeypatch.setattr(scan_scoring, "SORT_CAPTIONS", sort)
        im = images.clone().requires_grad_(grad)
        out = scan_scoring.scan_similarity(im, captions, cap_lens, direction=direction, txt_chunk=4, **lam)
        assert torch.isfinite(out).all()
        return out.detach()

    # the same sums over other chunk widths: float32 rounding of the last bits at most
    torch.testing.assert_close(scores(True), scores(False), atol=1e-6, rtol=1e-5)


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_curves_places_every_point_by_epoch(tmp_path):
    rows = [
        {"split": "train", "step": 5, "epoch": 0.5, "loss": 9.0, "lr": 1e-3},
        {"split": "train", "step": 10, "epoch": 1.0, "loss": 7.0},
        {"split": "val", "step": 10, "epoch": 1, "loss": 8.0, "triplet_loss": 8.0},
        {"split": "val", "step": 10, "epoch": 1, "rsum": 100.0, "i2t_r1": 5.0},
        {"split": "train", "step": 20, "epoch": 2.0, "loss": 3.0},
        {"split": "val", "step": 20, "epoch": 2, "loss": 4.0},
        {"split": "val", "step": 20, "epoch": 2, "rsum": 250.5},
    ]
    curves = read_curves(_write_rows(tmp_path / "m.jsonl", rows))
    assert curves == {
        "train_loss": [(0.5, 9.0), (1.0, 7.0), (2.0, 3.0)],
        "val_loss": [(1.0, 8.0), (2.0, 4.0)],
        "val_rsum": [(1.0, 100.0), (2.0, 250.5)],
    }
    # rows written before the epoch was recorded: placed by step, validations one epoch apart
    old = [{k: v for k, v in r.items() if k != "epoch"} for r in rows]
    assert read_curves(_write_rows(tmp_path / "old.jsonl", old))["train_loss"] == [(0.5, 9.0), (1.0, 7.0), (2.0, 3.0)]
    (tmp_path / "bad.jsonl").write_text('{"split": "train"}\nnot json\n')
    with pytest.raises(DataError, match="line 2"):
        read_curves(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="cannot read"):
        read_curves(tmp_path / "missing.jsonl")


def test_plot_curves_writes_a_png(tmp_path):
    rows = [{"split": "train", "step": s, "epoch": s / 10, "loss": 1000.0 / s} for s in range(1, 31)]
    rows += [{"split": "val", "step": 10 * e, "epoch": e, "loss": 90.0 / e, "rsum": 100.0 * e} for e in (1, 2, 3)]
    out = plot_curves(_write_rows(tmp_path / "m.jsonl", rows), tmp_path / "curves.png", title="t")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1000, 380)  # figsize (10, 3.8) at 100 dpi
