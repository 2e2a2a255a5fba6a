"""Model families. Importing this package registers every model with `crossmatch.models.registry`."""

from crossmatch.models import dual_encoder  # noqa: F401  (registers vse_*)
from crossmatch.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
