"""Approximate indexes (crossmatch.search.ann): faiss keys against exact search on tiny indexes, the key's
training-row floor, search parameters, merge, clip-retrieval export, and the `index` commands end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from crossmatch.cli.main import main
from crossmatch.errors import ConfigError, DataError
from crossmatch.search.ann import (
    ANN_FILE,
    Searcher,
    build_ann,
    evaluate_ann,
    export_clip_retrieval,
    merge_indexes,
    min_train_rows,
    recall_at_k,
)
from crossmatch.search.index import exact_topk, load_index
from tests.helpers import ROOT, train_args

faiss = pytest.importorskip("faiss")


def make_index(folder: Path, rows: np.ndarray, checkpoint: str = "/models/a.pt", image_dir: str = "/photos") -> Path:
    """A finished index folder holding `rows` (N, E), as `index build` leaves it."""
    folder.mkdir(parents=True)
    np.save(folder / "embeddings.npy", rows)
    (folder / "paths.json").write_text(json.dumps([f"img{i:04d}.jpg" for i in range(len(rows))]))
    meta = {"checkpoint": checkpoint, "model": "tiny_vse", "image_dir": image_dir, "image_size": 32,
            "embed_dim": rows.shape[1], "files": len(rows), "fingerprint": folder.name, "dtype": str(rows.dtype),
            "done": len(rows), "rows": len(rows), "count": len(rows), "skipped": [], "complete": True}  # fmt: skip
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def unit_rows(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)  # (n, E) l2-normalised, as index rows are


def test_min_train_rows_is_39_per_centroid_of_the_largest_kmeans():
    assert min_train_rows("Flat") == 0 and min_train_rows("HNSW32") == 0
    assert min_train_rows("IVF4,Flat") == 156
    assert min_train_rows("IVF4096,PQ32x4fs,RFlat") == 39 * 4096
    assert min_train_rows("OPQ16,IVF16,PQ16") == 39 * 256  # PQ codes are 8 bits unless stated
    assert min_train_rows("IVF4,PQ4x4") == 39 * 16


def test_recall_at_k_counts_shared_ids():
    exact = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    approx = torch.tensor([[1, 0, 9, 3], [8, 9, 6, 5]])
    assert recall_at_k(approx, exact, 1) == 0.0  # neither first id is the exact first
    assert recall_at_k(approx, exact, 2) == 0.5  # {0, 1} both found, {4, 5} none
    assert recall_at_k(approx, exact, 4) == (3 + 2) / 8


def test_flat_is_exact_and_ivf_probing_every_list_is_exact(tmp_path):
    index = load_index(make_index(tmp_path / "idx", unit_rows(400)))
    q = torch.from_numpy(unit_rows(20, seed=1))  # (20, E)
    exact_s, exact_i = exact_topk(index.embeddings, q, 10)
    flat_s, flat_i = Searcher(index).search(q, 10)  # key Flat: the exact search itself
    assert torch.equal(flat_i, exact_i) and torch.equal(flat_s, exact_s)

    assert build_ann(index, "IVF4,Flat", train_rows=200) == {"index_key": "IVF4,Flat", "train_rows": 200, "rows": 400}
    ivf = Searcher(load_index(index.root), "nprobe=4")  # all 4 lists probed: every row scored
    assert ivf.ann.metric_type == faiss.METRIC_INNER_PRODUCT
    s, i = ivf.search(q, 10)
    assert torch.equal(i, exact_i)
    torch.testing.assert_close(s, exact_s, atol=1e-5, rtol=0)  # faiss' own GEMM: last bits differ
    report = evaluate_ann(ivf, {"text": q, "image": torch.from_numpy(unit_rows(5, seed=2))})
    assert report["text"]["recall@1"] == report["text"]["recall@10"] == report["text"]["recall@100"] == 1.0
    assert report["image"]["queries"] == 5 and report["image"]["recall@100"] == 1.0
    one = evaluate_ann(Searcher(load_index(index.root), "nprobe=1"), {"text": q})
    assert one["text"]["recall@10"] < 0.9  # one list of four: most true neighbours are elsewhere


def test_hnsw_recall_and_rekeying_to_flat(tmp_path):
    index = load_index(make_index(tmp_path / "idx", unit_rows(300)))
    assert build_ann(index, "HNSW16")["train_rows"] == 0  # a graph needs no training
    q = torch.from_numpy(unit_rows(30, seed=3))
    report = evaluate_ann(Searcher(load_index(index.root), "efSearch=300"), {"text": q})
    assert report["text"]["recall@10"] >= 0.95  # ef = N explores (nearly) the whole graph
    build_ann(load_index(index.root), "Flat")
    assert not (index.root / ANN_FILE).exists() and load_index(index.root).meta["ann"]["index_key"] == "Flat"


def test_too_few_rows_bad_key_and_bad_params_are_refused(tmp_path):
    index = load_index(make_index(tmp_path / "idx", unit_rows(300)))
    with pytest.raises(ConfigError, match="IVF8,Flat needs at least 312 training rows.*the index has 300 rows"):
        build_ann(index, "IVF8,Flat")
    with pytest.raises(ConfigError, match="--train-rows is 100"):
        build_ann(index, "IVF4,Flat", train_rows=100)
    with pytest.raises(ConfigError, match="could not parse index string IVFx"):
        build_ann(index, "IVFx")
    with pytest.raises(ConfigError, match="key Flat"):
        Searcher(index, "nprobe=4")  # exact search has nothing to tune
    build_ann(index, "IVF2,Flat")
    for params, reason in [("nprobe=abc", "not name=number"), ("efSearch=9", "could not set parameter efSearch")]:
        with pytest.raises(ConfigError, match=reason):
            Searcher(load_index(index.root), params)


def test_merge_concatenates_rows_and_refuses_another_model(tmp_path):
    a, b = unit_rows(50, seed=4), unit_rows(70, seed=5)
    ia = make_index(tmp_path / "a", a, image_dir="/photos/2024")
    ib = make_index(tmp_path / "b", b, image_dir="/photos/2025")
    merged = merge_indexes([ia, ib], tmp_path / "ab")
    assert np.array_equal(np.asarray(merged.embeddings), np.concatenate([a, b]))
    # the sources' common parent, stored relative to the merged index (as every index stores its paths)
    assert merged.meta["image_dir"] == os.path.relpath("/photos", merged.root.resolve())
    assert str(merged.resolve(merged.meta["image_dir"])) == "/photos" and merged.paths[0] == "2024/img0000.jpg"
    assert str(merged.image_path(50)) == "/photos/2025/img0000.jpg"
    build_ann(merged, "IVF2,Flat")
    assert Searcher(load_index(merged.root)).ann.ntotal == 120

    other = make_index(tmp_path / "c", b, checkpoint="/models/b.pt")
    with pytest.raises(DataError, match=r"another model \(checkpoint '/models/b.pt'"):
        merge_indexes([ia, other], tmp_path / "ac")
    assert main(["index", "merge", str(ia), "--out", str(tmp_path / "x")]) == 2


def test_export_clip_retrieval_layout(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    rows = unit_rows(5)
    index = load_index(make_index(tmp_path / "idx", rows))
    export_clip_retrieval(index, tmp_path / "emb", rows_per_file=3)
    first, second = np.load(tmp_path / "emb/img_emb/img_emb_0.npy"), np.load(tmp_path / "emb/img_emb/img_emb_1.npy")
    assert first.dtype == np.float16 and first.shape == (3, 16) and second.shape == (2, 16)
    assert np.array_equal(np.concatenate([first, second]), rows.astype(np.float16))
    paths = pq.read_table(tmp_path / "emb/metadata/metadata_1.parquet").column("image_path").to_pylist()
    assert paths == ["/photos/img0003.jpg", "/photos/img0004.jpg"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(shapes dataset, checkpoint) of a 2-step tiny run."""
    from crossmatch.data.shapes import generate_shapes

    tmp = tmp_path_factory.mktemp("ann")
    generate_shapes(tmp / "data", n_train=30, n_val=8, n_test=8, size=32, workers=1)
    assert main(train_args(tmp / "data", tmp / "run", "train.epochs=1", "train.max_steps_per_epoch=2")) == 0
    return tmp / "data", tmp / "run" / "checkpoints" / "last.pt"


def _ranked(out: str) -> list[str]:
    return [ln.split()[2] for ln in out.splitlines() if ln.strip()[:1].isdigit()]


@pytest.mark.slow
def test_index_commands_end_to_end(trained, tmp_path, capsys):
    data, ckpt = trained
    images = str(data / "images")
    assert main(["index", "build", str(ckpt), images, "--out", str(tmp_path / "flat")]) == 0
    capsys.readouterr()
    query = ["--query", "a red circle", "--top-k", "5"]
    assert main(["index", "query", str(tmp_path / "flat"), *query]) == 0
    exact = _ranked(capsys.readouterr().out)
    assert len(exact) == 5

    build = ["index", "build", str(ckpt), images, "--out", str(tmp_path / "ivf")]
    assert main([*build, "--index-key", "IVF2,Flat"]) == 2  # 46 images < 78 training rows
    assert f"needs at least 78 training rows ({39} per centroid); {images} holds 46 rows" in capsys.readouterr().err
    assert not (tmp_path / "ivf").exists()  # refused before embedding anything
    assert main([*build, "--index-key", "HNSW8"]) == 0
    rows = (tmp_path / "ivf" / "embeddings.npy").stat().st_mtime_ns
    assert main([*build, "--index-key", "IVF1,Flat"]) == 0  # re-keyed: the embedded rows are kept as they are
    assert (tmp_path / "ivf" / "embeddings.npy").stat().st_mtime_ns == rows
    assert main(build) == 0  # build again without a key: the index keeps its own
    assert json.loads((tmp_path / "ivf" / "meta.json").read_text())["ann"]["index_key"] == "IVF1,Flat"
    assert main(["index", "query", str(tmp_path / "ivf"), *query, "--search-params", "nprobe=1"]) == 0
    assert _ranked(capsys.readouterr().out) == exact  # one list holds every row: exact
    assert main(["index", "query", str(tmp_path / "ivf"), *query, "--search-params", "nprobe=x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("crossmatch: error: --search-params nprobe=x")

    assert main(["index", "eval", str(tmp_path / "ivf"), "--data", str(data), "--split", "test"]) == 0
    table = capsys.readouterr().out
    assert "text" in table and "image" in table
    saved = json.loads((tmp_path / "ivf" / "meta.json").read_text())["ann_eval"]
    assert saved["text"]["queries"] == 8 * 5  # the split's captions, 5 per image
    assert saved["text"]["recall@10"] == saved["image"]["recall@10"] == 1.0 and saved["image"]["queries"] == 8

    queries = tmp_path / "q.txt"
    queries.write_text(f"a red circle\n{sorted((data / 'images').glob('*.png'))[0]}\n")
    assert main(["index", "eval", str(tmp_path / "ivf"), "--queries", str(queries)]) == 0
    saved = json.loads((tmp_path / "ivf" / "meta.json").read_text())["ann_eval"]
    assert (saved["text"]["queries"], saved["image"]["queries"]) == (1, 1)


def test_index_search_benchmark_measures_approximate_keys(tmp_path, monkeypatch, capsys):
    import runpy

    argv = ["index_search.py", "--rows", "400", "--dim", "16", "--ann-only", "--ann-queries", "20"]
    argv += ["--ann", "IVF2,Flat|nprobe=2", "--ann", "IVF2,Flat|nprobe=1", "--dir", str(tmp_path)]
    monkeypatch.setattr("sys.argv", argv)
    runpy.run_path(str(ROOT / "benchmarks" / "index_search.py"), run_name="__main__")
    rows = {ln.split()[1]: ln.split()[-3:] for ln in capsys.readouterr().out.splitlines() if "IVF2,Flat" in ln}
    assert rows["nprobe=2"] == ["1.0000", "1.0000", "1.0000"]  # both lists probed: exact, for every query set
    assert rows["nprobe=1"] != rows["nprobe=2"]  # half the rows unseen: some true neighbours missed


def test_export_and_merge_commands(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    a = make_index(tmp_path / "a", unit_rows(60, seed=6), image_dir="/photos/a")
    b = make_index(tmp_path / "b", unit_rows(40, seed=7), image_dir="/photos/b")
    assert main(["index", "merge", str(a), str(b), "--out", str(tmp_path / "ab"), "--index-key", "IVF2,Flat"]) == 0
    assert "merged 2 indexes: 100 rows" in capsys.readouterr().out
    assert (
        main(["index", "export", str(tmp_path / "ab"), "--format", "clip-retrieval", "--out", str(tmp_path / "e")]) == 0
    )
    assert np.load(tmp_path / "e" / "img_emb" / "img_emb_0.npy").shape == (100, 16)
    build_ann(load_index(a), "IVF1,Flat")
    build_ann(load_index(b), "IVF1,Flat")
    assert main(["index", "merge", str(a), str(b), "--out", str(tmp_path / "ab2")]) == 0
    assert load_index(tmp_path / "ab2").meta["ann"]["index_key"] == "IVF1,Flat"  # the sources' shared key
    capsys.readouterr()
    assert main(["index", "merge", str(a), str(b), "--out", str(tmp_path / "ab")]) == 2  # never over an index
    assert capsys.readouterr().err == f"crossmatch: error: --out {tmp_path / 'ab'} is not empty; choose a new folder\n"
