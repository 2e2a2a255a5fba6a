"""The Hugging Face hub, offline-friendly: short timeouts around every download and one-line errors that say
what works without the network (a local weights file, open_clip's `local-dir:` names, a save_pretrained
folder). Nothing here downloads by itself; `huggingface_hub` is imported only when a download is asked for.

huggingface_hub waits 10 s per request by default (HF_HUB_ETAG_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT) and a
tag's download makes several; against a host that accepts connections and never answers, `crossmatch
evaluate --model clip model.pretrained=TAG` took minutes to fail (huggingface_hub retries a missing file five
times with back-off). Inside `short_hub_timeouts` one request of HUB_TIMEOUT seconds decides whether the hub
answers; when it does not, the hub's offline mode serves cached files and fails the others at once.
"""

from __future__ import annotations

import contextlib
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

HUB_TIMEOUT = 3  # seconds per hub request (connect or read) inside short_hub_timeouts
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name, the form of a hub repository id
PRETRAINED_FILES = (
    "model.safetensors",
    "config.json",
    "preprocess.json",
    "tokenizer.json",
    "open_clip_tokenizer.json",
    "README.md",
)
OFFLINE_HINT = (
    "without the network, a local weights file (model.pretrained=/path/to/open_clip_weights.bin), open_clip's "
    "local-dir:/path/to/folder or a save_pretrained folder works"
)
MAX_REASON = 160  # characters of the underlying error kept in the one-line message


@dataclass
class HubAccess:
    offline: bool  # the hub is not used: HF_HUB_OFFLINE is set, or the hub did not answer


@contextlib.contextmanager
def short_hub_timeouts(seconds: int = HUB_TIMEOUT) -> Iterator[HubAccess]:
    """Hub access that fails in seconds: huggingface_hub's request timeouts set to `seconds` (except those the
    user set in the environment), and, when the hub does not answer a first request within `seconds`, its
    offline mode for the duration (cached files load; others fail at once instead of after five retries)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield HubAccess(offline=False)
        return
    saved = {}
    for name in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):
        if not os.environ.get(name):
            saved[name] = getattr(constants, name)
            setattr(constants, name, seconds)
    if not offline_mode() and not reachable(constants.ENDPOINT, seconds):
        saved["HF_HUB_OFFLINE"] = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
    try:
        yield HubAccess(offline=offline_mode())
    finally:
        for name, value in saved.items():
            setattr(constants, name, value)


def reachable(url: str, seconds: float) -> bool:
    """Whether `url` answers an HTTP HEAD request (any status) within `seconds`."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=seconds).close()
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):  # refused, timed out, unknown host, a malformed endpoint
        return False
    return True


def offline_mode() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) forbids the hub."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE)


def first_words(text: str, limit: int = MAX_REASON) -> str:
    """The first line of `text`, cut at a word boundary to at most `limit` characters (plus an ellipsis)."""
    line = " ".join(text.strip().splitlines()[0].split()) if text.strip() else ""
    if len(line) <= limit:
        return line
    cut = line[: limit + 1].rsplit(" ", 1)[0].rstrip(",;:")
    return cut + " ..."


def hub_error(what: str, err: BaseException, offline: bool) -> str:
    """One whole line for a failed hub download of `what`: the reason, and what works offline."""
    reason = first_words(str(err)) or type(err).__name__
    where = "the hub is unreachable or HF_HUB_OFFLINE is set, and no cached copy" if offline else "the hub refused"
    return f"cannot fetch {what} from the Hugging Face hub ({where}: {type(err).__name__}: {reason}); {OFFLINE_HINT}"
