"""Model families. Importing this package imports every module in it, so each family registers its variants
with `crossmatch.models.registry`: a new family is a new module here, and no list elsewhere names it."""

import importlib
import pkgutil

from crossmatch.models.registry import create_model, list_models, model_config, register_model

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # runs its @register_model

__all__ = ["create_model", "list_models", "model_config", "register_model"]
