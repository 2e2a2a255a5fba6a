"""Retrieval galleries: the query on top, the top-k images below with their rank and score, the true
match framed in green (others in grey), written as one PNG a person can look at."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.v2.functional import to_pil_image
from torchvision.utils import make_grid

THUMB = 128  # thumbnail side in pixels
LABEL_H = 18  # caption strip under each thumbnail


def draw_gallery(
    query: str, images: list[torch.Tensor], scores: list[float], is_match: list[bool], out: str | Path, ncol: int = 5
) -> Path:
    """Write the gallery PNG.

    Args:
        query: the sentence searched for.
        images: top-k images as (3, H, W) uint8 tensors, best first.
        scores: their scores; is_match: True where the image is a ground-truth match of the query.
    """
    frames = []
    for img, match in zip(images, is_match, strict=True):
        thumb = torch.nn.functional.interpolate(img[None].float(), size=(THUMB, THUMB), mode="nearest")[0]
        colour = torch.tensor([40.0, 200.0, 60.0] if match else [160.0, 160.0, 160.0])[:, None, None]
        framed = colour.expand(3, THUMB + 8 + LABEL_H, THUMB + 8).clone()  # (3, H, W): label strip below
        framed[:, 4 : 4 + THUMB, 4 : 4 + THUMB] = thumb
        frames.append(framed.to(torch.uint8))
    grid = make_grid(frames, nrow=ncol, padding=6, pad_value=255)  # (3, Hg, Wg)
    body = to_pil_image(grid)
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(body)
    step_x, step_y = THUMB + 8 + 6, THUMB + 8 + LABEL_H + 6
    for k, (score, match) in enumerate(zip(scores, is_match, strict=True)):
        x, y = 6 + (k % ncol) * step_x, 6 + (k // ncol) * step_y
        label = f"#{k + 1}  {score:.3f}" + ("  match" if match else "")
        draw.text((x + 5, y + THUMB + 9), label, fill=(0, 0, 0), font=font)
    lines = textwrap.wrap(f"query: {query}", width=max(30, body.width // 7))
    header_h = 10 + 14 * len(lines)
    canvas = Image.new("RGB", (body.width, body.height + header_h), "white")
    hd = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        hd.text((8, 6 + 14 * i), line, fill=(0, 0, 0), font=font)
    canvas.paste(body, (0, header_h))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
