"""`crossmatch index build|query`: embed a folder of images once with a checkpoint's model, then search it
by text (dense first-stage retrieval as in VSE++, Faghri et al., BMVC 2018; exact search with torch or
faiss, Johnson et al., 2019).

    crossmatch index build CHECKPOINT IMAGE_DIR --out INDEX [--batch-size N] [--backend torch|faiss]
        [--dtype float32|float16]
    crossmatch index query INDEX --query TEXT [--query TEXT ...] [--top-k K] [--out FILE.png|.html]
        [--backend torch|faiss]

Several --query flags are answered together, in one pass over the index.

The index layout is documented in `crossmatch.evaluation.index`. An interrupted build resumes when run
again with the same arguments. `torchrun --nproc_per_node=N -m crossmatch index build ...` shards the
embedding over N processes (gloo on CPU, nccl on GPU) and merges one index, the same as a single process's.
Top-level imports stay light (no torch): this module is imported to build
the parser of every command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BACKENDS = ("torch", "faiss")  # mirrors crossmatch.evaluation.index.BACKENDS, without importing torch here
DTYPES = ("float32", "float16")  # mirrors crossmatch.evaluation.index.DTYPES


def add_parsers(sub: argparse._SubParsersAction, data_sub: argparse._SubParsersAction) -> None:
    idx = sub.add_parser("index", help="embed a folder of images once, then search it by text")
    isub = idx.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="embed every image under a folder into an index folder (resumable)")
    b.add_argument("checkpoint")
    b.add_argument("image_dir", help="folder searched recursively for .jpg/.png/... files")
    b.add_argument("--out", required=True, help="index folder (embeddings.npy, paths.json, meta.json)")
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--backend", choices=BACKENDS, default="torch", help="faiss: also write index.faiss")
    b.add_argument("--workers", type=int, default=0, help="image-decoding worker processes (default 0)")
    b.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="storage of embeddings.npy (float16: half the bytes)"
    )
    q = isub.add_parser("query", help="the top-k images of an index for a sentence")
    q.add_argument("index", help="index folder written by `crossmatch index build`")
    q.add_argument("--query", required=True, action="append", help="sentence to search images for (repeatable)")
    q.add_argument("--top-k", type=int, default=10)
    q.add_argument("--out", default=None, help="also write the results as a gallery .png or an .html page")
    q.add_argument("--backend", choices=BACKENDS, default="torch", help="exact search engine (default torch)")
    q.add_argument("--checkpoint", default=None, help="model to encode the query (default: the one in meta.json)")


def run(args: argparse.Namespace) -> bool:
    if args.command != "index":
        return False
    if args.index_command == "build":
        run_build(args.checkpoint, args.image_dir, args.out, args.batch_size, args.backend, args.workers, args.dtype)
    else:
        run_query(args.index, args.query, args.top_k, args.out, args.backend, args.checkpoint)
    return True


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_build(
    checkpoint: str,
    image_dir: str,
    out: str,
    batch_size: int = 64,
    backend: str = "torch",
    workers: int = 0,
    dtype: str = "float32",
) -> dict:
    """Build (or finish building) the index; prints a one-line summary and the skipped files."""
    from crossmatch.cli.common import load_run
    from crossmatch.engine.distributed import init_distributed
    from crossmatch.errors import ConfigError
    from crossmatch.evaluation.index import build_index

    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
    dist = init_distributed()  # a process group under torchrun; nothing otherwise
    model, cfg, _ = load_run(checkpoint)
    meta = build_index(
        model,
        image_dir,
        out,
        checkpoint=checkpoint,
        model_name=cfg.model["name"],
        image_size=cfg.data.image_size,
        batch_size=batch_size,
        backend=backend,
        device=dist.device,
        num_workers=workers,
        progress=sys.stderr.isatty(),
        dtype=dtype,
    )
    if not dist.is_main:
        return meta
    skipped = meta["skipped"]
    print(f"indexed {meta['count']} images (E={meta['embed_dim']}, {meta['model']}, {dtype}) into {out}")
    if skipped:
        names = ", ".join(Path(s["path"]).name for s in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        print(f"skipped {len(skipped)} unreadable image(s): {names} (listed in {Path(out) / 'meta.json'})")
    return meta


def run_query(
    index_dir: str,
    query: str | list[str],
    top_k: int = 10,
    out: str | None = None,
    backend: str = "torch",
    checkpoint: str | None = None,
) -> list[tuple[str, float]] | list[list[tuple[str, float]]]:
    """Print rank, score and path of the top-k images for each query (all searched in one pass); optionally
    draw them (.png: one query; .html: any number). Returns the (path, score) list, one per query for a list."""
    from crossmatch.cli.common import load_run
    from crossmatch.errors import ConfigError
    from crossmatch.evaluation.index import encode_texts, load_index

    if top_k < 1:
        raise ConfigError(f"--top-k {top_k}: must be at least 1")
    suffix = Path(out).suffix.lower() if out else ""
    queries = [query] if isinstance(query, str) else list(query)
    if out and suffix not in (".png", ".html", ".htm"):
        raise ConfigError(f"--out {out}: write a .png gallery or an .html page")
    if suffix == ".png" and len(queries) > 1:
        raise ConfigError(f"--out {out}: a .png gallery shows one query; write an .html page for {len(queries)}")
    index = load_index(index_dir)
    model, _, tokenizer = load_run(checkpoint or index.meta["checkpoint"])
    device = _device()
    text = encode_texts(model.to(device), tokenizer, queries, device)  # (Q, E)
    scores, ids = index.search(text, top_k, backend)  # (Q, k) each: one pass for all queries
    results = [
        [(str(index.image_path(i)), s) for i, s in zip(row_i, row_s, strict=True)]
        for row_i, row_s in zip(ids.tolist(), scores.tolist(), strict=True)
    ]
    for q, hits in zip(queries, results, strict=True):
        if len(queries) > 1:
            print(f"query: {q}")
        for rank, (path, score) in enumerate(hits, 1):
            print(f"{rank:3d}  {score:7.4f}  {path}")
    if out and suffix == ".png":
        from crossmatch.data.transforms import load_image
        from crossmatch.evaluation.gallery import draw_gallery

        pics = [load_image(p) for p, _ in results[0]]
        draw_gallery(queries[0], pics, [s for _, s in results[0]], [False] * len(results[0]), out)
        print(f"gallery written to {out}")
    elif out:
        from crossmatch.evaluation.report import write_html_report

        rows = [[(p, s, False) for p, s in hits] for hits in results]  # free text: no ground truth to mark
        write_html_report(out, queries, rows, None, f"crossmatch index {index_dir}")
        print(f"report written to {out}")
    return results[0] if isinstance(query, str) else results
