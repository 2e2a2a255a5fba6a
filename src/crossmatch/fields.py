"""Schema helpers for config dataclasses: allowed values declared beside each field (`ranged`), checked in one
pass (`check_fields`), and the image-size rule (`image_hw`).

This is base layer: the run config (crossmatch.config) and the model configs (crossmatch.models) both build
on it, so that a model never imports the run configuration.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Any, NamedTuple

from crossmatch.errors import ConfigError


class Check(NamedTuple):
    """A named value rule of `ranged(check=...)`: `ok(value)` holds, else the value `what` it must be."""

    ok: Any  # Callable[[Any], bool]
    what: str


def ranged(default: Any = dataclasses.MISSING, *, factory: Any = None, **rules: Any) -> Any:
    """A dataclass field whose allowed values are declared beside it, for `check_fields`.

    Rules: `min` (value >= min), `above` (value > above), `max` (value <= max), `choices` (a tuple),
    `check` (a named rule of CHECKS: "size", "colour", "mean", "std"; or a `Check` of the schema's own).
    A bound may name a sibling field (`min="patch_size"`). A None value passes (unset)."""
    meta = {"rules": rules}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def image_hw(size: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    """(H, W) of a `data.image_size`: a side S is (S, S), a pair [H, W] is itself.

    Raises:
        ConfigError: neither a positive int nor two positive ints.
    """
    if not _is_size(size):
        raise ConfigError(f"data.image_size={size!r}: must be a side >= 1 or [H, W], each >= 1")
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _is_size(value) -> bool:
    def side(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    return side(value) or (isinstance(value, (list, tuple)) and len(value) == 2 and all(side(v) for v in value))


def _is_colour(value) -> bool:
    """[] (the model's colour, else white) or three integers 0-255."""
    if not isinstance(value, list):
        return False
    ints = all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value)
    return not value or (len(value) == 3 and ints)


def _is_channels(value, positive: bool) -> bool:
    """[] (the model's own, else the defaults) or three finite numbers, each > 0 when `positive` (a std)."""
    if not isinstance(value, list):
        return False
    nums = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    return not value or (len(value) == 3 and nums and (not positive or all(v > 0 for v in value)))


# The named rules of `ranged(check=...)`.
CHECKS = {
    "size": Check(_is_size, "must be a side >= 1 or [H, W], each >= 1"),
    "colour": Check(_is_colour, "must be [] or [R, G, B], each 0-255"),
    "mean": Check(lambda v: _is_channels(v, False), "must be [] or three numbers [R, G, B]"),
    "std": Check(lambda v: _is_channels(v, True), "must be [] or three numbers [R, G, B], each > 0"),
}


def _broken_rule(value: Any, rules: dict[str, Any]) -> str | None:
    """What `value` must be, if it breaks one of its field's `rules`; None when it keeps them all."""
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if "check" in rules:
        check = rules["check"] if isinstance(rules["check"], Check) else CHECKS[rules["check"]]
        return None if check.ok(value) else check.what
    if "choices" in rules:
        choices = rules["choices"]
        names = " or ".join(choices) if len(choices) == 2 else ", ".join(choices)
        return None if value in choices else f"choose {names}"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    lo, above, hi = rules.get("min"), rules.get("above"), rules.get("max")
    if (lo is None or value >= lo) and (above is None or value > above) and (hi is None or value <= hi):
        return None
    bounds = [
        f"> {above}" if above is not None else "",
        ("at least 1" if lo == 1 else f">= {lo}") if lo is not None else "",
        (f"at most {hi:.4g}" if isinstance(hi, float) else f"at most {hi}") if hi is not None else "",
    ]
    return "must be " + " and ".join(b for b in bounds if b)


def check_fields(obj: Any, prefix: str) -> None:
    """Check every field of the dataclass `obj` (nested ones too) against the rules declared beside it
    (`ranged`), and every float for being finite.

    Raises:
        ConfigError: `prefix.key=value: what it must be`, for the first field that breaks its rules.
    """
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(value):
            check_fields(value, key)
            continue
        rules = dict(f.metadata.get("rules", {}))
        named = {b: rules[b] for b in ("min", "above", "max") if isinstance(rules.get(b), str)}
        rules.update({b: getattr(obj, name) for b, name in named.items()})  # e.g. image_size >= patch_size
        what = _broken_rule(value, rules)
        for b, name in named.items():
            what = what and what.replace(f" {rules[b]}", f" {name} ({rules[b]})", 1)
        if what:
            raise ConfigError(f"{key}={value!r}: {what}")
