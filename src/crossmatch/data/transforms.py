"""Image loading and torchvision transforms v2 pipelines for training and evaluation.

Boxes travel with the image as `tv_tensors.BoundingBoxes`, so crops, resizes and pads move them too.
There is no horizontal flip: captions say "left of" and "right of". Decoding honours the EXIF orientation
(PIL `ImageOps.exif_transpose`) and composites transparent images (RGBA, LA, palette with transparency)
on a background colour instead of exposing the hidden pixels. Resize modes: `squash` (stretch to a square),
`shortest` (shorter side, then centre crop: open_clip's and timm's evaluation default) and `letterbox`
(longer side, then pad to a square with the background colour, as YOLO-style detectors do).
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2.functional import pil_to_tensor

from crossmatch.config import image_hw
from crossmatch.errors import DataError
from crossmatch.files import open_regular

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WHITE = (255, 255, 255)  # default of data.background: transparent pixels become white
MAX_IMAGE_PIXELS = 89_478_485  # default of data.max_image_pixels (Pillow's own warning threshold)
_PILLOW_LOCK = threading.Lock()


def load_image(
    source: str | Path | bytes,
    max_pixels: int = MAX_IMAGE_PIXELS,
    background: tuple[int, ...] | list[int] = WHITE,
    name: str = "",
) -> torch.Tensor:
    """Decode an image to a (3, H, W) uint8 RGB tensor, upright (EXIF orientation applied) and with any
    transparency composited on `background` (RGB 0-255, `data.background`): the one decoder of every source,
    a file (a path: only a regular file is opened, `crossmatch.files.open_regular`) or the bytes of one
    (a WebDataset shard member; `name` says where they come from).

    An image of more than `max_pixels` pixels (`data.max_image_pixels`) is refused from its header,
    before decoding: a 107 KB PNG can declare 30000 x 30000 pixels (a decompression bomb).

    Raises:
        DataError: naming the file (or `name`) when it is missing, not a regular file, corrupt or too large.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        name, stream = name or "(bytes)", io.BytesIO(source)
    else:
        name, stream = name or str(source), open_regular(source, "image")
    try:
        with stream, _open_image(stream) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise DataError(f"image {name} is {w} x {h} pixels, more than data.max_image_pixels={max_pixels}")
            return pil_to_tensor(to_rgb(im, background))
    except UnidentifiedImageError as err:
        raise DataError(f"cannot decode image {name}: not an image") from err
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot decode image {name}: {str(err).splitlines()[0] if str(err) else 'corrupt'}") from err


# Pillow's modes of one 16- or 32-bit integer channel: 16-bit greyscale PNGs open as "I;16" (or "I" in older
# Pillows), TIFFs as "I;16B" and the like. `convert("RGB")` clips them at 255, which turns nearly every pixel
# white; `to_rgb` scales them from 16 bits to 8 instead.
WIDE_GREY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(im: Image.Image, background: tuple[int, ...] | list[int] = WHITE) -> Image.Image:
    """A PIL image as upright RGB: EXIF orientation applied, transparency composited on `background`,
    16-bit greyscale scaled to 8 bits (0 -> 0, 65535 -> 255; a 32-bit "I" image is read as 16-bit too,
    its values clipped to 0-65535)."""
    if im.getexif().get(0x0112, 1) != 1:  # an EXIF Orientation tag other than "upright"
        im = ImageOps.exif_transpose(im)
    if im.mode in WIDE_GREY_MODES:
        wide = np.clip(np.asarray(im, dtype=np.int64), 0, 65535)  # (H, W)
        im = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))  # "L", round(v / 257)
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode in ("P", "L", "RGB") and "transparency" in im.info)
    if not has_alpha:
        return im.convert("RGB")
    rgba = im.convert("RGBA")  # palette / grey / RGB with a transparency key -> an explicit alpha channel
    canvas = Image.new("RGBA", rgba.size, (*[int(c) for c in background], 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _open_image(stream) -> Image.Image:
    """Image.open (it reads the header only) without Pillow's own pixel limit, since `load_image` checks
    the size against data.max_image_pixels itself. Pillow reads its limit from a module global: the
    change is made under a lock and undone."""
    with _PILLOW_LOCK:
        old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(stream)
        finally:
            Image.MAX_IMAGE_PIXELS = old


# What a model that declares no preprocessing of its own gets (models trained from scratch):
# ImageNet mean/std, squash, bilinear, as every model had before models declared their own.
DEFAULT_PREPROCESS = {
    "mean": list(IMAGENET_MEAN),
    "std": list(IMAGENET_STD),
    "resize": "squash",
    "interpolation": "bilinear",
    "background": list(WHITE),
}
RESIZE_MODES = ("squash", "shortest", "letterbox")
INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}


def build_image_transform(
    image_size: int | list[int] | tuple[int, int],
    train: bool,
    augment: bool = True,
    mean: tuple[float, ...] | list[float] = IMAGENET_MEAN,
    std: tuple[float, ...] | list[float] = IMAGENET_STD,
    resize: str = "squash",
    interpolation: str = "bilinear",
    background: tuple[int, ...] | list[int] = WHITE,
) -> v2.Compose:
    """(3, h, w) uint8 [+ boxes] -> (3, H, W) float normalised [+ boxes in the new pixel frame]; `image_size`
    is a side S (H = W = S) or [H, W].

    Evaluation resizes to H x W (`squash`), scales to cover H x W then centre-crops (`shortest`: the shorter
    side to S for a square, as open_clip and timm do), or scales to fit inside H x W then pads with
    `background` (`letterbox`); training with `augment` takes a mild random resized crop instead (of the
    letterboxed frame for `letterbox`), of about the target's aspect ratio."""
    if resize not in RESIZE_MODES or interpolation not in INTERPOLATIONS:
        raise DataError(f"unknown data.resize {resize!r} or data.interpolation {interpolation!r}")
    mode = INTERPOLATIONS[interpolation]
    H, W = image_hw(image_size)
    letterbox = [Letterbox((H, W), mode, background)] if resize == "letterbox" else []
    if train and augment:
        # Mild crops only: a large crop could cut an object out of the scene its caption describes.
        ratio = (0.9 * W / H, 1.1 * W / H)  # width / height of the crop, around the output's
        crop = v2.RandomResizedCrop((H, W), scale=(0.8, 1.0), ratio=ratio, interpolation=mode, antialias=True)
        geometry = [*letterbox, crop]
    elif letterbox:
        geometry = letterbox
    elif resize == "shortest" and H == W:
        geometry = [v2.Resize(H, interpolation=mode, antialias=True), v2.CenterCrop(H)]  # 0.1.0's square path
    elif resize == "shortest":
        geometry = [CoverResize((H, W), mode), v2.CenterCrop((H, W))]
    else:
        geometry = [v2.Resize((H, W), interpolation=mode, antialias=True)]
    return v2.Compose([*geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


class CoverResize(v2.Transform):
    """Resize, aspect ratio kept, to the smallest size that covers `size` = (H, W) (before a centre crop)."""

    def __init__(self, size: tuple[int, int], interpolation: v2.InterpolationMode):
        super().__init__()
        self.size, self.interpolation = size, interpolation

    def make_params(self, flat_inputs: list) -> dict:
        h, w = v2.query_size(flat_inputs)
        scale = max(self.size[0] / h, self.size[1] / w)
        return {"hw": [max(self.size[0], round(h * scale)), max(self.size[1], round(w * scale))]}

    def transform(self, inpt, params: dict):
        return TF.resize(inpt, params["hw"], interpolation=self.interpolation, antialias=True)


class Letterbox(v2.Transform):
    """Resize to fit inside `size` (a side, or (H, W)) with the aspect ratio kept, then pad to it with `fill`
    (RGB 0-255), the image centred. Boxes are scaled and shifted with it."""

    def __init__(
        self,
        size: int | tuple[int, int],
        interpolation: v2.InterpolationMode,
        fill: tuple[int, ...] | list[int] = WHITE,
    ):
        super().__init__()
        self.size, self.interpolation, self.fill = image_hw(size), interpolation, [int(c) for c in fill]

    def make_params(self, flat_inputs: list) -> dict:
        h, w = v2.query_size(flat_inputs)
        H, W = self.size
        scale = min(H / h, W / w)  # for a square: side / max(h, w), as before
        nh, nw = min(H, max(1, round(h * scale))), min(W, max(1, round(w * scale)))
        top, left = (H - nh) // 2, (W - nw) // 2
        return {"hw": (nh, nw), "pad": [left, top, W - nw - left, H - nh - top]}

    def transform(self, inpt, params: dict):
        out = TF.resize(inpt, list(params["hw"]), interpolation=self.interpolation, antialias=True)
        fill = self.fill if isinstance(inpt, torch.Tensor) and not isinstance(inpt, tv_tensors.BoundingBoxes) else 0
        return TF.pad(out, params["pad"], fill=fill)


def transform_from_config(data_cfg, train: bool) -> v2.Compose:
    """The image transform a run's `data` section describes (empty preprocessing fields: the defaults)."""
    return build_image_transform(data_cfg.image_size, train, data_cfg.augment, **preprocess_kwargs(data_cfg))


def preprocess_kwargs(data_cfg) -> dict:
    """The preprocessing fields of a `data` section that are set, as build_image_transform keywords."""
    out = {"mean": data_cfg.image_mean, "std": data_cfg.image_std, "resize": data_cfg.resize}
    out["interpolation"] = data_cfg.interpolation
    out["background"] = getattr(data_cfg, "background", [])
    return {k: v for k, v in out.items() if v}


def describe_transform(data_cfg) -> str:
    """One line saying what `transform_from_config(data_cfg, ...)` does, for the run header."""
    kw = {**DEFAULT_PREPROCESS, **preprocess_kwargs(data_cfg)}
    H, W = image_hw(data_cfg.image_size)
    side = f"{H}x{W}"
    train = f"random resized crop (scale 0.8-1, ratio 0.9-1.1) to {side}" if data_cfg.augment else "as eval"
    mean, std = tuple(round(v, 4) for v in kw["mean"]), tuple(round(v, 4) for v in kw["std"])
    return (
        f"RGB, {kw['resize']} resize to {side} ({kw['interpolation']}), mean {mean} / std {std};"
        f" transparency on {tuple(kw['background'])}, EXIF orientation applied; train: {train}, no flips"
    )


def apply_transform(transform: v2.Compose, image: torch.Tensor, boxes: list[list[float]] | None):
    """Run `transform` on an image and its (K, 4) xyxy pixel boxes together. Returns (image, boxes or None)."""
    if not boxes:
        return transform(image), None
    bb = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[-2:]))
    out_image, out_boxes = transform(image, bb)
    return out_image, out_boxes.as_subclass(torch.Tensor).float()
