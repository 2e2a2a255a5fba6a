"""Approximate search over an index folder through faiss (Johnson et al., "Billion-scale similarity search
with GPUs", IEEE TBD 2019): any `index_factory` key (IVF-Flat, IVF-PQ with a refine stage, HNSW, OPQ),
always with the inner-product metric, since index rows and queries are l2-normalised and a pair's score is
their inner product (index_factory's default is L2).

The exact rows (`embeddings.npy`) stay the source of truth; the approximate structure is a second file,
`ann.faiss`, described by meta["ann"] = {"index_key", "train_rows", "rows"}. Key `Flat` means no such file:
search is the exact one of `crossmatch.search.index`. So an index can be re-keyed without re-embedding,
merged by concatenating exact rows, and measured against exact search (`evaluate_ann`: recall@k of the
approximate top-k against the exact top-k, for text and for image queries, since a quantizer trained on
image vectors can serve text queries worse: the modality gap).

Legend: N indexed rows, E embedding, Q queries, k results per query.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from crossmatch.errors import ConfigError, DataError, install_hint
from crossmatch.files import write_text
from crossmatch.search.index import (
    EMBEDDINGS,
    META,
    PATHS,
    SEARCH_CHUNK,
    Index,
    exact_topk,
    load_index,
    stored_path,
)

log = logging.getLogger(__name__)

ANN_FILE = "ann.faiss"
EXACT_KEY = "Flat"  # today's exact search: no ann.faiss
TRAIN_ROWS = 100_000  # default training sample; k-means wants 39 to 256 points per centroid
POINTS_PER_CENTROID = 39  # faiss warns below this many training points per centroid: refuse instead
RECALL_KS = (1, 10, 100)
SAME_MODEL_KEYS = ("checkpoint", "model", "embed_dim", "image_size", "preprocess", "weights_sha256")


def import_faiss():
    try:
        import faiss
    except ImportError as err:
        raise ConfigError(f"approximate indexes need the faiss package: {install_hint('index')}") from err
    return faiss


def _faiss_reason(err: Exception) -> str:
    """The readable tail of a faiss RuntimeError ("Error in <signature> at file:line: reason")."""
    first = (str(err).splitlines() or [type(err).__name__])[0]
    return first.rsplit(": ", 1)[-1].strip() if " at " in first else first


def min_train_rows(key: str) -> int:
    """Training rows a factory key needs: 39 per centroid of its largest k-means (IVF lists, 2**bits PQ
    codes per sub-quantizer: 8 bits by default, 4 for the fast-scan `fs` codes); 0 for untrained keys."""
    centroids = [int(n) for n in re.findall(r"IVF(\d+)", key)]
    for m in re.finditer(r"(?<![A-Za-z])PQ(\d+)(?:x(\d+))?(fs)?", key):
        bits = int(m.group(2)) if m.group(2) else (4 if m.group(3) else 8)
        centroids.append(2**bits)
    return POINTS_PER_CENTROID * max(centroids, default=0)


def new_ann(key: str, dim: int):
    """An empty faiss index of `key` over E=dim with the inner-product metric; a bad key is a ConfigError."""
    faiss = import_faiss()
    try:
        return faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ConfigError(f"--index-key {key}: faiss cannot build it ({_faiss_reason(err)})") from err


def parse_search_params(text: str | None) -> str:
    """Check faiss ParameterSpace syntax `name=number[,name=number]` ("nprobe=64,efSearch=128")."""
    if not text:
        return ""
    for item in text.split(","):
        name, eq, value = item.partition("=")
        try:
            float(value)
        except ValueError:
            eq = ""
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name.strip()):
            raise ConfigError(f"--search-params {text}: {item!r} is not name=number (e.g. nprobe=64,efSearch=128)")
    return text.replace(" ", "")


def _rows(index: Index, start: int, stop: int) -> np.ndarray:
    return np.ascontiguousarray(index.embeddings[start:stop], dtype=np.float32)  # (C, E) float32


def check_train_rows(key: str, rows: int, train_rows: int, what: str = "the index has") -> int:
    """The training sample size of `key` over `rows` rows; ConfigError when it is too small for the key."""
    if train_rows < 1:
        raise ConfigError(f"--train-rows {train_rows}: must be at least 1")
    need, sample = min_train_rows(key), min(rows, train_rows)
    if sample < need:
        which = f"{what} {rows} rows" if rows < need else f"--train-rows is {train_rows}"
        raise ConfigError(
            f"--index-key {key} needs at least {need} training rows ({POINTS_PER_CENTROID} per centroid); "
            f"{which}: use fewer lists/bits or the exact key Flat"
        )
    return sample


def train_ann(index: Index, key: str, train_rows: int = TRAIN_ROWS, seed: int = 0) -> tuple[Any, int]:
    """An in-memory faiss index of `key` over every row, trained on a random sample of `train_rows` rows,
    and the number of rows it was trained on (0 for keys without training, such as HNSW).

    Raises:
        ConfigError: a bad key, or fewer rows (or --train-rows) than the key's k-means needs.
    """
    ann = new_ann(key, index.embeddings.shape[1])
    n = len(index)
    sample = check_train_rows(key, n, train_rows)
    trained = 0
    try:
        if not ann.is_trained:
            pick = np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
            ann.train(np.ascontiguousarray(index.embeddings[pick], dtype=np.float32))  # (sample, E)
            trained = sample
        for s in range(0, n, SEARCH_CHUNK):
            ann.add(_rows(index, s, min(n, s + SEARCH_CHUNK)))
    except RuntimeError as err:
        raise ConfigError(f"--index-key {key}: faiss failed ({_faiss_reason(err)})") from err
    return ann, trained


def build_ann(index: Index, key: str, train_rows: int = TRAIN_ROWS, seed: int = 0) -> dict[str, Any]:
    """`train_ann`, then write `ann.faiss` and record it in meta.json (key `Flat`: remove any ann.faiss).
    Returns the new meta["ann"]."""
    key = key.strip()
    ann_path = index.root / ANN_FILE
    if key == EXACT_KEY:
        ann_path.unlink(missing_ok=True)
        return _record(index, {"index_key": EXACT_KEY, "train_rows": 0, "rows": len(index)})
    ann, trained = train_ann(index, key, train_rows, seed)
    tmp = ann_path.with_suffix(".tmp")
    import_faiss().write_index(ann, str(tmp))
    os.replace(tmp, ann_path)  # a reader never sees half an index
    return _record(index, {"index_key": key, "train_rows": trained, "rows": len(index)})


def _record(index: Index, ann: dict[str, Any]) -> dict[str, Any]:
    """meta["ann"] = ann (a new structure invalidates an old evaluation), written atomically."""
    index.meta = {k: v for k, v in index.meta.items() if k != "ann_eval"}
    index.meta["ann"] = ann
    write_text(index.root / META, json.dumps(index.meta, indent=2))
    return ann


def index_key(index: Index) -> str:
    return index.meta.get("ann", {}).get("index_key", EXACT_KEY)


class Searcher:
    """An index opened for queries: its approximate structure (loaded once) with `search_params` applied,
    or the exact search for key Flat. search(q (Q, E), k) -> scores (Q, k), ids (Q, k), best first; an
    approximate search that finds fewer than k rows pads with id -1 and score -inf."""

    def __init__(self, index: Index, search_params: str | None = None, backend: str = "torch", ann=None, key=""):
        """`ann`, `key`: an in-memory structure (`train_ann`) to search instead of the index's own."""
        self.index, self.key, self.backend = index, key or index_key(index), backend
        self.params = parse_search_params(search_params)
        self.ann = ann
        if self.key == EXACT_KEY:
            if self.params:
                raise ConfigError(f"--search-params {self.params}: index {index.root} is exact (key Flat)")
            return
        faiss = import_faiss()
        path = index.root / ANN_FILE
        if self.ann is None and not path.is_file():
            raise DataError(f"index {index.root}: meta.json names key {self.key} but {ANN_FILE} is missing")
        if self.ann is None:
            self.ann = faiss.read_index(str(path))
        if self.ann.ntotal != len(index):
            raise DataError(f"index {index.root}: {ANN_FILE} holds {self.ann.ntotal} rows, the index {len(index)}")
        if self.params:
            try:
                faiss.ParameterSpace().set_index_parameters(self.ann, self.params)
            except RuntimeError as err:
                raise ConfigError(f"--search-params {self.params}: {_faiss_reason(err)} for key {self.key}") from err

    def search(self, q: Tensor | np.ndarray, k: int) -> tuple[Tensor, Tensor]:
        if self.ann is None:
            return self.index.search(q, k, self.backend)
        q = np.ascontiguousarray(torch.as_tensor(q).float().cpu().numpy())  # (Q, E)
        if q.ndim != 2 or q.shape[1] != self.ann.d:
            raise DataError(f"query embeddings {q.shape} do not fit index {self.index.root} (E={self.ann.d})")
        scores, ids = self.ann.search(q, min(k, len(self.index)))  # (Q, k) each
        scores[ids < 0] = -np.inf
        return torch.from_numpy(scores), torch.from_numpy(ids).long()


def recall_at_k(approx: Tensor, exact: Tensor, k: int) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k (ids (Q, >=k) each, best first)."""
    k = min(k, exact.shape[1])
    hits = sum(len(set(a[:k].tolist()) & set(e[:k].tolist())) for a, e in zip(approx, exact, strict=True))
    return hits / (k * len(exact))


def _one_at_a_time(search, q: Tensor, k: int) -> tuple[Tensor, float]:
    """ids (Q, k) of the queries searched one by one (as a service sees them) and the queries/s."""
    t0 = time.perf_counter()
    ids = torch.cat([search(q[i : i + 1], k)[1] for i in range(len(q))])  # (Q, k)
    return ids, len(q) / max(time.perf_counter() - t0, 1e-9)


def evaluate_ann(
    searcher: Searcher, queries: dict[str, Tensor], ks: tuple[int, ...] = RECALL_KS, exact_timed: int = 100
) -> dict[str, Any]:
    """Recall@k of `searcher` against exact search for each kind of query (e.g. {"text": (Q, E), "image":
    (Q, E)}), with the queries/s of both searched one at a time (exact timed on its first `exact_timed`)."""
    index, k_max = searcher.index, min(max(ks), len(searcher.index))
    report: dict[str, Any] = {"index_key": searcher.key, "search_params": searcher.params, "rows": len(index)}
    for kind, q in queries.items():
        if not len(q):
            continue
        q = q.float().cpu().contiguous()  # (Q, E)
        exact = exact_topk(index.embeddings, q, k_max)[1]  # (Q, k) ground truth, one batched pass
        approx, qps = _one_at_a_time(searcher.search, q, k_max)
        _, exact_qps = _one_at_a_time(lambda x, k: exact_topk(index.embeddings, x, k), q[:exact_timed], k_max)
        report[kind] = {
            "queries": len(q),
            **{f"recall@{k}": round(recall_at_k(approx, exact, k), 4) for k in ks},
            "queries_per_s": round(qps, 1),
            "exact_queries_per_s": round(exact_qps, 1),
        }
    return report


def save_evaluation(index: Index, report: dict[str, Any]) -> None:
    index.meta["ann_eval"] = report
    write_text(index.root / META, json.dumps(index.meta, indent=2))


def merge_indexes(sources: list[str | Path], out: str | Path) -> Index:
    """Concatenate the exact rows and paths of finished indexes built by the same model into a new index
    folder `out` (its image folder: the sources' common parent). Re-key it with `build_ann`.

    Raises:
        DataError: fewer than two sources, a mismatch of model or storage, or `out` already holding files.
    """
    if len(sources) < 2:
        raise DataError("index merge needs at least two indexes")
    parts = [load_index(s) for s in sources]
    first = parts[0].meta
    for p in parts[1:]:
        for key in SAME_MODEL_KEYS:
            a, b = first.get(key), p.meta.get(key)
            if key == "checkpoint":  # stored relative to each index's own folder
                a, b = str(parts[0].checkpoint.resolve()), str(p.checkpoint.resolve())
            if key == "weights_sha256" and (a is None or b is None):
                continue  # an index from before the weights hash: the checkpoint identity decides
            if a != b:
                raise DataError(
                    f"index merge: {p.root} was built with another model ({key} {b!r} vs {a!r} in {parts[0].root})"
                )
        if p.embeddings.dtype != parts[0].embeddings.dtype:
            dtypes = f"{p.embeddings.dtype}, {parts[0].root} {parts[0].embeddings.dtype}"
            raise DataError(f"index merge: {p.root} stores {dtypes}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"--out {out} is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    paths = [str(p.image_path(i).resolve()) for p in parts for i in range(len(p))]
    root = os.path.commonpath([os.path.dirname(x) for x in paths])
    n, dim = len(paths), parts[0].embeddings.shape[1]
    emb = np.lib.format.open_memmap(out / EMBEDDINGS, "w+", parts[0].embeddings.dtype, (n, dim))
    at = 0
    for p in parts:
        for s in range(0, len(p), SEARCH_CHUNK):
            block = p.embeddings[s : s + SEARCH_CHUNK]  # (C, E)
            emb[at : at + len(block)] = block
            at += len(block)
    emb.flush()
    del emb
    write_text(out / PATHS, json.dumps([os.path.relpath(x, root) for x in paths], indent=2))
    fingerprint = hashlib.sha1("|".join(p.meta.get("fingerprint", "") for p in parts).encode()).hexdigest()
    meta = {k: first[k] for k in (*SAME_MODEL_KEYS, "dtype", "max_image_pixels") if k in first}
    absolute = bool(first.get("absolute_paths", False))  # paths as the first source stores them
    skipped = [
        {**s, "path": stored_path(p.resolve(s["path"]), out, absolute)}
        for p in parts
        for s in p.meta.get("skipped", [])
    ]
    meta.update(checkpoint=stored_path(parts[0].checkpoint, out, absolute), absolute_paths=absolute)
    meta.update(image_dir=stored_path(root, out, absolute), files=n, fingerprint=fingerprint, done=n, rows=n)
    meta.update(
        count=n, complete=True, skipped=skipped, merged_from=[stored_path(p.root, out, absolute) for p in parts]
    )
    write_text(out / META, json.dumps(meta, indent=2))
    return load_index(out)


def export_clip_retrieval(index: Index, out: str | Path, rows_per_file: int = 1_000_000) -> list[Path]:
    """clip-retrieval's embedding folder (read by autofaiss and clip-retrieval): `img_emb/img_emb_I.npy`
    (float16 (n, E)) and `metadata/metadata_I.parquet` (column image_path, absolute), I = 0, 1, ...

    Raises:
        ConfigError: pyarrow missing, or rows_per_file < 1.
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ConfigError(f"--format clip-retrieval needs pyarrow: {install_hint('index')}") from err
    if rows_per_file < 1:
        raise ConfigError(f"--rows-per-file {rows_per_file}: must be at least 1")
    out = Path(out)
    (out / "img_emb").mkdir(parents=True, exist_ok=True)
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    written = []
    for i, s in enumerate(range(0, len(index), rows_per_file)):
        e = min(len(index), s + rows_per_file)
        emb = out / "img_emb" / f"img_emb_{i}.npy"
        np.save(emb, np.asarray(index.embeddings[s:e], dtype=np.float16))  # (n, E)
        table = pa.table({"image_path": [str(index.image_path(r).resolve()) for r in range(s, e)]})
        meta = out / "metadata" / f"metadata_{i}.parquet"
        pq.write_table(table, meta)
        written += [emb, meta]
    return written
