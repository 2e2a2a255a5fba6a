"""Model registry: `@register_model` on a function that returns `Model(Config(...))`, and one short
`create_model(name, **overrides)` that builds any registered variant."""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from crossmatch.errors import ModelError

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_TOKENIZERS: dict[str, Callable[..., Any]] = {}  # families that bring their own tokenizer (open_clip)
# Facts about the data (vocabulary size, image side, caption length) that a model config may need;
# set for the duration of one create_model call and applied only to configs that have such fields.
_DATA_DEFAULTS: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("data_defaults", default=None)


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register `fn(**overrides) -> nn.Module` under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def register_tokenizer(*names: str) -> Callable:
    """Register `fn(name, **overrides) -> tokenizer` as the own tokenizer of the models `names`."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        for name in names:
            _TOKENIZERS[name] = fn
        return fn

    return wrap


def create_tokenizer(name: str, **overrides: Any) -> Any | None:
    """The tokenizer that model `name` (with its config overrides) brings, or None when it uses data.tokenizer."""
    _import_families()
    fn = _TOKENIZERS.get(name)
    return None if fn is None else fn(name, **{k: v for k, v in overrides.items() if v is not None})


def list_models(pattern: str = "") -> list[str]:
    """Sorted names of the registered models that contain `pattern`."""
    _import_families()
    return sorted(n for n in _MODELS if pattern in n)


def create_model(
    name: str, *, data_defaults: dict[str, Any] | None = None, load_weights: bool = True, **overrides: Any
) -> nn.Module:
    """Build the registered model `name`; `overrides` replace fields of its config (None is ignored).

    `data_defaults` (e.g. vocab_size, image_size, max_text_len) fill the config fields of those names
    that the model has, below the explicit overrides; keys the model does not have are ignored.
    `load_weights=False` skips pretrained weights for models whose builder takes that flag (a checkpoint's
    weights replace them anyway: rebuilding a fine-tuned open_clip model needs no download).

    Raises:
        ModelError: unknown name, or an override that is not a field of the model's config.
    """
    _import_families()
    if name not in _MODELS:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(sorted(_MODELS))}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    token = _DATA_DEFAULTS.set(data_defaults or {})
    try:
        fn = _MODELS[name]
        if not load_weights and "load_weights" in inspect.signature(fn).parameters:
            overrides["load_weights"] = False
        return fn(**overrides)
    finally:
        _DATA_DEFAULTS.reset(token)


def build_config(config_cls: type, defaults: dict[str, Any], overrides: dict[str, Any]):
    """`config_cls(**defaults)` with the data defaults of create_model, then `overrides`, applied.
    Unknown override keys raise a ModelError naming them."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ModelError(f"unknown key(s) for {config_cls.__name__}: {', '.join('model.' + k for k in unknown)}")
    data = {k: v for k, v in (_DATA_DEFAULTS.get() or {}).items() if k in names}
    return config_cls(**{**defaults, **data, **overrides})


def _import_families() -> None:
    # Importing the family modules runs their @register_model decorators.
    import crossmatch.models  # noqa: F401
