"""Whether to draw progress bars: on a terminal, from the main process only, never into log files."""

from __future__ import annotations

import sys


def show_progress(is_main: bool = True, override: bool | None = None) -> bool:
    """True when stderr is a terminal and this process is the main one; `override` (a caller's explicit
    choice, e.g. a `progress=` argument) wins when it is not None."""
    if override is not None:
        return bool(override)
    return bool(is_main) and sys.stderr.isatty()
