"""Search at scale: `crossmatch index build|query` against brute force, resumable builds, unreadable
images, the faiss backend, and the static HTML report."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from crossmatch.cli.main import main
from crossmatch.data.loaders import pad_sequences
from crossmatch.data.transforms import build_image_transform, load_image
from crossmatch.errors import DataError, ModelError
from crossmatch.runs import load_run
from crossmatch.search.index import build_index, embed_dim_of, load_index
from crossmatch.search.report import report_from_scores, write_html_report
from tests.helpers import train_args

QUERY = "a red circle left of a blue square"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(images folder, checkpoint, index folder built through the CLI with batch size 8)."""
    from crossmatch.data.shapes import generate_shapes

    tmp = tmp_path_factory.mktemp("index")
    generate_shapes(tmp / "data", n_train=30, n_val=8, n_test=8, size=32, workers=1)
    assert main(train_args(tmp / "data", tmp / "run", "train.epochs=1", "train.max_steps_per_epoch=2")) == 0
    ckpt = tmp / "run" / "checkpoints" / "last.pt"
    assert (
        main(
            ["index", "build", str(ckpt), str(tmp / "data" / "images"), "--out", str(tmp / "idx")]
            + ["--batch-size", "8"]
        )
        == 0
    )
    return tmp / "data" / "images", ckpt, tmp / "idx"


@torch.no_grad()
def brute_force_images(ckpt: Path, files: list[Path]) -> torch.Tensor:
    """(N, E) embeddings of `files`, encoded one by one with the checkpoint's model."""
    model, cfg, _ = load_run(ckpt)
    transform = build_image_transform(cfg.data.image_size, train=False)
    return torch.cat([model.encode_image_features({"image": transform(load_image(f))[None]})["embed"] for f in files])


@torch.no_grad()
def brute_force_text(ckpt: Path, text: str) -> torch.Tensor:
    model, _, tokenizer = load_run(ckpt)
    ids, mask = pad_sequences([tokenizer.encode(text)])
    return model.encode_text_features({"input_ids": ids, "attention_mask": mask})["embed"]  # (1, E)


@pytest.mark.slow
def test_build_writes_the_index_and_query_equals_brute_force(run, capsys):
    images, ckpt, idx = run
    files = sorted(images.glob("*.png"))
    meta = json.loads((idx / "meta.json").read_text())
    assert meta["count"] == len(files) == 46 and meta["complete"] and meta["skipped"] == []
    assert (idx / meta["checkpoint"]).resolve() == ckpt.resolve()  # stored relative to the index folder
    assert meta["model"] == "tiny_vse" and meta["embed_dim"] == 16
    assert json.loads((idx / "paths.json").read_text()) == [f.name for f in files]
    emb = np.load(idx / "embeddings.npy")
    assert emb.dtype == np.float32 and emb.shape == (46, 16)
    img = brute_force_images(ckpt, files)  # (46, E)
    torch.testing.assert_close(torch.from_numpy(emb), img, atol=1e-5, rtol=1e-5)

    txt = brute_force_text(ckpt, QUERY)  # (1, E)
    expected = (img @ txt.t())[:, 0].sort(descending=True)  # brute force over every image
    index = load_index(idx)
    for chunk in (7, 46, 1000):  # chunked merges give the same top-k, in order
        scores, ids = index.search(txt, 10, chunk_size=chunk)
        assert ids[0].tolist() == expected.indices[:10].tolist()
        torch.testing.assert_close(scores[0], expected.values[:10], atol=1e-5, rtol=1e-5)
    assert index.search(txt, 100)[1].shape == (1, 46)  # k capped at N
    tracked = txt.clone().requires_grad_(True)  # e.g. model.encode_text(...) outside torch.no_grad()
    assert torch.equal(index.search(tracked, 10)[1], index.search(txt, 10)[1])

    capsys.readouterr()
    assert main(["index", "query", str(idx), "--query", QUERY, "--top-k", "5"]) == 0
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.strip()[:1].isdigit()]
    assert [int(ln[0]) for ln in lines] == [1, 2, 3, 4, 5]
    assert [Path(ln[2]) for ln in lines] == [files[i] for i in expected.indices[:5].tolist()]


@pytest.mark.slow
def test_interrupted_build_resumes_to_an_identical_index(run, tmp_path, monkeypatch):
    images, ckpt, idx = run
    model, cfg, _ = load_run(ckpt)
    calls = {"n": 0, "crash_at": 4}
    encode = model.encode_image_features

    def flaky(batch):  # call 1 is the single-vector probe, then one call per batch
        calls["n"] += 1
        if calls["n"] == calls["crash_at"]:
            raise KeyboardInterrupt  # Ctrl-C while the 3rd batch is encoded
        return encode(batch)

    monkeypatch.setattr(model, "encode_image_features", flaky)
    kwargs = dict(checkpoint=ckpt, model_name="tiny_vse", image_size=cfg.data.image_size, batch_size=8)
    with pytest.raises(KeyboardInterrupt):
        build_index(model, images, tmp_path / "idx", **kwargs)
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert (meta["done"], meta["rows"], meta["complete"]) == (16, 16, False)
    with pytest.raises(DataError, match="unfinished"):
        load_index(tmp_path / "idx")

    calls["n"], calls["crash_at"] = 0, -1
    meta = build_index(model, images, tmp_path / "idx", **kwargs)
    assert calls["n"] == 1 + 4  # probe + the 30 remaining images in batches of 8: no work redone
    assert meta["count"] == 46 and meta["complete"]
    assert (tmp_path / "idx" / "embeddings.npy").read_bytes() == (idx / "embeddings.npy").read_bytes()
    assert (tmp_path / "idx" / "paths.json").read_text() == (idx / "paths.json").read_text()
    calls["n"] = 0
    build_index(model, images, tmp_path / "idx", **kwargs)  # finished: nothing to do
    assert calls["n"] == 1


@pytest.mark.slow
def test_unreadable_image_is_reported_and_skipped(run, tmp_path, capsys):
    images, ckpt, _ = run
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    files = sorted(images.glob("*.png"))[:9]
    for f in files[:5]:
        shutil.copy(f, folder / f.name)
    for f in files[5:]:
        shutil.copy(f, folder / "sub" / f.name)  # recursive listing
    (folder / "000002_bad.png").write_bytes(b"not a png")  # sorts into the first batch
    (folder / "notes.txt").write_text("not an image")  # ignored by extension
    out = tmp_path / "idx"
    assert main(["index", "build", str(ckpt), str(folder), "--out", str(out), "--batch-size", "4"]) == 0
    assert "skipped 1 unreadable image(s): 000002_bad.png" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert [Path(s["path"]).name for s in meta["skipped"]] == ["000002_bad.png"]
    assert "000002_bad.png" in meta["skipped"][0]["error"] and meta["count"] == 9
    paths = json.loads((out / "paths.json").read_text())
    good = sorted([folder / f.name for f in files[:5]] + [folder / "sub" / f.name for f in files[5:]])
    assert paths == [p.relative_to(folder).as_posix() for p in good]
    emb = np.load(out / "embeddings.npy")  # packed: row i is paths[i]
    torch.testing.assert_close(torch.from_numpy(emb), brute_force_images(ckpt, good), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_build_refuses_a_folder_of_other_inputs_and_non_single_vector_models(run, tmp_path, capsys):
    images, ckpt, idx = run
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(next(images.glob("*.png")), other)
    assert main(["index", "build", str(ckpt), str(other), "--out", str(idx)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(idx) in err[0] and "another" in err[0]

    class Tokens(nn.Module):  # a fusion-style model: embed plus token features
        def encode_image_features(self, batch):
            return {"embed": torch.ones(len(batch["image"]), 4) / 2, "tokens": torch.zeros(len(batch["image"]), 3, 4)}

    class Unnormalised(nn.Module):
        def encode_image_features(self, batch):
            return {"embed": torch.ones(len(batch["image"]), 4)}

    with pytest.raises(ModelError, match="fusion_toy cannot be indexed.*'tokens'"):
        embed_dim_of(Tokens(), 32, "fusion_toy")
    with pytest.raises(ModelError, match="not l2-normalised"):
        embed_dim_of(Unnormalised(), 32, "raw_toy")


@pytest.mark.slow
def test_query_writes_gallery_and_html(run, tmp_path):
    _, _, idx = run
    for name in ("g.png", "g.html"):
        assert main(["index", "query", str(idx), "--query", QUERY, "--top-k", "3", "--out", str(tmp_path / name)]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size[0] > 3 * 128
    page = (tmp_path / "g.html").read_text()
    assert page.count("<section") == 1 and page.count("data:image/png;base64,") == 3


@pytest.mark.slow
def test_faiss_and_torch_backends_agree(run, tmp_path, monkeypatch, capsys):
    images, ckpt, idx = run
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if faiss were not installed
    assert main(["index", "query", str(idx), "--query", QUERY, "--backend", "faiss"]) == 2
    assert "pip install faiss-cpu" in capsys.readouterr().err
    monkeypatch.undo()
    pytest.importorskip("faiss")
    copy = tmp_path / "idx"
    shutil.copytree(idx, copy)
    assert main(["index", "build", str(ckpt), str(images), "--out", str(copy), "--backend", "faiss"]) == 0
    assert (copy / "index.faiss").is_file()
    queries = torch.cat([brute_force_text(ckpt, q) for q in (QUERY, "a green triangle", "two small shapes")])
    ts, ti = load_index(idx).search(queries, 12)
    for path in (copy, idx):  # saved at build time, and built at query time
        fs, fi = load_index(path).search(queries, 12, backend="faiss")
        assert torch.equal(fi, ti)
        torch.testing.assert_close(fs, ts, atol=1e-5, rtol=1e-5)


def _image_files(tmp_path: Path, n: int) -> list[Path]:
    from PIL import Image

    paths = []
    for i in range(n):
        p = tmp_path / f"img_{i}.png"
        Image.new("RGB", (20, 12), (40 * i % 255, 90, 200)).save(p)
        paths.append(p)
    return paths


def test_html_report_sections_escaping_matches_and_ranks(tmp_path):
    torch.manual_seed(0)
    paths = _image_files(tmp_path, 6)
    captions = ["a <script>alert(1)</script> cat", "a dog & a ball", "plain", "another", "last one"]
    t2i = torch.tensor([0, 1, 2, 3, 4])
    scores = torch.randn(6, 5)  # (N_img, N_txt)
    scores[0, 0] = 9.0  # caption 0: its image first
    scores[1, 1] = -9.0  # caption 1: its image last (rank 6, outside the top 3)
    ranks = [int((scores[:, t] >= scores[t2i[t], t]).sum()) for t in range(5)]  # brute force, 1-based
    out = report_from_scores(tmp_path / "r.html", scores, captions, paths, t2i, top_k=3, max_queries=4)
    page = out.read_text()
    assert page.count("<section") == 4  # max_queries
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "dog &amp; a ball" in page
    shown = [int(r) for r in re.findall(r"rank of the true match: <b>(\d+)</b>", page)]
    worst_first = sorted(range(5), key=lambda t: (-ranks[t], t))[:4]
    assert shown == [ranks[t] for t in worst_first] and shown[0] == 6
    assert "outside the top 3" in page and "true match #6" in page  # the missed image is drawn after the top-k
    assert all(sec.count('class="match"') == 1 for sec in page.split("<section")[1:])  # in or after the top-k
    first = report_from_scores(tmp_path / "f.html", scores, captions, paths, t2i, top_k=3, sort="first").read_text()
    sec0 = first.split("<section")[1]
    assert "rank of the true match: <b>1</b>" in sec0 and sec0.count('class="match"') == 1  # green-framed top-1
    assert sec0.index('class="match"') < sec0.index('class="other"')


def test_html_report_is_self_contained_and_survives_unreadable_images(tmp_path):
    import base64
    import io

    from PIL import Image

    paths = _image_files(tmp_path, 2)
    Image.new("RGB", (300, 200)).save(paths[1])  # shrunk to a 128 px thumbnail; small ones stay small
    bad = tmp_path / "gone.png"
    results = [[(paths[0], 0.9, True), (bad, 0.5, False)], [(paths[1], 0.1, False)]]
    page = write_html_report(tmp_path / "w.html", ["q1", "q2 <b>"], results, None, "t <i>").read_text()
    assert page.count("<section") == 2 and "<b>q2" not in page and "t &lt;i&gt;" in page
    assert "rank of the true match" not in page and "unreadable<br>gone.png" in page
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    sizes = [Image.open(io.BytesIO(base64.b64decode(u))).size for u in uris]
    assert sizes == [(20, 12), (128, 85)]
    assert 'src="http' not in page and 'src="/' not in page  # nothing linked from outside the file


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_exact_topk_equals_brute_force_over_the_stored_rows(dtype, monkeypatch):
    from crossmatch.search import index as index_mod

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((5000, 32)).astype(np.float32)
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(dtype)  # (N, E) as stored
    q = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((7, 32)).astype(np.float32)), dim=1)
    ref = q.double() @ torch.from_numpy(rows.astype(np.float64)).t()  # (Q, N) float64 brute force, stored values
    expected = ref.topk(25, dim=1)
    for chunk, buffer_bytes in ((0, index_mod.SCORE_BUFFER_BYTES), (300, 7 * 4 * 900), (5000, 4 * 7 * 5000)):
        monkeypatch.setattr(index_mod, "SCORE_BUFFER_BYTES", buffer_bytes)  # 900 rows per top-k: 6 groups merged
        scores, ids = index_mod.exact_topk(rows, q, 25, chunk)
        assert torch.equal(ids, expected.indices)  # random data: no two scores within float32 rounding
        # A float32 dot product of unit vectors: |error| <= E * 2^-24 * sum|q_i x_i| <= 32 * 2^-24 < 2e-6.
        torch.testing.assert_close(scores.double(), expected.values, atol=2e-6, rtol=0)


@pytest.mark.slow
def test_float16_index_halves_the_file_and_keeps_the_top_results(run, tmp_path, capsys):
    images, ckpt, idx = run
    out = tmp_path / "idx16"
    assert main(["index", "build", str(ckpt), str(images), "--out", str(out), "--dtype", "float16"]) == 0
    assert "float16) into" in capsys.readouterr().out
    emb32, emb16 = np.load(idx / "embeddings.npy"), np.load(out / "embeddings.npy")
    assert emb16.dtype == np.float16 and np.array_equal(emb16, emb32.astype(np.float16))  # same rows, rounded
    assert json.loads((out / "meta.json").read_text())["dtype"] == "float16"
    assert (out / "embeddings.npy").stat().st_size < 0.6 * (idx / "embeddings.npy").stat().st_size
    queries = torch.cat([brute_force_text(ckpt, q) for q in (QUERY, "a green triangle", "two small shapes")])
    s16, i16 = load_index(out).search(queries, 10)
    ref = queries.double() @ torch.from_numpy(emb16.astype(np.float64)).t()  # exact over the stored halves
    assert torch.equal(i16, ref.topk(10, dim=1).indices)
    s32, i32 = load_index(idx).search(queries, 10)
    assert torch.equal(i16[:, 0], i32[:, 0])  # top-1 agrees; scores differ by the float16 rounding only
    torch.testing.assert_close(s16, s32, atol=2e-3, rtol=0)  # |x16 - x| <= 2^-11 |x| per element, unit vectors
    with pytest.raises(DataError, match="holds a float16 index, not float32"):
        build_index(*load_run(ckpt)[:1], images, out, checkpoint=ckpt, model_name="tiny_vse", image_size=32)


@pytest.mark.slow
def test_several_queries_are_answered_in_one_pass(run, tmp_path, capsys, monkeypatch):
    from crossmatch.search import index as index_mod

    _, ckpt, idx = run
    calls = []
    real = index_mod.exact_topk
    monkeypatch.setattr(index_mod, "exact_topk", lambda rows, q, *a: calls.append(q.shape) or real(rows, q, *a))
    texts = [QUERY, "a green triangle"]
    capsys.readouterr()
    assert main(["index", "query", str(idx), "--query", texts[0], "--query", texts[1], "--top-k", "3"]) == 0
    assert calls == [(2, 16)]  # both queries in one search call
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"query: {texts[0]}" and out[4] == f"query: {texts[1]}" and len(out) == 8
    single = out[1:4]
    capsys.readouterr()
    assert main(["index", "query", str(idx), "--query", texts[0], "--top-k", "3"]) == 0
    assert capsys.readouterr().out.splitlines() == single  # the same hits as alone
    two = ["--query", texts[0], "--query", texts[1]]
    assert main(["index", "query", str(idx), *two, "--out", str(tmp_path / "g.png")]) == 2  # a gallery shows one
    assert main(["index", "query", str(idx), *two, "--out", str(tmp_path / "g.html")]) == 0
    assert (tmp_path / "g.html").read_text().count("<section") == 2
