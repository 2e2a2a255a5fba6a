"""crossmatch: train, evaluate and use image-text matching models.

The public API is imported lazily, so that `crossmatch data shapes` starts without loading torch.
"""

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "load", "retrieval_metrics"]


def load(path: str):
    """Rebuild a trained model from a crossmatch checkpoint (.pt) or safetensors export.

    Returns the model in eval mode, with `.tokenizer` (encode captions) and `.run_config` attached.
    """
    from crossmatch.runs import load_run

    model, cfg, tokenizer = load_run(path)
    model.tokenizer, model.run_config = tokenizer, cfg
    return model


def __getattr__(name: str):
    if name in ("create_model", "list_models"):
        from crossmatch.models import registry

        return getattr(registry, name)
    if name == "retrieval_metrics":
        from crossmatch.metrics import retrieval_metrics

        return retrieval_metrics
    raise AttributeError(f"module 'crossmatch' has no attribute {name!r}")
