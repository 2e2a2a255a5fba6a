"""User-facing errors. The CLI prints their one-line message and exits non-zero; no traceback."""


class CrossmatchError(Exception):
    """Base class: a problem with the user's input, not a bug in crossmatch."""


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
