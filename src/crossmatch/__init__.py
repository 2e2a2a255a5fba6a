"""crossmatch: train, evaluate and use image-text matching models.

The public API is imported lazily, so that `crossmatch data shapes` starts without loading torch.
"""

__version__ = "0.1.0"
__all__ = ["create_model", "create_model_and_transforms", "list_models", "load", "retrieval_metrics", "score"]


def load(path: str, overrides: list[str] | None = None):
    """Rebuild a trained model from a crossmatch checkpoint (.pt), run folder or safetensors export.

    Returns the model in eval mode, with `.preprocess` (image -> input tensor), `.tokenizer` (captions ->
    padded batch), `.run_config`, `.embed_images` and `.embed_texts` attached (see `crossmatch.api`).
    """
    from crossmatch.api import load as _load

    return _load(path, overrides)


def __getattr__(name: str):
    if name in ("create_model", "list_models"):
        from crossmatch.models import registry

        return getattr(registry, name)
    if name in ("create_model_and_transforms", "score"):
        from crossmatch import api

        return getattr(api, name)
    if name == "retrieval_metrics":
        from crossmatch.metrics import retrieval_metrics

        return retrieval_metrics
    raise AttributeError(f"module 'crossmatch' has no attribute {name!r}")
