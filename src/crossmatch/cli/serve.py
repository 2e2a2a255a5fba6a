"""`crossmatch serve INDEX`: a search service over an index (HTTP JSON API and a web page; see
`crossmatch.search.service`).

    crossmatch serve INDEX [--checkpoint C] [--device D] [--host 127.0.0.1] [--port 8000] [--max-upload-mb 10]

Top-level imports stay light (no torch): this module is imported to build the parser of every command.
"""

from __future__ import annotations

import argparse

from crossmatch.cli.help import add_command, add_device_option
from crossmatch.cli.index_ann import add_search_params


def add_parsers(sub: argparse._SubParsersAction, data_sub: argparse._SubParsersAction) -> None:
    s = add_command(
        sub,
        "serve",
        "serve an index: text or image search over HTTP and a web page",
        "crossmatch serve photos.index --port 8000",
        "crossmatch serve photos.index --search-params nprobe=64 --max-upload-mb 5",
    )
    s.add_argument("index", help="index folder written by `crossmatch index build`")
    s.add_argument("--checkpoint", default=None, help="model to encode queries (default: the one in meta.json)")
    add_device_option(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="TCP port")
    s.add_argument("--max-upload-mb", type=float, default=10.0, help="largest image upload accepted")
    add_search_params(s)


def run(args: argparse.Namespace) -> bool:
    if args.command != "serve":
        return False
    app = build_app(args.index, args.checkpoint, args.device, args.max_upload_mb, args.search_params)
    import uvicorn

    print(f"serving {args.index} on http://{args.host}:{args.port}/")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return True


def build_app(
    index_dir: str,
    checkpoint: str | None = None,
    device: str = "auto",
    max_upload_mb: float = 10.0,
    search_params: str | None = None,
):
    """Load the index and its model once and return the service's app."""
    from crossmatch.engine.distributed import resolve_device
    from crossmatch.errors import ConfigError
    from crossmatch.search.ann import Searcher
    from crossmatch.search.index import load_index, load_index_model
    from crossmatch.search.service import SearchEngine, create_app

    if max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb {max_upload_mb}: must be positive")
    index = load_index(index_dir)
    searcher = Searcher(index, search_params)
    model, cfg, tokenizer = load_index_model(index, checkpoint)
    dev = resolve_device(device)
    engine = SearchEngine(searcher, model.eval().to(dev), tokenizer, dev, cfg.data.max_image_pixels)
    return create_app(engine, max_upload_mb)
