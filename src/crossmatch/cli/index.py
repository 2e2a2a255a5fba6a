"""`crossmatch index build|query`: embed a folder of images once with a checkpoint's model, then search it
by text (dense first-stage retrieval as in VSE++, Faghri et al., BMVC 2018; exact search with torch or
faiss, Johnson et al., 2019).

    crossmatch index build CHECKPOINT IMAGE_DIR --out INDEX [--batch-size N] [--backend torch|faiss]
    crossmatch index query INDEX --query TEXT [--top-k K] [--out FILE.png|.html] [--backend torch|faiss]

The index layout is documented in `crossmatch.search.index`. An interrupted build resumes when run
again with the same arguments. Top-level imports stay light (no torch): this module is imported to build
the parser of every command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crossmatch.cli.help import add_command, add_device_option

BACKENDS = ("torch", "faiss")  # mirrors crossmatch.search.index.BACKENDS, without importing torch here


def add_parsers(sub: argparse._SubParsersAction, data_sub: argparse._SubParsersAction) -> None:
    idx = add_command(
        sub,
        "index",
        "embed a folder of images once, then search it by text",
        "crossmatch index build runs/vse/checkpoints/best.pt photos/ --out photos.index",
        'crossmatch index query photos.index --query "a dog on a beach" --out results.html',
    )
    isub = idx.add_subparsers(dest="index_command", required=True)
    b = add_command(
        isub,
        "build",
        "embed every image under a folder into an index folder (resumable)",
        "crossmatch index build runs/vse/checkpoints/best.pt photos/ --out photos.index",
        "crossmatch index build runs/vse photos/ --out photos.index --backend faiss --workers 2",
    )
    b.add_argument("checkpoint")
    b.add_argument("image_dir", help="folder searched recursively for .jpg/.png/... files")
    b.add_argument("--out", required=True, help="index folder (embeddings.npy, paths.json, meta.json)")
    b.add_argument("--batch-size", type=int, default=64, help="images per batch")
    b.add_argument("--backend", choices=BACKENDS, default="torch", help="faiss: also write index.faiss")
    b.add_argument("--workers", type=int, default=0, help="image-decoding worker processes")
    add_device_option(b)
    q = add_command(
        isub,
        "query",
        "the top-k images of an index for a sentence",
        'crossmatch index query photos.index --query "a red circle" --top-k 5',
        'crossmatch index query photos.index --query "a red circle" --out results.png',
    )
    q.add_argument("index", help="index folder written by `crossmatch index build`")
    q.add_argument("--query", required=True, help="sentence to search images for")
    q.add_argument("--top-k", type=int, default=10, help="results to print and draw")
    q.add_argument("--out", default=None, help="also write the results as a gallery .png or an .html page")
    q.add_argument("--backend", choices=BACKENDS, default="torch", help="exact search engine")
    q.add_argument("--checkpoint", default=None, help="model to encode the query (default: the one in meta.json)")
    add_device_option(q)


def run(args: argparse.Namespace) -> bool:
    if args.command != "index":
        return False
    if args.index_command == "build":
        run_build(args.checkpoint, args.image_dir, args.out, args.batch_size, args.backend, args.workers, args.device)
    else:
        run_query(args.index, args.query, args.top_k, args.out, args.backend, args.checkpoint, args.device)
    return True


def _device(name: str = "auto"):
    from crossmatch.engine.distributed import resolve_device

    return resolve_device(name)


def run_build(
    checkpoint: str,
    image_dir: str,
    out: str,
    batch_size: int = 64,
    backend: str = "torch",
    workers: int = 0,
    device: str = "auto",
) -> dict:
    """Build (or finish building) the index; prints a one-line summary and the skipped files."""
    from crossmatch.data.transforms import preprocess_kwargs
    from crossmatch.errors import ConfigError
    from crossmatch.runs import load_run
    from crossmatch.search.index import build_index

    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
    model, cfg, _ = load_run(checkpoint)
    meta = build_index(
        model,
        image_dir,
        out,
        checkpoint=checkpoint,
        model_name=cfg.model["name"],
        image_size=cfg.data.image_size,
        preprocess=preprocess_kwargs(cfg.data),
        batch_size=batch_size,
        backend=backend,
        device=_device(device),
        num_workers=workers,
        progress=sys.stderr.isatty(),
        max_image_pixels=cfg.data.max_image_pixels,
    )
    skipped = meta["skipped"]
    print(f"indexed {meta['count']} images (E={meta['embed_dim']}, {meta['model']}) into {out}")
    if skipped:
        names = ", ".join(Path(s["path"]).name for s in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        print(f"skipped {len(skipped)} unreadable image(s): {names} (listed in {Path(out) / 'meta.json'})")
    return meta


def run_query(
    index_dir: str,
    query: str,
    top_k: int = 10,
    out: str | None = None,
    backend: str = "torch",
    checkpoint: str | None = None,
    device: str = "auto",
) -> list[tuple[str, float]]:
    """Print rank, score and path of the top-k images for `query`; optionally draw them (.png / .html)."""
    from crossmatch.errors import ConfigError, DataError
    from crossmatch.files import check_writable
    from crossmatch.runs import load_run
    from crossmatch.search.index import encode_texts, load_index

    if top_k < 1:
        raise ConfigError(f"--top-k {top_k}: must be at least 1")
    suffix = Path(out).suffix.lower() if out else ""
    if out and suffix not in (".png", ".html", ".htm"):
        raise ConfigError(f"--out {out}: write a .png gallery or an .html page")
    if not query.strip():
        raise DataError("the query is empty")
    if out:
        check_writable(out, "--out")
    index = load_index(index_dir)
    model, _, tokenizer = load_run(checkpoint or index.meta["checkpoint"])
    tokenizer.encode_query(query)  # refuses a query whose words are all unknown
    device = _device(device)
    text = encode_texts(model.to(device), tokenizer, [query], device)  # (1, E)
    scores, ids = index.search(text, top_k, backend)  # (1, k) each
    results = [(str(index.image_path(i)), s) for i, s in zip(ids[0].tolist(), scores[0].tolist(), strict=True)]
    for rank, (path, score) in enumerate(results, 1):
        print(f"{rank:3d}  {score:7.4f}  {path}")
    if out and suffix == ".png":
        from crossmatch.data.transforms import load_image
        from crossmatch.search.gallery import draw_gallery

        pics = [load_image(p) for p, _ in results]
        draw_gallery(query, pics, [s for _, s in results], [False] * len(results), out)
        print(f"gallery written to {out}")
    elif out:
        from crossmatch.search.report import write_html_report

        rows = [[(p, s, False) for p, s in results]]  # free text: no ground truth to mark
        write_html_report(out, [query], rows, None, f"crossmatch index {index_dir}")
        print(f"report written to {out}")
    return results
