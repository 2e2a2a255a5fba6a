"""Model families. Importing this package registers every model with `crossmatch.models.registry`."""

from crossmatch.models import albef, clip, dual_encoder, pretrained, scan, tipcb, vilt  # noqa: F401  (registers the families)
from crossmatch.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
