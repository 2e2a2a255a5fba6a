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
LABEL_H = 28  # label strip under each thumbnail: rank and score, then the file name


def draw_gallery(
    query: str,
    images: list[torch.Tensor],
    scores: list[float],
    is_match: list[bool],
    out: str | Path,
    ncol: int = 5,
    names: list[str] | None = None,
    match_rank: tuple[str, int] | None = None,
) -> Path:
    """Write the gallery PNG.

    Args:
        query: the sentence searched for.
        images: top-k images as (3, H, W) uint8 tensors, best first.
        scores: their scores; is_match: True where the image is a ground-truth match of the query.
        names: file names drawn under each tile.
        match_rank: (file name, 1-based rank) of the true match when it is not among the tiles.
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
        if names:
            draw.text((x + 5, y + THUMB + 9 + 10), _fit(names[k], THUMB // 6), fill=(0, 0, 0), font=font)
    lines = textwrap.wrap(f"query: {query}", width=max(30, body.width // 7))
    if match_rank is not None:
        lines.append(f"true match {match_rank[0]} at rank {match_rank[1]} (not shown)")
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


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


def draw_caption_gallery(
    image: torch.Tensor, captions: list[str], scores: list[float], is_match: list[bool], out: str | Path
) -> Path:
    """Write a PNG of an image query: the image on the left, its top-k captions (rank, score, a mark on
    the image's own captions) on the right. image (3, H, W) uint8."""
    thumb = torch.nn.functional.interpolate(image[None].float(), size=(THUMB, THUMB), mode="nearest")[0]
    font = ImageFont.load_default()
    rows = [
        f"#{k + 1}  {s:.3f}  {'[match] ' if m else ''}{c}"
        for k, (c, s, m) in enumerate(zip(captions, scores, is_match, strict=True))
    ]
    lines = [line for row in rows for line in textwrap.wrap(row, width=70, subsequent_indent="      ")]
    canvas = Image.new("RGB", (THUMB + 16 + 7 * 72, max(THUMB + 16, 12 + 14 * len(lines))), "white")
    canvas.paste(to_pil_image(thumb.to(torch.uint8)), (8, 8))
    draw = ImageDraw.Draw(canvas)
    y = 8
    for line in lines:
        colour = (20, 140, 40) if "[match]" in line else (0, 0, 0)
        draw.text((THUMB + 16, y), line, fill=colour, font=font)
        y += 14
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
