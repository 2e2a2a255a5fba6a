"""Warm-up of a frozen image tower: its outputs for every train image computed once, keyed by file."""

from __future__ import annotations

import logging

import torch
from torch import nn

from crossmatch.data.datasets import ImageView, KeyedImageView, PairView
from crossmatch.data.loaders import build_eval_loader
from crossmatch.errors import DataError

log = logging.getLogger(__name__)


class _FileKeys(torch.utils.data.Dataset):
    """Item i: (i, the view's file key of image i or None, the DataError message or None); for a loader."""

    def __init__(self, view: ImageView):
        self.view = view

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, i: int) -> tuple[int, bytes | None, str | None]:
        try:
            return i, self.view.file_key(i), None
        except DataError as err:
            return i, None, str(err)


class _Decoded(torch.utils.data.Dataset):
    """The view's items at `indices`, an unreadable image as {"skipped": (i, message)} (dropped by collate)."""

    def __init__(self, view: ImageView, indices: list[int]):
        self.view, self.indices = view, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict:
        try:
            return self.view[self.indices[j]]
        except DataError as err:
            return {"skipped": (self.indices[j], str(err))}


def cache_train_images(model: nn.Module, pairs: PairView, batch_size: int, num_workers: int = 0) -> bool:
    """Compute the frozen image tower's outputs of every image of `pairs` once, keyed by the SHA-1 of the image
    file and its preprocessing, then feed `pairs` keys instead of pixels (KeyedImageView): no later epoch, and
    no resumed run with the same cache folder, decodes these images again; an edited file or another
    preprocessing is another key. Only for a model that caches its frozen image outputs (`vse_pretrained` with
    `model.cache_frozen` and unaugmented images) and pairs without boxes; returns whether it applied. A run
    calls it when its epochs cover the split (no smaller `train.max_steps_per_epoch`): a short smoke run keeps
    computing only the images it meets, keyed by their pixels.

    An image that cannot be read raises its DataError, or with `pairs.skip_bad` is remembered and skipped (and
    counted) every epoch as before."""
    view = pairs.images
    if not getattr(model, "caches_image_outputs", False) or view.max_boxes or type(view) is KeyedImageView:
        return False
    keys: list[bytes | None] = [None] * len(view)
    failed: dict[int, str] = {}
    loader = torch.utils.data.DataLoader(_FileKeys(view), batch_size=64, num_workers=num_workers, collate_fn=list)
    for chunk in loader:
        for i, key, error in chunk:
            keys[i] = key
            if error is not None:
                failed[i] = error
    if failed and not pairs.skip_bad:
        raise DataError(next(iter(failed.values())))
    readable = [i for i in range(len(view)) if i not in failed]
    missing = [readable[j] for j in model.missing_image_outputs([keys[i] for i in readable])]
    if missing:
        log.info("frozen image tower: computing the outputs of %d of %d images, once", len(missing), len(view))
        device = next(model.parameters()).device
        decoded = _Decoded(view, missing)
        for batch in build_eval_loader(decoded, batch_size, num_workers):
            for i, error in batch.get("skipped", []):
                if not pairs.skip_bad:
                    raise DataError(error)
                failed[i] = error
            if "image" in batch:
                model.fill_image_cache([keys[i] for i in batch["image_idx"].tolist()], batch["image"].to(device))
    readable = [i for i in range(len(view)) if i not in failed]
    if model.missing_image_outputs([keys[i] for i in readable]):  # an in-memory cache that is full
        log.info("the frozen image cache holds only part of the train images: decoding them every epoch")
        return False
    pairs.images = KeyedImageView(view, keys, failed)
    return True
