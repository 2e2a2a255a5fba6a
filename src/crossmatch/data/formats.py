"""Dataset formats by name (`data.format`): each reader opens one split of a dataset folder and returns
an object with the `ImageCaptionDataset` interface (captions, txt_to_img, img_to_txt, twins, images,
image_view(transform, max_boxes))."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from crossmatch.config import DataConfig
from crossmatch.data.datasets import ImageCaptionDataset
from crossmatch.data.transforms import WHITE
from crossmatch.errors import ConfigError

_FORMATS: dict[str, Callable[[DataConfig, str], ImageCaptionDataset]] = {}
# Modules that register more formats when imported (imported on first use of open_split).
FORMAT_MODULES: list[str] = [
    "crossmatch.data.csv_folder",
    "crossmatch.data.jsonl",
    "crossmatch.data.pedes",
    "crossmatch.data.precomputed",
    "crossmatch.data.shards",
]


def register_format(name: str):
    """Decorator: `@register_format("jsonl")` on `reader(cfg: DataConfig, split: str) -> dataset`."""

    def wrap(fn):
        _FORMATS[name] = fn
        return fn

    return wrap


def open_split(cfg: DataConfig, split: str):
    """One split of the dataset described by `cfg` (data.root, data.format)."""
    for name in FORMAT_MODULES:
        importlib.import_module(name)
    if cfg.format not in _FORMATS:
        raise ConfigError(f"unknown data.format {cfg.format!r}; known: {', '.join(sorted(_FORMATS))}")
    ds = _FORMATS[cfg.format](cfg, split)
    ds.max_image_pixels = cfg.max_image_pixels  # read by its image views
    ds.background = tuple(cfg.background) if cfg.background else WHITE  # behind transparent pixels
    return ds


@register_format("karpathy")
def karpathy(cfg: DataConfig, split: str) -> ImageCaptionDataset:
    """Karpathy-split JSON (Flickr30K, COCO, the shapes data): {root}/dataset.json + {root}/images/."""
    json_name = cfg.json_name or "dataset.json"
    image_dir = Path(cfg.image_dir) if cfg.image_dir else None
    splits = cfg.splits_to_read(split)
    return ImageCaptionDataset(cfg.root, splits, image_dir, json_name, cfg.allow_outside_root, cfg.max_annotation_bytes)
