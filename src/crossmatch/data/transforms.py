"""Image loading and torchvision transforms v2 pipelines for training and evaluation.

Boxes travel with the image as `tv_tensors.BoundingBoxes`, so crops and resizes move them too.
There is no horizontal flip: captions say "left of" and "right of".
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from crossmatch.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_IMAGE_PIXELS = 89_478_485  # default of data.max_image_pixels (Pillow's own warning threshold)
_PILLOW_LOCK = threading.Lock()


def load_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Decode an image file to a (3, H, W) uint8 RGB tensor.

    An image of more than `max_pixels` pixels (`data.max_image_pixels`) is refused from its header,
    before decoding: a 107 KB PNG can declare 30000 x 30000 pixels (a decompression bomb).

    Raises:
        DataError: naming the file when it is missing, corrupt or too large.
    """
    try:
        with _open_image(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise DataError(f"image {path} is {w} x {h} pixels, more than data.max_image_pixels={max_pixels}")
            return pil_to_tensor(im.convert("RGB"))
    except FileNotFoundError as err:
        raise DataError(f"image not found: {path}") from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"cannot decode image {path}: {str(err).splitlines()[0] if str(err) else 'corrupt'}") from err


def _open_image(path: str | Path) -> Image.Image:
    """Image.open (it reads the header only) without Pillow's own pixel limit, since `load_image` checks
    the size against data.max_image_pixels itself. Pillow reads its limit from a module global: the
    change is made under a lock and undone."""
    with _PILLOW_LOCK:
        old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = old


RESIZE_MODES = ("squash", "shortest")
INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}


def build_image_transform(
    image_size: int,
    train: bool,
    augment: bool = True,
    mean: tuple[float, ...] | list[float] = IMAGENET_MEAN,
    std: tuple[float, ...] | list[float] = IMAGENET_STD,
    resize: str = "squash",
    interpolation: str = "bilinear",
) -> v2.Compose:
    """(3, H, W) uint8 [+ boxes] -> (3, S, S) float normalised [+ boxes in the new pixel frame].

    Evaluation resizes to S x S (`squash`) or the shorter side to S then centre-crops (`shortest`, as
    open_clip and timm do); training with `augment` takes a mild random resized crop instead."""
    if resize not in RESIZE_MODES or interpolation not in INTERPOLATIONS:
        raise DataError(f"unknown data.resize {resize!r} or data.interpolation {interpolation!r}")
    mode = INTERPOLATIONS[interpolation]
    if train and augment:
        # Mild crops only: a large crop could cut an object out of the scene its caption describes.
        crop = v2.RandomResizedCrop(image_size, scale=(0.8, 1.0), ratio=(0.9, 1.1), interpolation=mode, antialias=True)
        geometry = [crop]
    elif resize == "shortest":
        geometry = [v2.Resize(image_size, interpolation=mode, antialias=True), v2.CenterCrop(image_size)]
    else:
        geometry = [v2.Resize((image_size, image_size), interpolation=mode, antialias=True)]
    return v2.Compose([*geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def transform_from_config(data_cfg, train: bool) -> v2.Compose:
    """The image transform a run's `data` section describes (empty preprocessing fields: the defaults)."""
    return build_image_transform(data_cfg.image_size, train, data_cfg.augment, **preprocess_kwargs(data_cfg))


def preprocess_kwargs(data_cfg) -> dict:
    """The preprocessing fields of a `data` section that are set, as build_image_transform keywords."""
    out = {"mean": data_cfg.image_mean, "std": data_cfg.image_std, "resize": data_cfg.resize}
    out["interpolation"] = data_cfg.interpolation
    return {k: v for k, v in out.items() if v}


def describe_transform(data_cfg) -> str:
    """One line saying what `transform_from_config(data_cfg, ...)` does, for the run header."""
    kw = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "resize": "squash", "interpolation": "bilinear"}
    kw.update(preprocess_kwargs(data_cfg))
    side = data_cfg.image_size
    train = f"random resized crop (scale 0.8-1, ratio 0.9-1.1) to {side}x{side}" if data_cfg.augment else "as eval"
    mean, std = tuple(round(v, 4) for v in kw["mean"]), tuple(round(v, 4) for v in kw["std"])
    return (
        f"RGB, {kw['resize']} resize to {side}x{side} ({kw['interpolation']}), mean {mean} / std {std};"
        f" train: {train}, no flips"
    )


def apply_transform(transform: v2.Compose, image: torch.Tensor, boxes: list[list[float]] | None):
    """Run `transform` on an image and its (K, 4) xyxy pixel boxes together. Returns (image, boxes or None)."""
    if not boxes:
        return transform(image), None
    bb = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[-2:]))
    out_image, out_boxes = transform(image, bb)
    return out_image, out_boxes.as_subclass(torch.Tensor).float()
