"""Model families. Importing this package registers every model with `crossmatch.models.registry`."""

from crossmatch.models import (  # noqa: F401  (registers the families)
    albef,
    clip,
    dual_encoder,
    fusion_pretrained,
    pretrained,
    scan,
    tipcb,
    vilt,
)
from crossmatch.models.registry import create_model, list_models, model_config, register_model

__all__ = ["create_model", "list_models", "model_config", "register_model"]
