"""Model registry: `@register_model` on a function that returns `Model(Config(...))`, and one short
`create_model(name, **overrides)` that builds any registered variant."""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

from torch import nn

from crossmatch.errors import ModelError
from crossmatch.fields import check_fields

_MODELS: dict[str, Callable[..., nn.Module]] = {}


class UnknownModelKeysError(ModelError):
    """`model.*` keys that the model's config class does not have."""

    def __init__(self, config_class: str, keys: list[str]):
        super().__init__(f"unknown key(s) for {config_class}: {', '.join('model.' + k for k in keys)}")
        self.config_class, self.keys = config_class, keys


_TOKENIZERS: dict[str, Callable[..., Any]] = {}  # families that bring their own tokenizer (open_clip)

# Set by `model_config`: `build_config` then hands its result back as a _BuiltConfig instead of returning it,
# so the builder stops before it constructs the model (no weights read, no towers built).
_CONFIG_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("crossmatch_config_only", default=False)


class _BuiltConfig(BaseException):  # noqa: N818 - a carrier, not an error: a builder's `except Exception` lets it pass
    def __init__(self, config: Any):
        super().__init__(type(config).__name__)
        self.config = config


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


def describe_models(pattern: str = "") -> dict[str, str]:
    """{name: the first line of its docstring} for the registered models whose name contains `pattern`."""
    _import_families()
    out = {}
    for name in list_models(pattern):
        doc = (_MODELS[name].__doc__ or "").strip()
        out[name] = doc.splitlines()[0] if doc else ""
    return out


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
    data = {k: v for k, v in (data_defaults or {}).items() if k not in overrides}
    try:
        fn = _MODELS[name]
        if not load_weights and "load_weights" in inspect.signature(fn).parameters:
            overrides["load_weights"] = False
        return fn(**data, **overrides)
    except UnknownModelKeysError as err:
        absent = set(err.keys)
        if not absent <= set(data):  # an explicit override the model does not have
            raise UnknownModelKeysError(err.config_class, sorted(absent - set(data))) from None
        # data facts the model's config has no field for (e.g. no vocabulary): not for this model
        return fn(**{k: v for k, v in data.items() if k not in absent}, **overrides)


def model_config(name: str, **overrides: Any) -> Any:
    """The config dataclass that `create_model(name, **overrides)` would build its model from (the variant's
    own defaults included, e.g. tiny_albef's width), without building the model.

    Raises:
        ModelError: unknown name, or an override that is not a field of the model's config.
    """
    _import_families()
    if name not in _MODELS:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(sorted(_MODELS))}")
    token = _CONFIG_ONLY.set(True)
    try:
        _MODELS[name](**{k: v for k, v in overrides.items() if v is not None})
    except _BuiltConfig as built:
        return built.config
    finally:
        _CONFIG_ONLY.reset(token)
    raise ModelError(f"model {name!r}: its builder does not make its config with build_config")


def build_config(config_cls: type, defaults: dict[str, Any], overrides: dict[str, Any]):
    """`config_cls(**defaults)` with `overrides` applied, checked against the ranges declared beside its
    fields (a ConfigError naming `model.key`). Unknown override keys raise an UnknownModelKeysError naming
    them. Under `model_config`, the config is handed back to it instead."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise UnknownModelKeysError(config_cls.__name__, unknown)
    hints = typing.get_type_hints(config_cls)
    for key, value in overrides.items():
        if not _fits(value, hints.get(key, Any)):
            raise ModelError(f"model.{key}={value!r}: expected {_hint_name(hints[key])}, got {type(value).__name__}")
    config = config_cls(**{**defaults, **overrides})
    check_fields(config, "model")  # the ranges declared beside its fields (negative sizes, ...)
    if _CONFIG_ONLY.get():
        raise _BuiltConfig(config)
    return config


def _fits(value: Any, hint: Any) -> bool:
    """Whether a config value has the annotated type (ints pass for floats, lists for tuples); an
    annotation this does not know is not judged."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        return isinstance(value, (tuple, list))
    return True


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if isinstance(hint, type) else str(hint)


def _import_families() -> None:
    # Importing the family modules runs their @register_model decorators.
    import crossmatch.models  # noqa: F401
