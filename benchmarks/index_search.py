"""Exact index search (`crossmatch.search.index`) against the in-memory baseline on the same shape,
measured side by side in one run.

    python benchmarks/index_search.py                 # 200k x 256 (about a minute on 2 cores)
    python benchmarks/index_search.py --full          # 1M x 256, the README's shape (1 GB float32)
    python benchmarks/index_search.py --threads 1     # one intra-op thread

Baseline: the (N, E) float32 matrix in RAM as one torch tensor, `q @ X.T` then `topk` (and `X @ q.T` with a
topk over dim 0; the faster of the two is the baseline). Index: the same rows in an index folder, opened
with `load_index` (memory-mapped) and searched with `Index.search`, stored as float32 and as float16.
"Warm" means the file is in the page cache and the index is open; each repeat round times every
contender once, interleaved, and the best round of each counts. "Cold" drops the file's pages from the
page cache (posix_fadvise DONTNEED), opens the index anew and times one search.

Recall@k of the float16 index against exact float32 search is measured on two query sets: random unit
vectors, and "near" queries (an indexed row plus noise, renormalised), whose top hits are well separated.

Approximate keys (`--ann KEY|PARAMS`, repeatable; `crossmatch.search.ann`): each is trained and filled in
memory, then measured against the exact search of the same rows, queries one at a time on one thread on
both sides: build time, size (faiss's serialised bytes), queries/s and recall@k.

    python benchmarks/index_search.py --rows 50000 --ann-only --ann "HNSW32|efSearch=64" --ann "IVF256,Flat|nprobe=16"
    python benchmarks/index_search.py --real INDEX --data DIR --split test --ann "HNSW32|efSearch=64;efSearch=128"

`KEY|P1;P2` measures several search settings (faiss ParameterSpace strings) on one build.

On synthetic rows (uniform, with `--clusters C` around C centres, or with `--like INDEX` drawn from the
Gaussian fit of a real index's rows, which keeps the decaying spectrum of a trained model's embeddings) the
query sets are "image-like" (an indexed row plus noise), "text-like" (the same, pushed along one common
direction before renormalising: a synthetic modality gap) and uniformly random. With `--real INDEX` (an
index built by `crossmatch index build`) the queries are the split's own captions and images encoded
by the index's model, as `crossmatch index eval` does: the modality gap of a real model.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from crossmatch.search.index import EMBEDDINGS, META, PATHS, load_index


def gaussian_like(index_dir: str, dim: int, sample: int = 100_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean (dim,) and a factor (dim, dim) of the Gaussian fit of a real index's rows (a random sample), in
    the coordinates of its `dim` principal axes (all of them when `dim` >= E): synthetic rows drawn from it
    have the spread of a trained model's embeddings (their decaying spectrum), not that of the uniform sphere,
    on which every neighbour is about as far as every other."""
    rows = np.load(Path(index_dir) / EMBEDDINGS, mmap_mode="r")
    pick = np.sort(np.random.default_rng(seed).choice(len(rows), min(sample, len(rows)), replace=False))
    x = np.asarray(rows[pick], dtype=np.float64)  # (S, E)
    mean, cov = x.mean(0), np.cov(x, rowvar=False)
    eigval, eigvec = np.linalg.eigh(cov)  # ascending
    keep = eigvec[:, ::-1][:, :dim]  # (E, dim) the top principal axes
    std = np.sqrt(np.clip(eigval[::-1][:dim], 0, None))
    return (mean @ keep).astype(np.float32), np.diag(std).astype(np.float32)


def write_index(
    folder: Path, n: int, e: int, dtype: str, seed: int = 0, chunk: int = 65536, clusters: int = 0, like=None
) -> Path:
    """A complete index folder of n random l2-normalised rows, generated chunk by chunk (bounded RAM): uniform
    on the sphere, with `clusters` > 0 drawn around that many random centres (noise of norm about 0.5), or
    with `like` = (mean, factor) from `gaussian_like` drawn from a real index's Gaussian fit."""
    folder.mkdir(parents=True, exist_ok=True)
    emb = np.lib.format.open_memmap(folder / EMBEDDINGS, "w+", np.dtype(dtype), (n, e))
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, e), dtype=np.float32) if clusters else None  # (C, E)
    if centres is not None:
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for s in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - s), e), dtype=np.float32)
        if like is not None:
            x = like[0] + x @ like[1].T
        elif centres is not None:
            x = centres[rng.integers(0, clusters, len(x))] + (0.5 / np.sqrt(e)) * x
        emb[s : s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    emb.flush()
    del emb
    (folder / PATHS).write_text(json.dumps([f"{i}.jpg" for i in range(n)]))
    meta = {"embed_dim": e, "count": n, "complete": True, "dtype": dtype, "image_dir": str(folder)}
    (folder / META).write_text(json.dumps(meta))
    return folder


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def queries(n_rows: np.ndarray, q: int, e: int, near: bool, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    if near:
        rows = n_rows[rng.integers(0, len(n_rows), q)].astype(np.float32)
        x = rows + 0.05 * rng.standard_normal((q, e), dtype=np.float32)
    else:
        x = rng.standard_normal((q, e), dtype=np.float32)
    return torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))  # (Q, E)


def paired_queries(rows: np.ndarray, q: int, gap: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-like queries (an indexed row plus noise of norm about 0.1) and their text-like twins: the same
    vectors shifted by `gap` along one fixed direction before renormalising, the constant offset between
    the modalities of contrastive models (Liang et al., "Mind the Gap", NeurIPS 2022). (Q, E) each."""
    rng = np.random.default_rng(seed)
    e = rows.shape[1]
    x = rows[rng.integers(0, len(rows), q)].astype(np.float32) + (0.1 / np.sqrt(e)) * rng.standard_normal((q, e))
    direction = np.random.default_rng(12345).standard_normal(e).astype(np.float32)
    t = x + gap * direction / np.linalg.norm(direction)

    def unit(v: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32))

    return unit(x), unit(t)


def ann_section(
    index, specs: list[str], query_sets: dict[str, torch.Tensor], k: int, train_rows: int, build_threads: int = 1
) -> None:
    """Build each approximate key in memory (on `build_threads` threads); print build time, size, queries/s
    (one query at a time, one thread, as the exact search it is compared with) and recall@k vs exact."""
    import faiss

    from crossmatch.search.ann import Searcher, recall_at_k, train_ann
    from crossmatch.search.index import exact_topk

    faiss.omp_set_num_threads(1)
    exact = {name: exact_topk(index.embeddings, q, k)[1] for name, q in query_sets.items()}  # ground truth
    q0 = next(iter(query_sets.values()))
    t_exact = min(
        timed(lambda: [exact_topk(index.embeddings, q0[i : i + 1], k) for i in range(len(q0))]) for _ in range(2)
    )
    names = "  ".join(f"{f'R@{k} {name}':>13s}" for name in query_sets)
    exact_qps = f"exact: {len(q0) / t_exact:.0f} q/s"
    load = os.getloadavg()[0]
    print(
        f"\napproximate keys, {len(index)} rows, one query at a time, 1 thread ({exact_qps}; "
        f"built on {build_threads} thread(s); load {load:.2f}):"
    )
    print(f"  {'key':34s} {'params':24s} {'build s':>8s} {'MiB':>8s} {'q/s':>9s} {'x exact':>8s}  {names}")
    for spec in specs:
        key, _, params = spec.partition("|")
        faiss.omp_set_num_threads(build_threads)
        t0 = time.perf_counter()
        ann, _ = train_ann(index, key, train_rows)
        built = time.perf_counter() - t0
        faiss.omp_set_num_threads(1)
        size = faiss.serialize_index(ann).size / 2**20
        for one in params.split(";") if params else [""]:  # several search settings share one build
            searcher = Searcher(index, one or None, ann=ann, key=key)
            t = min(timed(lambda s=searcher: [s.search(q0[i : i + 1], k) for i in range(len(q0))]) for _ in range(2))
            recalls = []
            for name, q in query_sets.items():
                got = torch.cat([searcher.search(q[i : i + 1], k)[1] for i in range(len(q))])  # (Q, k)
                recalls.append(f"{recall_at_k(got, exact[name], k):13.4f}")
            qps = len(q0) / t
            row = f"{built:8.1f} {size:8.1f} {qps:9.0f} {qps * t_exact / len(q0):8.1f}"
            print(f"  {key:34s} {one or '-':24s} {row}  {'  '.join(recalls)}", flush=True)


def real_queries(index, data: str, split: str, n: int) -> dict[str, torch.Tensor]:
    """The split's captions and images encoded by the index's own model (text first, as index eval)."""
    from crossmatch.retrieval.evaluate import encode_split
    from crossmatch.runs import build_eval_data, open_split
    from crossmatch.search.index import load_index_model

    model, cfg, tokenizer = load_index_model(index, None, [f"data.root={data}"])  # the model that built it
    img, txt = encode_split(model.eval(), build_eval_data(cfg, open_split(cfg, split), tokenizer, model), "cpu")
    return {"text": txt["embed"][:n].float(), "image": img["embed"][:n].float()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--full", action="store_true", help="1M x 256")
    p.add_argument("--queries", default="1,32", help="query batch sizes (comma separated)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    p.add_argument("--dir", default=None, help="where to write the index folders (default: a temp dir)")
    p.add_argument("--ann", action="append", default=[], help="approximate key[|search params] (repeatable)")
    p.add_argument("--ann-only", action="store_true", help="skip the exact-search sections")
    p.add_argument("--ann-queries", type=int, default=500, help="queries of each set for the approximate keys")
    p.add_argument("--train-rows", type=int, default=100_000, help="training sample of the approximate keys")
    p.add_argument("--build-threads", type=int, default=1, help="faiss threads building the approximate keys")
    p.add_argument("--gap", type=float, default=0.8, help="synthetic modality gap of the text-like queries")
    p.add_argument("--clusters", type=int, default=0, help="synthetic rows around this many centres (0: uniform)")
    p.add_argument(
        "--like", default=None, help="synthetic rows from the Gaussian fit of this index's rows (top --dim axes)"
    )
    p.add_argument("--real", default=None, help="an index built by `crossmatch index build` (with --data)")
    p.add_argument("--data", default=None, help="with --real: dataset whose split's captions/images are queries")
    p.add_argument("--split", default="test", help="with --real: the split")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.real:
        torch.set_num_threads(1)
        index = load_index(args.real)
        ann_section(
            index,
            args.ann,
            real_queries(index, args.data, args.split, args.ann_queries),
            args.k,
            args.train_rows,
            args.build_threads,
        )
        return
    n, e = (1_000_000, 256) if args.full else (args.rows, args.dim)
    like = gaussian_like(args.like, e) if args.like else None
    if like is not None:
        e = like[0].shape[0]  # the index's own width when --dim exceeds it
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(dir=args.dir)
    root = Path(tmp.name)
    t0 = time.perf_counter()
    f32 = write_index(root / "f32", n, e, "float32", clusters=args.clusters, like=like)
    f16 = write_index(root / "f16", n, e, "float16", clusters=args.clusters, like=like)
    print(
        f"index {n} x {e}: float32 {n * e * 4 / 2**20:.0f} MiB, float16 {n * e * 2 / 2**20:.0f} MiB "
        f"(written in {time.perf_counter() - t0:.1f} s); {torch.get_num_threads()} thread(s), k={args.k}"
    )
    X = torch.from_numpy(np.load(f32 / EMBEDDINGS))  # (N, E) in RAM: the baseline's matrix
    if args.ann:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        image_q, text_q = paired_queries(X.numpy(), args.ann_queries, args.gap, seed=11)
        sets = {"image": image_q, "text": text_q, "random": queries(X.numpy(), args.ann_queries, e, False, 13)}
        ann_section(load_index(f32), args.ann, sets, args.k, args.train_rows, args.build_threads)
        if args.ann_only:
            return
        torch.set_num_threads(threads)
    idx32, idx16 = load_index(f32), load_index(f16)
    k = args.k
    for q_n in (int(x) for x in args.queries.split(",")):
        q = queries(X.numpy(), q_n, e, near=False, seed=q_n)
        contenders = {
            "baseline q@X.T+topk": lambda q=q: (q @ X.T).topk(k, dim=1),
            "baseline X@q.T+topk": lambda q=q: (X @ q.T).topk(k, dim=0),
            "index float32": lambda q=q: idx32.search(q, k),
            "index float16": lambda q=q: idx16.search(q, k),
        }
        for fn in contenders.values():
            fn()  # warm-up: page cache, mapping, allocator
        best = {name: float("inf") for name in contenders}
        for _ in range(args.repeats):
            for name, fn in contenders.items():
                best[name] = min(best[name], timed(fn))
        base = min(best["baseline q@X.T+topk"], best["baseline X@q.T+topk"])
        load = os.getloadavg()[0]
        print(f"\nQ={q_n} (best of {args.repeats}, load {load:.2f}):")
        for name, t in best.items():
            print(f"  {name:22s} {t * 1e3:8.1f} ms  {t / base:5.2f}x baseline")
    del idx32, idx16
    gc.collect()
    print("\ncold cache (pages dropped, index opened anew, one query):")
    for name, folder in (("float32", f32), ("float16", f16)):
        times = []
        for _ in range(3):
            drop_page_cache(folder / EMBEDDINGS)
            q = queries(X.numpy(), 1, e, near=False, seed=1)
            times.append(timed(lambda folder=folder, q=q: load_index(folder).search(q, k)))
            gc.collect()
        print(f"  index {name:8s} {min(times) * 1e3:8.1f} ms best, {max(times) * 1e3:8.1f} ms worst of 3")
    idx32, idx16 = load_index(f32), load_index(f16)
    print(f"\nrecall@{k} of the float16 index against exact float32 search (256 queries):")
    for near in (False, True):
        q = queries(X.numpy(), 256, e, near=near, seed=7)
        _, exact = idx32.search(q, k)
        _, half = idx16.search(q, k)
        hits = sum(len(set(a) & set(b)) for a, b in zip(exact.tolist(), half.tolist(), strict=True))
        top1 = float((exact[:, 0] == half[:, 0]).float().mean())
        print(
            f"  {'near-duplicate' if near else 'random'} queries: recall@{k} {hits / exact.numel():.4f}, "
            f"top-1 agreement {top1:.4f}"
        )


if __name__ == "__main__":
    main()
