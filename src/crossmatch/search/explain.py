"""Word-to-region attention pictures for SCAN (Lee et al., "Stacked Cross Attention for Image-Text
Matching", ECCV 2018, figures 1 and 5): for each retrieved image, one small panel per query word with that
word's attention over the image's regions overlaid, the word written under it.

Regions are either the cells of an (h, w) grid (the attention map is upsampled over the image) or boxes
(each box is tinted by its weight; overlapping boxes add up). Used by `crossmatch search --explain`.

Legend: R regions, n words of the query, P panel side in pixels.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

PANEL = 96  # panel side in pixels
LABEL_H = 16  # text strip under each panel
GAP = 6  # space between panels and rows
HEAT = (255.0, 40.0, 0.0)  # tint of attended pixels


def attention_map(attention: Tensor, regions: tuple[int, int] | Tensor, side: int = PANEL) -> Tensor:
    """One word's attention over the regions -> a (side, side) map in [0, 1] (1 at its maximum).

    Args:
        attention: (R,) weights of the word over the regions.
        regions: (h, w) for grid cells in row-major order, or (R, 4) xyxy boxes as fractions of the image side.
    """
    att = attention.detach().float().cpu()
    if isinstance(regions, tuple):
        h, w = regions
        grid = att.view(1, 1, h, w)  # (1, 1, h, w)
        heat = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)[0, 0]  # (P, P)
    else:
        heat = torch.zeros(side, side)
        for weight, box in zip(att.tolist(), (regions.float().cpu() * side).round().long().tolist(), strict=True):
            x0, y0, x1, y1 = max(box[0], 0), max(box[1], 0), min(box[2], side), min(box[3], side)
            heat[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)] += weight  # degenerate boxes still cover a pixel
    heat = heat - heat.min()
    return heat / heat.max().clamp_min(1e-12)


def overlay(image: Tensor, heat: Tensor) -> Tensor:
    """(3, P, P) uint8 image with a (P, P) heat map in [0, 1]: attended pixels bright and tinted, others dimmed."""
    img = image.float()
    tint = torch.tensor(HEAT)[:, None, None]  # (3, 1, 1)
    out = img * (0.25 + 0.75 * heat) * (1 - 0.35 * heat) + tint * 0.35 * heat  # (3, P, P)
    return out.clamp(0, 255).to(torch.uint8)


def _thumb(image: Tensor) -> Tensor:
    """(3, H, W) uint8 -> (3, P, P) uint8."""
    return F.interpolate(image[None].float(), size=(PANEL, PANEL), mode="bilinear", antialias=True)[0].to(torch.uint8)


def draw_attention(
    images: list[Tensor],
    words: list[str],
    attentions: list[Tensor],
    regions: list[tuple[int, int] | Tensor],
    out: str | Path,
    labels: list[str] | None = None,
    title: str = "",
) -> Path:
    """Write the attention picture: a row per image, the image then one panel per word.

    Args:
        images: the images, (3, H, W) uint8 each.
        words: the n words of the query, in order.
        attentions: per image, the (n, R) attention of each word over its regions (rows sum to 1).
        regions: per image, (h, w) for grid regions or (R, 4) xyxy boxes as fractions of the image side.
        out: PNG path; its folder is created.
        labels: per image, a short text written under the image (e.g. rank and score).
        title: a line written above everything (e.g. the query).
    Returns:
        The PNG path. Its width grows with the number of words: (1 + n) panels.
    """
    n = len(words)
    font = ImageFont.load_default()
    header = LABEL_H + GAP if title else 0
    width = GAP + (1 + n) * (PANEL + GAP)
    height = header + GAP + len(images) * (PANEL + LABEL_H + GAP)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((GAP, GAP), title, fill=(0, 0, 0), font=font)
    for row, (image, att, geom) in enumerate(zip(images, attentions, regions, strict=True)):
        if att.shape[0] != n:
            raise ValueError(f"attention of image {row} has {att.shape[0]} rows for {n} words")
        y = header + GAP + row * (PANEL + LABEL_H + GAP)
        thumb = _thumb(image)  # (3, P, P)
        panels = [thumb] + [overlay(thumb, attention_map(att[k], geom)) for k in range(n)]
        texts = [labels[row] if labels else ""] + list(words)
        for col, (panel, text) in enumerate(zip(panels, texts, strict=True)):
            x = GAP + col * (PANEL + GAP)
            canvas.paste(Image.fromarray(panel.permute(1, 2, 0).numpy()), (x, y))
            draw.text((x + 2, y + PANEL + 2), text[:16], fill=(0, 0, 0), font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def explain_path(out: str | Path | None) -> Path:
    """`--out FILE.png` -> `FILE_explain.png`; no --out -> `search_explain.png` in the current folder."""
    if not out:
        return Path("search_explain.png")
    out = Path(out)
    return out.with_name(f"{out.stem}_explain.png")


EXPLAIN_ROWS = 5  # top images drawn by `crossmatch search --explain`


@torch.no_grad()
def explain_search(
    model,
    image_view,
    ds,
    feats: tuple[dict[str, Tensor], dict[str, Tensor]],
    words: list[str],
    results: list[tuple[int, float]],
    out: str | Path,
) -> Path:
    """Draw the query words' attention over the top `EXPLAIN_ROWS` images of a text search.

    Args:
        model: a model with `word_attention(img, txt) -> (n, R)` and `region_layout(batch)`.
        image_view: the split's per-image Dataset (item i: {"image", "image_idx"[, "boxes"]}).
        ds: the split (its `images[i].path` are the image files).
        feats: (image features of the whole split, features of the one query caption).
        words: the query's words, one per real token.
        results: (image index, score), best first.
        out: the PNG path.
    Raises:
        DataError: the images have no pixels to draw on (precomputed features).
    """
    from crossmatch.data.loaders import collate
    from crossmatch.data.transforms import load_image
    from crossmatch.errors import DataError
    from crossmatch.tensors import slice_features, to_device

    img, txt = feats
    device = next(model.parameters()).device
    pics, atts, layouts, labels = [], [], [], []
    for rank, (i, score) in enumerate(results[:EXPLAIN_ROWS], 1):
        layout = model.region_layout(to_device(collate([image_view[i]]), device))
        if layout is None:
            raise DataError("--explain draws attention over image pixels; precomputed region features have none")
        atts.append(model.word_attention(slice_features(img, slice(i, i + 1)), txt).cpu())  # (n, R)
        layouts.append(layout if isinstance(layout, tuple) else layout[0].cpu())
        pics.append(load_image(ds.images[i].path))
        labels.append(f"#{rank} {score:.3f}")
    return draw_attention(pics, words, atts, layouts, out, labels, title="query: " + " ".join(words))
