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


def write_index(folder: Path, n: int, e: int, dtype: str, seed: int = 0, chunk: int = 65536) -> Path:
    """A complete index folder of n random l2-normalised rows, generated chunk by chunk (bounded RAM)."""
    folder.mkdir(parents=True, exist_ok=True)
    emb = np.lib.format.open_memmap(folder / EMBEDDINGS, "w+", np.dtype(dtype), (n, e))
    rng = np.random.default_rng(seed)
    for s in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - s), e), dtype=np.float32)
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
    args = p.parse_args()
    n, e = (1_000_000, 256) if args.full else (args.rows, args.dim)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(dir=args.dir)
    root = Path(tmp.name)
    t0 = time.perf_counter()
    f32, f16 = write_index(root / "f32", n, e, "float32"), write_index(root / "f16", n, e, "float16")
    print(
        f"index {n} x {e}: float32 {n * e * 4 / 2**20:.0f} MiB, float16 {n * e * 2 / 2**20:.0f} MiB "
        f"(written in {time.perf_counter() - t0:.1f} s); {torch.get_num_threads()} thread(s), k={args.k}"
    )
    X = torch.from_numpy(np.load(f32 / EMBEDDINGS))  # (N, E) in RAM: the baseline's matrix
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
