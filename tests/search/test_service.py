"""The search service (`crossmatch serve`, crossmatch.search.service) against a real uvicorn server on
127.0.0.1: results equal `crossmatch index query`, every bad request is a one-line JSON 4xx, and the page
works in a real headless browser (Debian's chromium; skipped when it is not installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request

import pytest

from crossmatch.cli.main import main
from tests.helpers import train_args

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")

QUERY = "a red circle"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """(base URL, images folder, index folder, CLI query output lines) of a served tiny index."""
    from crossmatch.cli.serve import build_app
    from crossmatch.data.shapes import generate_shapes
    from crossmatch.search.service import serve_in_thread

    tmp = tmp_path_factory.mktemp("serve")
    generate_shapes(tmp / "data", n_train=30, n_val=8, n_test=8, size=32, workers=1)
    assert main(train_args(tmp / "data", tmp / "run", "train.epochs=1", "train.max_steps_per_epoch=2")) == 0
    ckpt, images, idx = tmp / "run" / "checkpoints" / "last.pt", tmp / "data" / "images", tmp / "idx"
    assert main(["index", "build", str(ckpt), str(images), "--out", str(idx), "--index-key", "HNSW8"]) == 0
    url, stop = serve_in_thread(build_app(str(idx), device="cpu", max_upload_mb=0.02))  # 20 KiB uploads
    yield url, images, idx
    stop()


def request(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes, str]:
    """(status, body, content type) of one request; 4xx/5xx answers are returned, not raised."""
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers.get("content-type", "")


def get_json(url: str) -> tuple[int, dict]:
    status, body, _ = request(url)
    return status, json.loads(body)


def upload(url: str, payload: bytes, filename: str = "q.png", k: str = "5") -> tuple[int, bytes, str]:
    """POST multipart/form-data with an `image` file part and a `k` field."""
    b = "crossmatchboundary"
    body = (
        (
            f'--{b}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n'
            f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{b}--\r\n".encode()
    )
    return request(f"{url}/search", body, {"Content-Type": f"multipart/form-data; boundary={b}"})


@pytest.mark.slow
def test_text_and_image_search_equal_index_query(service, capsys):
    url, images, idx = service
    capsys.readouterr()
    assert main(["index", "query", str(idx), "--query", QUERY, "--top-k", "5"]) == 0
    cli = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.strip()[:1].isdigit()]
    status, body = get_json(f"{url}/search?{urllib.parse.urlencode({'q': QUERY, 'k': 5})}")
    assert status == 200 and body["query"] == QUERY and body["k"] == 5 and body["took_ms"] > 0
    assert [h["rank"] for h in body["results"]] == [1, 2, 3, 4, 5]
    assert [str(images / h["path"]) for h in body["results"]] == [ln[2] for ln in cli]
    assert [round(h["score"], 4) for h in body["results"]] == [float(ln[1]) for ln in cli]

    files = sorted(images.glob("*.png"))
    status, raw, _ = upload(url, files[7].read_bytes())
    hits = json.loads(raw)["results"]
    assert status == 200 and len(hits) == 5
    assert hits[0]["row"] == 7 and hits[0]["name"] == files[7].name and hits[0]["score"] > 0.999  # itself

    status, raw, kind = request(f"{url}/image/7")
    assert (status, raw, kind) == (200, files[7].read_bytes(), "image/png")
    assert get_json(f"{url}/healthz") == (200, {"status": "ok", "rows": 46, "index_key": "HNSW8", "model": "tiny_vse"})


@pytest.mark.parametrize(
    "path, status, message",
    [
        ("/search?q=", 400, "q is empty"),
        ("/search?q=%20%20", 400, "q is empty"),
        ("/search", 400, "q is empty"),
        ("/search?q=circle&k=0", 400, "k=0: must be between 1 and 1000"),
        ("/search?q=circle&k=-3", 400, "k=-3: must be between 1 and 1000"),
        ("/search?q=circle&k=1001", 400, "k=1001: must be between 1 and 1000"),
        ("/search?q=circle&k=ten", 422, "k: Input should be a valid integer"),
        ("/search?q=zzzq%20qqqz", 400, "no word of the query"),
        ("/image/46", 404, "row 46: the index has rows 0 to 45"),
        ("/image/-1", 404, "row -1"),
        ("/image/abc", 422, "row: Input should be a valid integer"),
        ("/image/..%2F..%2Fetc%2Fpasswd", 404, "no such page"),
        ("/etc/passwd", 404, "no such page: /etc/passwd"),
    ],
)
@pytest.mark.slow
def test_bad_requests_are_one_line_json_4xx(service, path, status, message):
    got, body, kind = request(service[0] + path)
    assert got == status and kind == "application/json"
    assert body.count(b"\n") == 0 and message in json.loads(body)["error"]


@pytest.mark.slow
def test_bad_uploads_are_refused(service):
    url, images, _ = service
    cases = [
        (upload(url, b"%PDF-1.4 not an image", "doc.pdf"), 415, "upload 'doc.pdf' is not an image"),
        (upload(url, b""), 400, "upload 'q.png' is empty"),
        (upload(url, bytes(30_000)), 413, "larger than --max-upload-mb 0.02"),  # 30 KB > 20 KiB
        (upload(url, sorted(images.glob("*.png"))[0].read_bytes(), k="0"), 400, "k=0: must be between 1 and 1000"),
        (request(f"{url}/search", b"", {"Content-Type": "multipart/form-data; boundary=x"}), 422, "image: Field"),
    ]
    for (status, body, kind), want, message in cases:
        assert status == want and kind == "application/json", (status, body)
        assert body.count(b"\n") == 0 and message in json.loads(body)["error"]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
@pytest.mark.slow
def test_page_in_headless_chromium(service, tmp_path):
    url, _, _ = service
    page = f"{url}/?{urllib.parse.urlencode({'q': QUERY, 'k': 5})}"
    api = json.loads(request(f"{url}/search?{urllib.parse.urlencode({'q': QUERY, 'k': 5})}")[1])["results"]
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path}"]
    dom = subprocess.run(
        ["chromium", *flags, "--virtual-time-budget=10000", "--dump-dom", page],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    names = re.findall(r'<div class="name">([^<]+)</div>', dom)
    assert names == [h["name"] for h in api]  # the grid shows the API's results, in order
    assert re.search(r"5 results for “a red circle” in [0-9.]+ ms", dom)
    assert dom.count('<img src="/image/') == 5 and "cdn" not in dom.lower()


@pytest.mark.slow
def test_serve_refuses_bad_options_in_one_line(service, tmp_path, capsys):
    _, _, idx = service
    for args, message in [
        (["--max-upload-mb", "0"], "--max-upload-mb 0.0: must be positive"),
        (["--search-params", "nprobe=8"], "could not set parameter nprobe for key HNSW8"),
        (["--search-params", "efSearch"], "'efSearch' is not name=number"),
    ]:
        assert main(["serve", str(idx), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert main(["serve", str(tmp_path / "none")]) == 2
    assert "not a crossmatch index" in capsys.readouterr().err
