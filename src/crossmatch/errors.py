"""User-facing errors. The CLI prints their one-line message and exits non-zero; no traceback.

An error raised inside a DataLoader worker process (`data.num_workers > 0`) reaches the main process as a
new exception of the same class that torch builds from text: "Caught DataError in DataLoader worker
process 0." plus the worker's whole traceback (torch's `ExceptionWrapper.reraise`; the exception object
itself never crosses the process boundary). `CrossmatchError` recognises that text when it is constructed
and keeps the original message only, so the user sees the same one line as with `data.num_workers=0`,
from every loader.
"""


class CrossmatchError(Exception):
    """Base class: a problem with the user's input, not a bug in crossmatch."""

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str):
            args = (_worker_message(args[0], type(self)),)
        super().__init__(*args)


def _worker_message(text: str, cls: type) -> str:
    """The original message inside torch's re-raise text of an exception of class `cls` (see the module
    docstring); `text` unchanged when it is not one. The traceback's last line is "module.Class: message"
    (a chained exception's traceback comes before it)."""
    if not text.startswith(f"Caught {cls.__name__} ") or "\nOriginal Traceback" not in text:
        return text
    mark = f"\n{cls.__module__}.{cls.__qualname__}: "
    at = text.rfind(mark)
    return text[at + len(mark) :].rstrip("\n") if at >= 0 else text


class ConfigError(CrossmatchError):
    """Unknown config key, wrong type, missing config file."""


class DataError(CrossmatchError):
    """Missing or corrupt image, empty caption, malformed dataset file."""


class ModelError(CrossmatchError):
    """Unknown model name or model config key."""


class CheckpointError(CrossmatchError):
    """Missing, truncated, corrupt or unsafe checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that only arbitrary unpickling could read (it could run code): refused, never skipped."""


def install_hint(extra: str) -> str:
    """How to get an optional extra: crossmatch is installed from a clone (it is not published on PyPI)."""
    return f'the crossmatch[{extra}] extra: pip install -e ".[{extra}]" in the crossmatch clone'
