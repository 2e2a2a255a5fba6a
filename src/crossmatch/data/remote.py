"""Shards from anywhere: open a shard named by a local path, an http(s) URL or (opted in with
`data.allow_pipe: true`, since it runs a shell command written in a config) a `pipe:` command, as
webdataset's `gopen` does; and per-shard counts from a `sizes.json` beside the shards (open_clip's file:
{shard file name: samples}) so training need not read every shard before it starts.

HTTP reads are bounded: every connect and read waits at most TIMEOUT_S, a failed request is retried
RETRIES times with a doubling pause, and a connection that breaks mid-shard is reopened where it stopped
(an HTTP Range request), so a dead server fails in one line within about a second, never after minutes of
silent retries, and a flaky one costs a retry, not a training run.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import time
import urllib.error
import urllib.request
from pathlib import PurePosixPath
from typing import IO

from crossmatch.errors import ConfigError, DataError
from crossmatch.files import open_regular

log = logging.getLogger(__name__)

TIMEOUT_S = 20.0  # seconds a connect or a read may wait
RETRIES = 3  # tries of every request (connect, or reopen after a broken read)
BACKOFF_S = 0.25  # pause before the 2nd try, doubled for each further one
SIZES, PAIRS = "sizes.json", "pairs.json"  # samples per shard (open_clip's), captions per shard (ours)


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://", "pipe:"))


def check_pipe(spec: str, allow_pipe: bool) -> None:
    if spec.startswith("pipe:") and not allow_pipe:
        hint = "set data.allow_pipe: true to allow it"
        raise ConfigError(f"data.root {spec[:60]}: a pipe: command runs in a shell; {hint}")


def _reason(err: BaseException) -> str:
    reason = getattr(err, "reason", None) or err
    return str(reason).splitlines()[0] if str(reason) else type(err).__name__


def _request(url: str, start: int = 0, timeout: float = TIMEOUT_S, retries: int = RETRIES):
    """The open response of GET url (from byte `start`); DataError after `retries` failed tries. A 4xx
    answer is final (no retry): the shard is not there."""
    headers = {"Range": f"bytes={start}-"} if start else {}
    for attempt in range(retries):
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
            if start and response.status != 206:
                response.close()
                raise DataError(f"shard {url}: the server cannot resume a broken read (no Range support)")
            return response
        except urllib.error.HTTPError as err:
            if err.code < 500:
                raise DataError(f"shard {url}: HTTP {err.code} {err.reason}") from err
            failure = f"HTTP {err.code} {err.reason}"
        except (urllib.error.URLError, OSError) as err:
            failure = _reason(err)
        if attempt + 1 < retries:
            time.sleep(BACKOFF_S * 2**attempt)
    raise DataError(f"shard {url}: cannot read it ({failure}) after {retries} tries")


class HttpShard(io.RawIOBase):
    """A read-only stream of one URL that reopens a broken connection at the byte where it stopped."""

    def __init__(self, url: str, timeout: float = TIMEOUT_S, retries: int = RETRIES):
        self.url, self.timeout, self.retries = url, timeout, retries
        self.pos, self.response = 0, _request(url, 0, timeout, retries)
        length = self.response.headers.get("Content-Length")
        self.end = int(length) if length and length.isdigit() else None  # None: read to the server's end

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        for attempt in range(self.retries):
            try:
                n = self.response.readinto(buffer)
                if n == 0 and len(buffer) and self.end is not None and self.pos < self.end:
                    raise http.client.IncompleteRead(b"", self.end - self.pos)  # http.client returns 0 here
                self.pos += n
                return n
            except (OSError, http.client.HTTPException) as err:  # reset, time-out, or cut short (IncompleteRead)
                if attempt + 1 == self.retries:
                    raise DataError(f"shard {self.url}: read failed at byte {self.pos} ({_reason(err)})") from err
                log.warning("shard %s: read broke at byte %d (%s); reopening", self.url, self.pos, _reason(err))
                self.response.close()
                time.sleep(BACKOFF_S * 2**attempt)
                self.response = _request(self.url, self.pos, self.timeout, self.retries)
        return 0

    def close(self) -> None:
        if not self.closed:
            self.response.close()
        super().close()


def open_shard(spec: str) -> IO[bytes]:
    """A binary stream of the shard `spec`: a local file, an http(s) URL or a `pipe:` command (whose
    permission `check_pipe` gave when the shard list was resolved). Use it as a context manager."""
    if spec.startswith(("http://", "https://")):
        return io.BufferedReader(HttpShard(spec), 1 << 16)
    if spec.startswith("pipe:"):
        from webdataset.gopen import Pipe  # webdataset's gopen for pipe: URLs, with a quiet early close

        # 141 / -13: the command was stopped by SIGPIPE because the reader closed early (a resume stops
        # reading once it has found its samples), not a failure of the command
        return Pipe(spec[5:], mode="rb", shell=True, bufsize=1 << 16, ignore_status=[141, -13])
    return open_regular(spec, "shard")  # a FIFO or a device would never end


def expand(spec: str, allow_pipe: bool, split: str | None = None) -> list[str]:
    """The shard list of a URL or pipe: spec with brace patterns ({000..009}, {a,b}) expanded. As for a
    folder, when some shards are named `{split}-*.tar`, those are the split's."""
    check_pipe(spec, allow_pipe)
    from webdataset.shardlists import expand_urls

    shards = list(expand_urls(spec))
    named = [s for s in shards if split and PurePosixPath(s.split()[-1]).name.startswith(f"{split}-")]
    return named or shards


def _folder(shard: str) -> str:
    return shard.rsplit("/", 1)[0] if "/" in shard else "."


def _read_json(where: str) -> dict | None:
    """A small JSON file by path or http(s) URL; None when it is not there."""
    try:
        if where.startswith(("http://", "https://")):
            with open_shard(where) as f:
                data = f.read(1 << 26)
        else:
            with open(where, "rb") as f:
                data = f.read()
    except (DataError, FileNotFoundError) as err:
        if "HTTP 404" in str(err) or isinstance(err, FileNotFoundError):
            return None
        raise
    try:
        value = json.loads(data)
    except ValueError as err:
        raise DataError(f"{where} is not valid JSON") from err
    if not isinstance(value, dict):
        raise DataError(f"{where} is not a JSON object of shard counts")
    return value


def listed_counts(shards: list[str], split: str) -> list[tuple[int, int]] | None:
    """(images, pairs) of `split` in each shard from the `sizes.json` and `pairs.json` beside the shards,
    or None when they do not describe every shard (then the shards are scanned). Only shards named
    `{split}-*.tar` count, as `crossmatch data convert --to webdataset` writes them: every sample of such a
    shard belongs to the split in its name."""
    if any(s.startswith("pipe:") for s in shards):
        return None
    names = [PurePosixPath(s).name for s in shards]
    if not all("-" in n for n in names):
        return None
    tables: dict[str, tuple[dict | None, dict | None]] = {}
    counts = []
    for shard, name in zip(shards, names, strict=True):
        folder = _folder(shard)
        if folder not in tables:
            tables[folder] = (_read_json(f"{folder}/{SIZES}"), _read_json(f"{folder}/{PAIRS}"))
        sizes, pairs = tables[folder]
        if sizes is None or pairs is None or name not in sizes or name not in pairs:
            return None
        try:
            n_samples, n_pairs = int(sizes[name]), int(pairs[name])
        except (TypeError, ValueError) as err:
            raise DataError(f"{folder}/{SIZES}: the count of {name} is not a number") from err
        counts.append((n_samples, n_pairs) if name.split("-", 1)[0] == split else (0, 0))
    return counts


def write_counts(folder, counts: dict[str, tuple[int, int]]) -> None:
    """`sizes.json` (open_clip's: samples per shard file name) and `pairs.json` (captions per shard)."""
    from crossmatch.files import write_text

    write_text(folder / SIZES, json.dumps({name: n for name, (n, _) in sorted(counts.items())}, indent=1))
    write_text(folder / PAIRS, json.dumps({name: p for name, (_, p) in sorted(counts.items())}, indent=1))
