"""A search service over one index: a small HTTP JSON API and a self-contained page (FastAPI + uvicorn).

    GET  /search?q=TEXT&k=K      text -> the index's top-k images (1 <= k <= MAX_K)
    POST /search  (multipart: image=FILE, k=K)   an image -> the index's top-k images
    GET  /image/{row}            the image file of row `row` of the index's own path list
    GET  /healthz                {"status": "ok", "rows", "index_key", "model"}
    GET  /                       the page: a search box and a grid of results with scores and names

The model and the index are loaded once, when the app is built. No path from a request is ever opened:
/image takes a row number, and the file is the one the index lists for that row. Every bad request is a
4xx whose body is one line of JSON, {"error": "..."}, never a 500 or FastAPI's default validation body.

Legend: Q queries, E embedding, k results.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (UploadFile, imported
# inside create_app) as objects.
import asyncio
import logging
import mimetypes
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from torch import nn

from crossmatch.data.tokenizer import CaptionTokenizer
from crossmatch.data.transforms import MAX_IMAGE_PIXELS, build_image_transform, load_image
from crossmatch.errors import ConfigError, CrossmatchError, DataError, install_hint
from crossmatch.search.ann import Searcher
from crossmatch.search.index import encode_texts

log = logging.getLogger(__name__)

MAX_K = 1000  # results per request
PAGE = Path(__file__).with_name("static") / "service.html"


@dataclass
class SearchEngine:
    """What a request needs, loaded once: the index's searcher, the model and its tokenizer."""

    searcher: Searcher
    model: nn.Module  # in eval mode, on `device`
    tokenizer: CaptionTokenizer
    device: torch.device
    max_image_pixels: int = MAX_IMAGE_PIXELS

    def __post_init__(self):
        meta = self.searcher.index.meta
        self.transform = build_image_transform(meta["image_size"], train=False, **(meta.get("preprocess") or {}))
        self.lock = threading.Lock()  # one forward pass at a time: the model is shared by every request

    def _hits(self, embed: torch.Tensor, k: int) -> list[dict[str, Any]]:
        scores, ids = self.searcher.search(embed, k)  # (1, k) each
        index = self.searcher.index
        return [
            {"rank": r, "row": i, "score": round(s, 6), "path": index.paths[i], "name": Path(index.paths[i]).name}
            for r, (i, s) in enumerate(zip(ids[0].tolist(), scores[0].tolist(), strict=True), 1)
            if i >= 0
        ]

    @torch.no_grad()
    def search_text(self, q: str, k: int) -> list[dict[str, Any]]:
        self.tokenizer.encode_query(q)  # DataError: empty, or no known word
        with self.lock:
            embed = encode_texts(self.model, self.tokenizer, [q], self.device)  # (1, E)
        return self._hits(embed, k)

    @torch.no_grad()
    def search_image(self, data: bytes, k: int) -> list[dict[str, Any]]:
        pixels = load_image(data, self.max_image_pixels, name="upload")  # DataError: not an image, too large
        with self.lock:
            batch = {"image": self.transform(pixels)[None].to(self.device)}  # (1, 3, S, S)
            embed = self.model.encode_image_features(batch)["embed"].float().cpu()  # (1, E)
        return self._hits(embed, k)


class BadRequest(CrossmatchError):
    """A request the service refuses, with its HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _check_k(k: int) -> int:
    if not 1 <= k <= MAX_K:
        raise BadRequest(f"k={k}: must be between 1 and {MAX_K}")
    return k


def _one_line(message: str) -> str:
    return " ".join(str(message).split())[:300]


def create_app(engine: SearchEngine, max_upload_mb: float = 10.0):
    """The FastAPI app of the service (see the module docstring)."""
    try:
        from fastapi import FastAPI, File, Form, Request, UploadFile
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
        from starlette.exceptions import HTTPException
    except ImportError as err:
        hint = install_hint("serve")
        raise ConfigError(f"crossmatch serve needs fastapi, uvicorn and python-multipart: {hint}") from err
    if max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb {max_upload_mb}: must be positive")
    limit = int(max_upload_mb * (1 << 20))
    index = engine.searcher.index
    app = FastAPI(title="crossmatch search", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": _one_line(message)}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or "request"
        got = f" (got {first['input']!r})" if isinstance(first.get("input"), str) else ""
        return error(422, f"{where}: {first.get('msg', 'invalid')}{got}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        message = f"no such page: {request.url.path}" if err.status_code == 404 else str(err.detail)
        return error(err.status_code, message)

    @app.exception_handler(BadRequest)
    async def bad(request: Request, err: BadRequest) -> JSONResponse:
        return error(err.status, str(err))

    @app.exception_handler(DataError)
    async def bad_data(request: Request, err: DataError) -> JSONResponse:
        return error(400, str(err))

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return error(500, f"internal error ({type(err).__name__})")

    @app.middleware("http")
    async def upload_limit(request: Request, call_next):
        size = request.headers.get("content-length", "")
        if request.method == "POST" and size.isdigit() and int(size) > limit + 65536:  # room for the form fields
            return error(413, f"upload of {int(size)} bytes is larger than --max-upload-mb {max_upload_mb:g}")
        return await call_next(request)

    @app.get("/search")
    def search_text(q: str = "", k: int = 10) -> dict[str, Any]:
        t0 = time.perf_counter()
        if not q.strip():
            raise BadRequest("q is empty")
        hits = engine.search_text(q, _check_k(k))
        return {"query": q, "k": k, "took_ms": round(1000 * (time.perf_counter() - t0), 2), "results": hits}

    @app.post("/search")
    def search_image(image: Annotated[UploadFile, File()], k: Annotated[int, Form()] = 10) -> dict[str, Any]:
        t0 = time.perf_counter()
        _check_k(k)
        data = image.file.read(limit + 1)
        if len(data) > limit:
            raise BadRequest(f"upload {image.filename!r} is larger than --max-upload-mb {max_upload_mb:g}", 413)
        if not data:
            raise BadRequest(f"upload {image.filename!r} is empty")
        try:
            hits = engine.search_image(data, k)
        except DataError as err:
            raise BadRequest(f"upload {image.filename!r} is not an image we can read", 415) from err
        took = round(1000 * (time.perf_counter() - t0), 2)
        return {"query": image.filename, "k": k, "took_ms": took, "results": hits}

    @app.get("/image/{row}")
    def image_file(row: int) -> FileResponse:
        if not 0 <= row < len(index):
            raise BadRequest(f"row {row}: the index has rows 0 to {len(index) - 1}", 404)
        path = index.image_path(row)  # from the index's own list, never from the request
        if not path.is_file():
            raise BadRequest(f"row {row}: its image file is gone", 404)
        return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "rows": len(index), "index_key": engine.searcher.key, "model": index.meta["model"]}

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    return app


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0) -> tuple[str, Any]:
    """Start uvicorn for `app` in a daemon thread on a socket bound here (port 0: a free one); returns the
    base URL and a `stop()` that shuts it down. For tests and benchmarks."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the search service did not start")
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(10)
        sock.close()

    return f"http://{host}:{sock.getsockname()[1]}", stop
