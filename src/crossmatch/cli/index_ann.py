"""`crossmatch index eval|merge|export` and the approximate-index options of `index build|query`
(faiss index_factory keys, `crossmatch.search.ann`).

    crossmatch index build CKPT IMAGES --out INDEX --index-key "IVF1024,PQ32x4fs,RFlat" [--train-rows N]
    crossmatch index query INDEX --query TEXT --search-params "nprobe=64"
    crossmatch index eval INDEX (--queries FILE | --data DIR --split S) [--search-params P]
    crossmatch index merge INDEX_A INDEX_B ... --out INDEX [--index-key KEY]
    crossmatch index export INDEX --format clip-retrieval --out DIR

Top-level imports stay light (no torch): this module is imported to build the parser of every command.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from crossmatch.cli.help import add_command, add_device_option

EXACT_KEY = "Flat"  # mirrors crossmatch.search.ann.EXACT_KEY
TRAIN_ROWS = 100_000  # mirrors crossmatch.search.ann.TRAIN_ROWS
KEY_HELP = "faiss index_factory key (Flat: exact search; e.g. HNSW32, IVF1024,Flat, IVF4096,PQ64x8,RFlat)"
PARAMS_HELP = "faiss ParameterSpace settings of the approximate index, e.g. nprobe=64,efSearch=128"


def add_key_options(parser: argparse.ArgumentParser, default: str | None = EXACT_KEY) -> None:
    text = KEY_HELP if default else KEY_HELP + "; default: the key the index has (Flat for a new one)"
    parser.add_argument("--index-key", default=default, help=text)
    parser.add_argument("--train-rows", type=int, default=TRAIN_ROWS, help="rows sampled to train the index key")


def add_search_params(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--search-params", default=None, help=PARAMS_HELP)


def add_parsers(isub: argparse._SubParsersAction) -> None:
    e = add_command(
        isub,
        "eval",
        "recall@1/10/100 of an approximate index against exact search, for text and image queries",
        "crossmatch index eval photos.index --data data/coco --split val --search-params nprobe=32",
        "crossmatch index eval photos.index --queries queries.txt",
    )
    e.add_argument("index", help="index folder written by `crossmatch index build`")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--queries", help="text file: one query a line (a line naming an image file: an image query)")
    src.add_argument("--data", help="dataset folder: its split's captions (text) and images (image queries)")
    e.add_argument("--split", default="val", help="split of --data")
    e.add_argument("--max-queries", type=int, default=1000, help="at most this many queries of each kind")
    e.add_argument("--checkpoint", default=None, help="model to encode the queries (default: the one in meta.json)")
    add_search_params(e)
    add_device_option(e)
    m = add_command(
        isub,
        "merge",
        "concatenate indexes built separately by the same model, then build the index key over all rows",
        "crossmatch index merge part0.index part1.index --out all.index --index-key HNSW32",
        "crossmatch index merge 2024.index 2025.index 2026.index --out photos.index",
    )
    m.add_argument("indexes", nargs="+", help="index folders (at least two)")
    m.add_argument("--out", required=True, help="new index folder")
    add_key_options(m, default=None)
    x = add_command(
        isub,
        "export",
        "write an index's rows in another tool's layout",
        "crossmatch index export photos.index --format clip-retrieval --out photos.emb",
        "crossmatch index export photos.index --format clip-retrieval --out photos.emb --rows-per-file 100000",
    )
    x.add_argument("index", help="index folder written by `crossmatch index build`")
    x.add_argument("--format", choices=("clip-retrieval",), required=True, help="img_emb/*.npy + metadata/*.parquet")
    x.add_argument("--out", required=True, help="output folder")
    x.add_argument("--rows-per-file", type=int, default=1_000_000, help="rows of each .npy/.parquet pair")


def run(args: argparse.Namespace) -> bool:
    if args.index_command == "eval":
        run_eval(
            args.index, args.queries, args.data, args.split, args.search_params, args.max_queries, args.checkpoint,
            args.device,
        )  # fmt: skip
    elif args.index_command == "merge":
        run_merge(args.indexes, args.out, args.index_key, args.train_rows)
    elif args.index_command == "export":
        run_export(args.index, args.out, args.rows_per_file)
    else:
        return False
    return True


def check_key_early(key: str | None, train_rows: int, image_dir: str) -> None:
    """Before hours of embedding: refuse a key that the image folder cannot train (one row per image at
    most; unreadable images only lower it). The key's syntax is checked once the embedding size is known."""
    from crossmatch.search.ann import check_train_rows
    from crossmatch.search.index import list_images

    if key and key.strip() != EXACT_KEY:
        check_train_rows(key.strip(), len(list_images(image_dir)), train_rows, f"{image_dir} holds")


def apply_key(index_dir: str, key: str | None, train_rows: int) -> None:
    """Build (or replace) the approximate structure of a finished index, unless it already has `key`
    (None: keep what it has)."""
    from crossmatch.search.ann import build_ann, index_key
    from crossmatch.search.index import load_index

    if key is None:
        return
    index = load_index(index_dir)
    if index_key(index) == key.strip() and (key.strip() == EXACT_KEY or "ann" in index.meta):
        return
    ann = build_ann(index, key, train_rows)
    if ann["index_key"] != EXACT_KEY:
        print(f"index key {ann['index_key']}: trained on {ann['train_rows']} rows, {ann['rows']} rows added")


def _read_queries(path: str) -> tuple[list[str], list[Path]]:
    from crossmatch.data.csv_folder import IMAGE_EXTENSIONS
    from crossmatch.errors import DataError

    try:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"--queries {path}: cannot read it ({type(err).__name__})") from err
    images = [Path(ln) for ln in lines if Path(ln).suffix.lower() in IMAGE_EXTENSIONS and Path(ln).is_file()]
    texts = [ln for ln in lines if Path(ln) not in images]
    if not lines:
        raise DataError(f"--queries {path}: no query in it")
    return texts, images


def run_eval(
    index_dir: str,
    queries: str | None = None,
    data: str | None = None,
    split: str = "val",
    search_params: str | None = None,
    max_queries: int = 1000,
    checkpoint: str | None = None,
    device: str = "auto",
) -> dict:
    """Encode the queries with the index's model, measure recall against exact search, print, save in meta."""
    import torch

    from crossmatch.engine.distributed import resolve_device
    from crossmatch.errors import ConfigError
    from crossmatch.search.ann import RECALL_KS, Searcher, evaluate_ann, save_evaluation
    from crossmatch.search.index import encode_texts, load_index, load_index_model

    if max_queries < 1:
        raise ConfigError(f"--max-queries {max_queries}: must be at least 1")
    index = load_index(index_dir)
    searcher = Searcher(index, search_params)  # bad params fail before any model is loaded
    dev = resolve_device(device)
    overrides = [f"data.root={data}"] if data else []
    model, cfg, tokenizer = load_index_model(index, checkpoint, overrides)
    model = model.eval().to(dev)
    if data:
        from crossmatch.retrieval.evaluate import encode_split
        from crossmatch.runs import build_eval_data, open_split

        ds = open_split(cfg, split)
        img, txt = encode_split(model, build_eval_data(cfg, ds, tokenizer, model), dev)
        text_q, image_q = txt["embed"][:max_queries], img["embed"][:max_queries]  # (Q, E) each
    else:
        texts, images = _read_queries(queries)
        text_q = encode_texts(model, tokenizer, texts[:max_queries], dev) if texts else torch.zeros(0)
        image_q = _encode_images(model, index, images[:max_queries], dev) if images else torch.zeros(0)
    report = evaluate_ann(searcher, {"text": text_q, "image": image_q})
    save_evaluation(index, report)
    params = f" ({report['search_params']})" if report["search_params"] else ""
    print(f"index {index_dir}: key {report['index_key']}{params}, {report['rows']} rows")
    head = "  ".join(f"R@{k:<5d}" for k in RECALL_KS)
    print(f"{'queries':8s} {'n':>6s}  {head}  {'q/s':>9s}  {'exact q/s':>9s}")
    for kind in ("text", "image"):
        if kind in report:
            r = report[kind]
            cells = "  ".join(f"{r[f'recall@{k}']:.4f} " for k in RECALL_KS)
            print(f"{kind:8s} {r['queries']:6d}  {cells}  {r['queries_per_s']:9.1f}  {r['exact_queries_per_s']:9.1f}")
    return report


def _encode_images(model, index, images: list[Path], device):
    """(Q, E) embeddings of image files, preprocessed as the index's images were."""
    import torch

    from crossmatch.data.transforms import build_image_transform, load_image

    transform = build_image_transform(index.meta["image_size"], train=False, **(index.meta.get("preprocess") or {}))
    with torch.no_grad():
        batch = torch.stack([transform(load_image(p)) for p in images])  # (Q, 3, S, S)
        return model.encode_image_features({"image": batch.to(device)})["embed"].float().cpu()


def run_merge(indexes: list[str], out: str, key: str | None = None, train_rows: int = TRAIN_ROWS) -> None:
    """Merge, then build `key` over all rows (None: the key the sources share, else Flat)."""
    from crossmatch.search.ann import build_ann, index_key, merge_indexes
    from crossmatch.search.index import load_index

    if key is None:
        keys = {index_key(load_index(i)) for i in indexes}
        key = keys.pop() if len(keys) == 1 else EXACT_KEY
    merged = merge_indexes(indexes, out)
    build_ann(merged, key, train_rows)
    print(f"merged {len(indexes)} indexes: {len(merged)} rows into {out} (index key {key})")


def run_export(index_dir: str, out: str, rows_per_file: int = 1_000_000) -> None:
    from crossmatch.search.ann import export_clip_retrieval
    from crossmatch.search.index import load_index

    index = load_index(index_dir)
    files = export_clip_retrieval(index, out, rows_per_file)
    print(f"exported {len(index)} rows as {len(files) // 2} img_emb/metadata file pair(s) into {out}")
