"""Model registry: a plain lookup of named variants. `@register_model(Config, defaults)` on a small function
`fn(config) -> Model` declares a variant: its config class, the variant's own defaults and how the model is
built from the config. `create_model(name, **overrides)` builds any variant; `model_config(name, **overrides)`
builds only its config dataclass (no towers, no weights)."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from typing import Any

from torch import nn

from crossmatch.errors import ModelError
from crossmatch.fields import check_fields


class UnknownModelKeysError(ModelError):
    """`model.*` keys that the model's config class does not have."""

    def __init__(self, config_class: str, keys: list[str]):
        super().__init__(f"unknown key(s) for {config_class}: {', '.join('model.' + k for k in keys)}")
        self.config_class, self.keys = config_class, keys


class ModelVariant:
    """One registered variant: `build(config)` (or `build(config, load_weights)` for a variant that reads
    pretrained weights) makes the model from `config_class(**{**defaults, **overrides})`.

    Calling the variant builds it: `tiny_scan(vocab_size=50)` is `create_model("tiny_scan", vocab_size=50)`
    without the None-dropping and data defaults of `create_model`."""

    def __init__(
        self, build: Callable[..., nn.Module], config_class: type, defaults: dict[str, Any], loads_weights: bool
    ):
        functools.update_wrapper(self, build)  # name, docstring, module of the builder
        self.name = build.__name__
        self.build, self.config_class, self.defaults, self.loads_weights = build, config_class, defaults, loads_weights

    def config(self, **overrides: Any) -> Any:
        """The variant's config dataclass with `overrides` applied (see build_config)."""
        return build_config(self.config_class, self.defaults, overrides)

    def __call__(self, load_weights: bool = True, **overrides: Any) -> nn.Module:
        config = self.config(**overrides)
        return self.build(config, load_weights) if self.loads_weights else self.build(config)

    def __repr__(self) -> str:
        return f"ModelVariant({self.name}: {self.config_class.__name__})"


_MODELS: dict[str, ModelVariant] = {}
_TOKENIZERS: dict[str, Callable[..., Any]] = {}  # families that bring their own tokenizer (open_clip)


def register_model(
    config: type, defaults: dict[str, Any] | None = None, *, loads_weights: bool = False
) -> Callable[[Callable[..., nn.Module]], ModelVariant]:
    """Register the decorated `fn(config) -> nn.Module` as the variant named after the function.

    Args:
        config: the family's config dataclass.
        defaults: the variant's own values of config fields (below the caller's overrides).
        loads_weights: the builder reads pretrained weights and takes `fn(config, load_weights)`.

    Returns:
        A decorator that returns the `ModelVariant` (callable as `fn(**overrides) -> nn.Module`).
    """
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"register_model(config=...) takes the config dataclass, not {config!r}")

    def wrap(fn: Callable[..., nn.Module]) -> ModelVariant:
        if fn.__name__ in _MODELS:
            raise ValueError(f"model {fn.__name__!r} is registered twice")
        unknown = sorted(set(defaults or {}) - {f.name for f in dataclasses.fields(config)})
        if unknown:
            raise TypeError(f"model {fn.__name__!r}: defaults {unknown} are not fields of {config.__name__}")
        _MODELS[fn.__name__] = ModelVariant(fn, config, dict(defaults or {}), loads_weights)
        return _MODELS[fn.__name__]

    return wrap


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


def variant(name: str) -> ModelVariant:
    """The registered variant `name`.

    Raises:
        ModelError: unknown name.
    """
    _import_families()
    if name not in _MODELS:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def create_model(
    name: str, *, data_defaults: dict[str, Any] | None = None, load_weights: bool = True, **overrides: Any
) -> nn.Module:
    """Build the registered model `name`; `overrides` replace fields of its config (None is ignored).

    `data_defaults` (e.g. vocab_size, image_size, max_text_len) fill the config fields of those names
    that the model has, below the explicit overrides; keys the model does not have are ignored.
    `load_weights=False` skips pretrained weights for variants that read them (a checkpoint's weights
    replace them anyway: rebuilding a fine-tuned open_clip model needs no download).

    Raises:
        ModelError: unknown name, or an override that is not a field of the model's config.
    """
    entry = variant(name)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    fields = {f.name for f in dataclasses.fields(entry.config_class)}
    data = {k: v for k, v in (data_defaults or {}).items() if k in fields and k not in overrides}
    return entry(load_weights=load_weights, **data, **overrides)


def model_config(name: str, **overrides: Any) -> Any:
    """The config dataclass that `create_model(name, **overrides)` would build its model from (the variant's
    own defaults included, e.g. tiny_albef's width), without building the model.

    Raises:
        ModelError: unknown name, or an override that is not a field of the model's config.
    """
    return variant(name).config(**{k: v for k, v in overrides.items() if v is not None})


def build_config(config_cls: type, defaults: dict[str, Any], overrides: dict[str, Any]):
    """`config_cls(**defaults)` with `overrides` applied, checked against the ranges declared beside its
    fields (a ConfigError naming `model.key`). Unknown override keys raise an UnknownModelKeysError naming
    them."""
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
