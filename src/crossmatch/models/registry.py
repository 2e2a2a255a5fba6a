"""Model registry: `@register_model` on a function that returns `Model(Config(...))`, and one short
`create_model(name, **overrides)` that builds any registered variant."""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from crossmatch.errors import ModelError

_MODELS: dict[str, Callable[..., nn.Module]] = {}
# Facts about the data (vocabulary size, image side, caption length) that a model config may need;
# set for the duration of one create_model call and applied only to configs that have such fields.
_DATA_DEFAULTS: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("data_defaults", default=None)


class UnknownModelKeysError(ModelError):
    """`model.*` keys that the model's config class does not have."""

    def __init__(self, config_class: str, keys: list[str]):
        super().__init__(f"unknown key(s) for {config_class}: {', '.join('model.' + k for k in keys)}")
        self.config_class, self.keys = config_class, keys


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register `fn(**overrides) -> nn.Module` under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: str = "") -> list[str]:
    """Sorted names of the registered models that contain `pattern`."""
    _import_families()
    return sorted(n for n in _MODELS if pattern in n)


def describe_models(pattern: str = "") -> dict[str, str]:
    """{name: the first line of its docstring} for the registered models whose name contains `pattern`."""
    _import_families()
    out = {}
    for name in list_models(pattern):
        doc = (_MODELS[name].__doc__ or "").strip()
        out[name] = doc.splitlines()[0] if doc else ""
    return out


def create_model(name: str, *, data_defaults: dict[str, Any] | None = None, **overrides: Any) -> nn.Module:
    """Build the registered model `name`; `overrides` replace fields of its config (None is ignored).

    `data_defaults` (e.g. vocab_size, image_size, max_text_len) fill the config fields of those names
    that the model has, below the explicit overrides; keys the model does not have are ignored.

    Raises:
        ModelError: unknown name, or an override that is not a field of the model's config.
    """
    _import_families()
    if name not in _MODELS:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(sorted(_MODELS))}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    token = _DATA_DEFAULTS.set(data_defaults or {})
    try:
        return _MODELS[name](**overrides)
    finally:
        _DATA_DEFAULTS.reset(token)


def build_config(config_cls: type, defaults: dict[str, Any], overrides: dict[str, Any]):
    """`config_cls(**defaults)` with the data defaults of create_model, then `overrides`, applied.
    Unknown override keys raise a ModelError naming them."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise UnknownModelKeysError(config_cls.__name__, unknown)
    data = {k: v for k, v in (_DATA_DEFAULTS.get() or {}).items() if k in names}
    return config_cls(**{**defaults, **data, **overrides})


def _import_families() -> None:
    # Importing the family modules runs their @register_model decorators.
    import crossmatch.models  # noqa: F401
