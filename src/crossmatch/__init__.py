"""crossmatch: train, evaluate and use image-text matching models."""

from crossmatch.metrics import retrieval_metrics
from crossmatch.models.registry import create_model, list_models

__all__ = ["create_model", "list_models", "retrieval_metrics"]
__version__ = "0.1.0"
