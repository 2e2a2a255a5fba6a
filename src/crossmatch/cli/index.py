"""`crossmatch index build|query`: embed a folder of images once with a checkpoint's model, then search it
by text (dense first-stage retrieval as in VSE++, Faghri et al., BMVC 2018; exact search with torch or
faiss, Johnson et al., 2019).

    crossmatch index build CHECKPOINT IMAGE_DIR --out INDEX [--batch-size N] [--backend torch|faiss] [--index-key K]
    crossmatch index query INDEX --query TEXT [--top-k K] [--out FILE.png|.html] [--backend torch|faiss]
    crossmatch index eval|merge|export ...   (approximate indexes: crossmatch.cli.index_ann)

The index layout is documented in `crossmatch.search.index`. An interrupted build resumes when run
again with the same arguments. `torchrun --nproc_per_node=N -m crossmatch index build ...` shards the
embedding over N processes (gloo on CPU, nccl on GPU) and merges one index, the same as a single process's.
Top-level imports stay light (no torch): this module is imported to build
the parser of every command.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from crossmatch.cli import index_ann
from crossmatch.cli.help import add_command, add_device_option
from crossmatch.progress import show_progress

BACKENDS = ("torch", "faiss")  # mirrors crossmatch.search.index.BACKENDS, without importing torch here
DTYPES = ("float32", "float16")  # mirrors crossmatch.search.index.DTYPES


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
        "crossmatch index build runs/vse/checkpoints/best.pt photos/ --out photos.index --dtype float16",
        "torchrun --nproc_per_node=2 -m crossmatch index build runs/vse photos/ --out photos.index",
    )
    b.add_argument("checkpoint", help="a .pt or .safetensors file, or a run folder")
    b.add_argument("image_dir", help="folder searched recursively for .jpg/.png/... files")
    b.add_argument("--out", required=True, help="index folder (embeddings.npy, paths.json, meta.json)")
    b.add_argument("--batch-size", type=int, default=64, help="images per batch")
    b.add_argument("--backend", choices=BACKENDS, default="torch", help="faiss: also write index.faiss")
    b.add_argument("--workers", type=int, default=0, help="image-decoding worker processes")
    b.add_argument("--dtype", choices=DTYPES, default="float32", help="storage of embeddings.npy (float16: half)")
    index_ann.add_key_options(b, default=None)
    b.add_argument(
        "--absolute-paths", action="store_true", help="meta.json records absolute paths (default: relative to --out)"
    )
    add_device_option(b)
    q = add_command(
        isub,
        "query",
        "the top-k images of an index for a sentence (or several, searched in one pass)",
        'crossmatch index query photos.index --query "a red circle" --top-k 5',
        'crossmatch index query photos.index --query "a red circle" --query "a blue square" --out r.html',
    )
    q.add_argument("index", help="index folder written by `crossmatch index build`")
    q.add_argument("--query", required=True, action="append", help="sentence to search images for (repeatable)")
    q.add_argument("--top-k", type=int, default=10, help="results to print and draw")
    q.add_argument("--out", default=None, help="also write the results as a gallery .png or an .html page")
    q.add_argument("--backend", choices=BACKENDS, default="torch", help="exact search engine")
    q.add_argument("--checkpoint", default=None, help="model to encode the query (default: the one in meta.json)")
    index_ann.add_search_params(q)
    q.add_argument("--absolute-paths", action="store_true", help="print absolute image paths")
    add_device_option(q)
    index_ann.add_parsers(isub)


def run(args: argparse.Namespace) -> bool:
    if args.command != "index":
        return False
    if args.index_command == "build":
        index_ann.check_key_early(args.index_key, args.train_rows, args.image_dir)
        run_build(
            args.checkpoint,
            args.image_dir,
            args.out,
            args.batch_size,
            args.backend,
            args.workers,
            args.dtype,
            args.device,
            args.absolute_paths,
        )
        if get_rank_env() == 0:
            index_ann.apply_key(args.out, args.index_key, args.train_rows)
    elif args.index_command == "query":
        run_query(
            args.index,
            args.query,
            args.top_k,
            args.out,
            args.backend,
            args.checkpoint,
            args.device,
            args.search_params,
            args.absolute_paths,
        )
    else:
        return index_ann.run(args)
    return True


def get_rank_env() -> int:
    """This process's rank under torchrun (0 otherwise), without importing torch."""
    import os

    return int(os.environ.get("RANK", "0"))


def run_build(
    checkpoint: str,
    image_dir: str,
    out: str,
    batch_size: int = 64,
    backend: str = "torch",
    workers: int = 0,
    dtype: str = "float32",
    device: str = "auto",
    absolute_paths: bool = False,
) -> dict:
    """Build (or finish building) the index; prints what it wrote, the skipped files and the next step."""
    from crossmatch.data.transforms import preprocess_kwargs
    from crossmatch.engine.distributed import init_distributed
    from crossmatch.errors import ConfigError
    from crossmatch.runs import load_run
    from crossmatch.search.index import build_index

    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
    dist = init_distributed(device)  # a process group under torchrun; nothing otherwise
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
        device=dist.device,
        num_workers=workers,
        progress=show_progress(dist.is_main),
        max_image_pixels=cfg.data.max_image_pixels,
        dtype=dtype,
        absolute_paths=absolute_paths,
    )
    if not dist.is_main:
        return meta
    from crossmatch.cli.demo import format_files
    from crossmatch.cli.train import folder_size

    skipped = meta["skipped"]
    size = folder_size(Path(out)) / 2**20
    print(
        f"indexed {meta['count']} images (E={meta['embed_dim']}, {meta['model']}, {dtype}) into {out} ({size:.1f} MB)"
    )
    if skipped:
        names = ", ".join(Path(s["path"]).name for s in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        print(f"skipped {len(skipped)} unreadable image(s): {names} (listed in {Path(out) / 'meta.json'})")
    print(format_files([("embeddings", Path(out) / "embeddings.npy"), ("image paths", Path(out) / "paths.json")]))
    print(f'next: crossmatch index query {out} --query "a caption to search for" --top-k 5')
    return meta


def run_query(
    index_dir: str,
    query: str | list[str],
    top_k: int = 10,
    out: str | None = None,
    backend: str = "torch",
    checkpoint: str | None = None,
    device: str = "auto",
    search_params: str | None = None,
    absolute_paths: bool = False,
) -> list[tuple[str, float]] | list[list[tuple[str, float]]]:
    """Print rank, score and path of the top-k images for each query (all searched in one pass); optionally
    draw them (.png: one query; .html: any number). Paths are relative to the current folder when `index_dir`
    is (absolute with `absolute_paths`). Returns the (path, score) list, one per query for a list."""
    from crossmatch.engine.distributed import resolve_device
    from crossmatch.errors import ConfigError, DataError
    from crossmatch.files import check_writable
    from crossmatch.search.ann import Searcher
    from crossmatch.search.index import encode_texts, load_index, load_index_model

    if top_k < 1:
        raise ConfigError(f"--top-k {top_k}: must be at least 1")
    suffix = Path(out).suffix.lower() if out else ""
    queries = [query] if isinstance(query, str) else list(query)
    if any(not q.strip() for q in queries):
        raise DataError("the query is empty")
    if out and suffix not in (".png", ".html", ".htm"):
        raise ConfigError(f"--out {out}: write a .png gallery or an .html page")
    if suffix == ".png" and len(queries) > 1:
        raise ConfigError(f"--out {out}: a .png gallery shows one query; write an .html page for {len(queries)}")
    if out:
        check_writable(out, "--out")
    index = load_index(index_dir)
    searcher = Searcher(index, search_params, backend)  # the approximate structure when the index has one
    model, _, tokenizer = load_index_model(index, checkpoint)
    for q in queries:
        tokenizer.encode_query(q)  # refuses a query whose words are all unknown
    dev = resolve_device(device)
    text = encode_texts(model.to(dev), tokenizer, queries, dev)  # (Q, E)
    scores, ids = searcher.search(text, top_k)  # (Q, k) each: one pass for all queries
    results = [
        [(str(_shown(index.image_path(i), absolute_paths)), s) for i, s in zip(row_i, row_s, strict=True) if i >= 0]
        for row_i, row_s in zip(ids.tolist(), scores.tolist(), strict=True)
    ]
    for q, hits in zip(queries, results, strict=True):
        if len(queries) > 1:
            print(f"query: {q}")
        for rank, (path, score) in enumerate(hits, 1):
            print(f"{rank:3d}  {score:7.4f}  {path}")
    if out and suffix == ".png":
        from crossmatch.data.transforms import load_image
        from crossmatch.search.gallery import draw_gallery

        pics = [load_image(p) for p, _ in results[0]]
        names = [Path(p).name for p, _ in results[0]]
        draw_gallery(queries[0], pics, [s for _, s in results[0]], [False] * len(results[0]), out, names=names)
        print(f"gallery written to {out}")
    elif out:
        from crossmatch.search.report import write_html_report

        rows = [[(p, s, False) for p, s in hits] for hits in results]  # free text: no ground truth to mark
        write_html_report(out, queries, rows, None, f"crossmatch index {index_dir}")
        print(f"report written to {out}")
    return results[0] if isinstance(query, str) else results


def _shown(path: Path, absolute: bool) -> Path:
    return path.resolve() if absolute else path
