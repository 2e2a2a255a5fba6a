"""crossmatch: train, evaluate and use image-text matching models.

The public API follows open_clip's (`create_model_and_transforms`, `create_model_from_pretrained`,
`get_tokenizer`) and Hugging Face's (`from_pretrained`, `model.save_pretrained`); see `crossmatch.api`.
It is imported lazily, so that `crossmatch data shapes` starts without loading torch.
"""

__version__ = "0.1.0"
__all__ = [
    "create_model",
    "create_model_and_transforms",
    "create_model_from_pretrained",
    "from_pretrained",
    "get_tokenizer",
    "list_models",
    "load",
    "retrieval_metrics",
    "score",
]
_API = ("create_model_and_transforms", "create_model_from_pretrained", "get_tokenizer", "score")


def load(path: str, overrides: list[str] | None = None):
    """A trained model, eval mode, from a run folder, .pt checkpoint, .safetensors export, save_pretrained folder
    or Hugging Face hub id (`crossmatch.from_pretrained` is this function).

    The model has open_clip's interface (`encode_image`, `encode_text`, `forward`, `logit_scale`),
    sentence-transformers' `encode` and `save_pretrained`, and carries `.preprocess` (image -> input tensor),
    `.tokenizer` (captions -> (B, L) ids) and `.run_config` (see `crossmatch.api`).
    """
    from crossmatch.api import load as _load

    return _load(path, overrides)


from_pretrained = load


def __getattr__(name: str):
    if name in ("create_model", "list_models"):
        from crossmatch.models import registry

        return getattr(registry, name)
    if name in _API:
        from crossmatch import api

        return getattr(api, name)
    if name == "retrieval_metrics":
        from crossmatch.metrics import retrieval_metrics

        return retrieval_metrics
    raise AttributeError(f"module 'crossmatch' has no attribute {name!r}")
