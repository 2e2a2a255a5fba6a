"""Shards from anywhere (crossmatch.data.remote): http(s) shard lists served by a local http.server on
127.0.0.1, `pipe:` commands behind `data.allow_pipe`, a dead URL failing in one line within seconds, a broken
read resumed where it stopped, the sizes.json that `data convert` writes and training trusts (and checks),
and a SIGKILLed training run from an http:// shard list resuming to identical weights."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

pytest.importorskip("webdataset")

from crossmatch.cli.main import main  # noqa: E402
from crossmatch.config import DataConfig  # noqa: E402
from crossmatch.data.formats import open_split  # noqa: E402
from crossmatch.data.remote import open_shard  # noqa: E402
from crossmatch.data.shard_stream import build_shard_loader  # noqa: E402
from crossmatch.data.tokenizer import CaptionTokenizer  # noqa: E402
from crossmatch.data.transforms import build_image_transform  # noqa: E402
from crossmatch.engine.checkpoint import load_checkpoint  # noqa: E402
from crossmatch.errors import ConfigError, DataError  # noqa: E402
from tests.helpers import ROOT  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT / "src")}
TRAIN = "train-{000000..000009}.tar"
ALL = "{train-{000000..000009},val-{000000..000002},test-{000000..000002}}.tar"  # each split takes its own


class RangeHandler(SimpleHTTPRequestHandler):
    """Files of one folder, with HTTP Range requests; `cut[name] = n` cuts the next answer for `name`
    after n bytes (a connection that breaks mid-shard)."""

    cut: dict[str, int] = {}
    requests: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        self.requests.append(f"{path.name} {self.headers.get('Range', '')}".strip())
        if not path.is_file():
            self.send_error(404)
            return
        data, ranged = path.read_bytes(), self.headers.get("Range")
        start = int(ranged.split("=")[1].split("-")[0]) if ranged else 0
        self.send_response(206 if ranged else 200)
        self.send_header("Content-Length", str(len(data) - start))
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        cut = self.cut.pop(path.name, None)
        self.wfile.write(data[start:] if cut is None else data[start : start + cut])
        if cut is not None:
            self.close_connection = True


@pytest.fixture(scope="module")
def served(shapes_root, tmp_path_factory):
    """(shard folder, base URL of the same folder served on 127.0.0.1)."""
    out = tmp_path_factory.mktemp("remote") / "shards"
    assert main(["data", "convert", str(shapes_root), str(out), "--to", "webdataset", "--shard-size", "4"]) == 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(out)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield out, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_convert_writes_open_clip_sizes(served):
    folder, _ = served
    sizes = json.loads((folder / "sizes.json").read_text())
    pairs = json.loads((folder / "pairs.json").read_text())
    # 40 train / 12 val / 12 test images of 5 captions, 4 per shard
    names = [f"train-{i:06d}.tar" for i in range(10)] + [f"{s}-{i:06d}.tar" for s in ("val", "test") for i in range(3)]
    assert sizes == dict.fromkeys(names, 4)
    assert set(pairs.values()) == {20} and pairs.keys() == sizes.keys()


def batches(data, n: int = 6) -> list[dict]:
    tok = CaptionTokenizer.train(data.captions)
    kw = dict(batch_size=8, seed=3, rank=0, world_size=1, num_workers=0, buffer_size=16)
    loader = build_shard_loader(data, tok, build_image_transform(32, train=True), **kw)
    loader.set_epoch(0, 0)
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_http_shards_stream_as_the_local_ones_without_a_scan(served):
    folder, url = served
    RangeHandler.requests.clear()
    remote = open_split(DataConfig(root=f"{url}/{TRAIN}", format="webdataset"), "train")
    assert remote.listed and (remote.num_images, remote.num_pairs) == (40, 200)
    assert RangeHandler.requests == ["sizes.json", "pairs.json"]  # counts without reading a shard
    local = open_split(DataConfig(root=str(folder), format="webdataset"), "train")
    assert remote.captions == local.captions
    for a, b in zip(batches(remote), batches(local), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def test_dead_and_missing_urls_fail_in_one_line_within_seconds(served, capsys):
    _, url = served
    port = closed_port()
    t0 = time.monotonic()
    assert main(["data", "validate", f"http://127.0.0.1:{port}/train-{{000000..000001}}.tar"]) == 2
    assert time.monotonic() - t0 < 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"shard http://127.0.0.1:{port}/train-000000.tar: cannot read it" in err
    assert "after 3 tries" in err and "refused" in err.lower()
    with pytest.raises(DataError, match=r"missing-000000.tar: HTTP 404"):
        open_split(DataConfig(root=f"{url}/missing-{{000000..000001}}.tar", format="webdataset"), "train")


def test_a_broken_read_resumes_at_its_byte(served):
    folder, url = served
    RangeHandler.requests.clear()
    RangeHandler.cut["train-000002.tar"] = 3000
    with open_shard(f"{url}/train-000002.tar") as f:
        data = f.read()
    assert data == (folder / "train-000002.tar").read_bytes()
    assert RangeHandler.requests == ["train-000002.tar", "train-000002.tar bytes=3000-"]


def test_pipe_shards_need_the_opt_in(served):
    folder, _ = served
    spec = f"pipe:cat {folder}/{TRAIN}"
    with pytest.raises(ConfigError, match="set data.allow_pipe: true"):
        open_split(DataConfig(root=spec, format="webdataset"), "train")
    data = open_split(DataConfig(root=spec, format="webdataset", allow_pipe=True), "train")
    assert not data.listed and (data.num_images, data.num_pairs) == (40, 200)  # scanned through the pipe


def test_a_count_that_disagrees_with_its_shard_names_it(served, tmp_path):
    folder, _ = served
    copy = tmp_path / "shards"
    shutil.copytree(folder, copy)
    sizes = json.loads((copy / "sizes.json").read_text())
    sizes["train-000003.tar"] = 5
    (copy / "sizes.json").write_text(json.dumps(sizes))
    data = open_split(DataConfig(root=str(copy), format="webdataset"), "train")
    assert data.num_images == 41  # trusted at start-up ...
    with pytest.raises(DataError, match=r"train-000003.tar holds 4 'train' samples / 20 captions; sizes.json"):
        list(data.read(3))  # ... and checked when the shard is read


@pytest.mark.slow
def test_sigkill_mid_epoch_on_http_shards_then_resume_is_bitwise_identical(served, tmp_path):
    _, url = served
    cfg = [
        "train", str(ROOT / "configs/vse_shapes.yaml"), f"data.root={url}/{ALL}", "data.format=webdataset",
        "data.num_workers=2", "data.shuffle_buffer=32", "data.image_size=32", "model.name=tiny_vse",
        "model.batch_norm=false", "eval.batch_size=16", "train.batch_size=8", "train.epochs=1",
        "train.max_steps_per_epoch=10", "train.log_every=1", "checkpoint.every_steps=1",
    ]  # fmt: skip

    def cmd(run_dir: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "crossmatch", *cfg, "--run-dir", str(run_dir), *extra]

    full = subprocess.run(cmd(tmp_path / "full"), capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen(cmd(tmp_path / "cut"), env=ENV, cwd=ROOT, **quiet)
    log = tmp_path / "cut" / "train.log"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (log.is_file() and "epoch 1 step 4/10" in log.read_text()):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cut = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert cut["trainer"]["epoch"] == 0 and 4 <= cut["trainer"]["step_in_epoch"] < 10
    resumed = subprocess.run(
        cmd(tmp_path / "cut", "--resume"), capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "replaying" not in log.read_text()  # resumed from the stored stream position
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["trainer"]["history"] == b["trainer"]["history"]
