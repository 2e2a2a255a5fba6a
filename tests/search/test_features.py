"""`crossmatch index build` and `crossmatch features` under `torchrun --nproc_per_node=2` (gloo on CPU): one
merged output, byte for byte the single-process one, and a rank's interrupted share resumed, not redone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from crossmatch.engine.sharding import batch_aligned_range
from tests.helpers import ROOT, save_tiny_checkpoint

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "crossmatch"]
SINGLE = [sys.executable, "-m", "crossmatch"]
# One intra-op thread in every process (torchrun's default for its workers): the same kernels either way.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT / "src")}


def run(cmd: list[str]) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_batch_aligned_shares_cover_every_item_once_in_whole_batches():
    for n, b, world in ((65, 8, 2), (64, 8, 3), (5, 8, 2), (0, 4, 2), (100, 7, 4)):
        shares = [batch_aligned_range(n, b, r, world) for r in range(world)]
        assert [i for s in shares for i in s] == list(range(n))
        assert all(s.start % b == 0 for s in shares if len(s))
    assert [len(batch_aligned_range(65, 8, r, 2)) for r in (0, 1)] == [40, 25]  # 9 batches: 5 + 4


@pytest.fixture(scope="module")
def inputs(shapes_root, tmp_path_factory):
    """(image folder of 64 images + one unreadable file, tiny_vse checkpoint)."""
    tmp = tmp_path_factory.mktemp("sharded")
    images = tmp / "images"
    shutil.copytree(shapes_root / "images", images)
    (images / "000050_bad.png").write_bytes(b"not a png")  # in rank 1's share
    return images, save_tiny_checkpoint(tmp / "m.pt", "tiny_vse")


FILES = ("embeddings.npy", "paths.json", "meta.json")


@pytest.mark.slow
def test_two_process_index_build_is_the_single_process_one_and_resumes_per_rank(inputs, tmp_path, monkeypatch):
    images, ckpt = inputs
    build = ["index", "build", str(ckpt), str(images), "--batch-size", "8", "--out"]
    run([*SINGLE, *build, str(tmp_path / "one")])
    run([*TORCHRUN, *build, str(tmp_path / "two")])
    for name in FILES:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    meta = json.loads((tmp_path / "two" / "meta.json").read_text())
    assert meta["count"] == 64 and [s["index"] for s in meta["skipped"]] == [51]  # sorts after 000050.png
    assert not (tmp_path / "two" / ".parts").exists()

    # Rank 1 of 2 interrupted after its first batch (run here, in-process), its rows marked; then torchrun.
    from crossmatch.runs import load_run
    from crossmatch.search import index as index_mod

    monkeypatch.setattr(index_mod, "get_rank", lambda: 1)
    monkeypatch.setattr(index_mod, "get_world_size", lambda: 2)
    monkeypatch.setattr(index_mod, "barrier", lambda: None)
    model, cfg, _ = load_run(ckpt)
    calls = {"n": 0}
    encode = model.encode_image_features

    def flaky(batch):  # call 1 probes the model, call 2 embeds rank 1's first batch, call 3 is "killed"
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return encode(batch)

    monkeypatch.setattr(model, "encode_image_features", flaky)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        index_mod.build_index(
            model, images, out, checkpoint=ckpt, model_name="tiny_vse", image_size=cfg.data.image_size, batch_size=8
        )
    monkeypatch.undo()
    part = out / ".parts" / "index-rank001-of-002"
    progress = json.loads((part / "meta.json").read_text())
    assert (progress["done"], progress["rows"], progress["complete"]) == (8, 8, False)
    emb = np.load(part / "embeddings.npy", mmap_mode="r+")
    emb[:8] = 0.25  # a value no embedding has: it survives only if rank 1 does not redo this batch
    emb.flush()
    del emb
    run([*TORCHRUN, *build, str(out)])
    got, want = np.load(out / "embeddings.npy"), np.load(tmp_path / "one" / "embeddings.npy")
    assert np.all(got[40:48] == 0.25)  # rank 1's share starts at file 40 (5 whole batches of 8)
    assert np.array_equal(np.delete(got, range(40, 48), 0), np.delete(want, range(40, 48), 0))
    for name in ("paths.json", "meta.json"):
        assert (out / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


@pytest.mark.slow
def test_two_process_features_are_the_single_process_ones(inputs, shapes_root, tmp_path):
    _, ckpt = inputs
    feats = ["features", str(ckpt), "--data", str(shapes_root), "--split", "train", "--kind", "grid"]
    feats += ["--batch-size", "8", "--out"]
    run([*SINGLE, *feats, str(tmp_path / "one")])
    run([*TORCHRUN, *feats, str(tmp_path / "two")])
    for name in ("train_ims.npy", "train_caps.txt", "features.json"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    arr = np.load(tmp_path / "two" / "train_ims.npy")
    assert arr.shape == (40, 16, 8) and arr.dtype == np.float16 and np.abs(arr).sum() > 0  # 4x4 grid of 8 channels
    assert not (tmp_path / "two" / ".parts").exists()


def test_interrupted_features_resume_to_the_same_files(inputs, shapes_root, tmp_path, monkeypatch):
    from crossmatch.search import features

    _, ckpt = inputs
    kwargs = dict(kind="global", batch_size=8)
    features.extract_features(str(ckpt), str(shapes_root), "val", tmp_path / "whole", **kwargs)
    real, calls = features.tower_features, {"n": 0}

    def flaky(*a):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second batch
        return real(*a)

    monkeypatch.setattr(features, "tower_features", flaky)
    with pytest.raises(KeyboardInterrupt):
        features.extract_features(str(ckpt), str(shapes_root), "val", tmp_path / "cut", **kwargs)
    progress = json.loads((tmp_path / "cut" / ".parts" / "features-val-rank000-of-001" / "progress.json").read_text())
    assert (progress["done"], progress["total"]) == (8, 12)
    calls["n"] = 10
    features.extract_features(str(ckpt), str(shapes_root), "val", tmp_path / "cut", **kwargs)
    assert calls["n"] == 11  # only the 4 remaining images: one batch
    for name in ("val_ims.npy", "val_caps.txt", "features.json"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
