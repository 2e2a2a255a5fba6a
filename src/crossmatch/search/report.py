"""Static HTML retrieval reports: per text query, the top-k images with their scores, the ground-truth
match framed in green and the rank of the true match, in one self-contained file (thumbnails embedded as
base64 PNG) that can be mailed or attached to an issue. The failure-first ordering follows the error
analysis habit of the retrieval literature (e.g. the qualitative figures of VSE++, Faghri et al., 2018).

Legend: N_img images, N_txt captions (queries), k results per query.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from crossmatch.data.transforms import load_image
from crossmatch.errors import ConfigError, DataError
from crossmatch.files import write_text
from crossmatch.metrics import pessimistic_ranks

THUMB = 128  # thumbnail side in pixels
Result = tuple[str | Path, float, bool]  # (image path, score, is ground-truth match)

_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
section { border-top: 1px solid #ccc; padding: 0.6em 0; }
.query { font-size: 1.1em; margin: 0.2em 0; }
table.metrics { border-collapse: collapse; margin: 0.5em 0; }
table.metrics th, table.metrics td { border: 1px solid #ccc; padding: 2px 6px; font-size: 0.85em; }
.rank { color: #555; margin: 0.2em 0 0.5em; }
.rank.miss { color: #b00; }
.row { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; width: %dpx; text-align: center; font-size: 0.8em; }
figure img, figure .bad { width: %dpx; height: %dpx; object-fit: contain; border: 4px solid #aaa;
  image-rendering: pixelated; }
figure.match img, figure.match .bad { border-color: #28c83c; }
figure .bad { display: flex; align-items: center; justify-content: center; background: #eee; }
figcaption { overflow-wrap: anywhere; }
"""


def thumbnail_data_uri(path: str | Path, side: int = THUMB) -> str | None:
    """The image as a `data:image/png;base64,...` thumbnail (longest side at most `side`: small images stay
    small and the page scales them up); None when unreadable. Decoded as for the model (`load_image`: pixel
    limit, EXIF orientation, transparency, 16-bit greyscale), so the page shows what the model saw."""
    try:
        pixels = load_image(path)  # (3, H, W) uint8
    except DataError:
        return None
    im = Image.fromarray(pixels.permute(1, 2, 0).numpy())  # (H, W, 3)
    im.thumbnail((side, side), Image.Resampling.BICUBIC)  # shrinks only
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(path: str | Path, score: float, match: bool, label: str) -> str:
    name = html.escape(Path(path).name)
    uri = thumbnail_data_uri(path)
    pic = f'<img src="{uri}" alt="{name}">' if uri else f'<div class="bad">unreadable<br>{name}</div>'
    tag = " &#10003; match" if match else ""
    return (
        f'<figure class="{"match" if match else "other"}">{pic}'
        f"<figcaption>{html.escape(label)} {score:.4f}{tag}<br>{name}</figcaption></figure>"
    )


def _section(
    q: int, query: str, results: list[Result], rank: int | None, missed: tuple[str | Path, float] | None
) -> str:
    lines = [f'<section id="q{q}">', f'<p class="query"><b>Query {q + 1}:</b> {html.escape(query)}</p>']
    if rank is not None:
        shown = rank <= len(results)
        where = "" if shown else f" (outside the top {len(results)})"
        lines.append(f'<p class="rank{"" if shown else " miss"}">rank of the true match: <b>{rank}</b>{where}</p>')
    figs = [_figure(p, s, m, f"#{r}") for r, (p, s, m) in enumerate(results, 1)]
    if missed is not None and (rank is None or rank > len(results)):
        figs.append(_figure(missed[0], missed[1], True, f"true match #{rank}" if rank else "true match"))
    lines += ['<div class="row">', *figs, "</div>", "</section>"]
    return "\n".join(lines)


def write_html_report(
    path: str | Path,
    queries: list[str],
    results: list[list[Result]],
    ranks: list[int] | None = None,
    title: str = "crossmatch retrieval report",
    *,
    missed: list[tuple[str | Path, float] | None] | None = None,
    metrics: dict[str, float] | None = None,
) -> Path:
    """Write one self-contained HTML page with a section per query.

    Args:
        queries: the query sentences.
        results: per query, the top-k (image path, score, is_match), best first.
        ranks: per query, the 1-based rank of the true match (shown also when it is outside the top-k);
            None when there is no ground truth (free-text search).
        title: page title and heading.
        missed: per query, (path, score) of the true match, drawn after the top-k when it is not in it.
        metrics: the split's metrics, shown as a table under the title.

    Returns:
        The path written.
    """
    if len(results) != len(queries) or (ranks is not None and len(ranks) != len(queries)):
        raise ConfigError(f"report: {len(queries)} queries but {len(results)} result lists / ranks")
    n = len(queries)
    head = f"<h1>{html.escape(title)}</h1>{_metrics_table(metrics) if metrics else ''}<p>"
    head += f"{n} quer{'y' if n == 1 else 'ies'}"
    if ranks:
        r = np.asarray(ranks)
        head += f"; true match at rank 1 for {(r == 1).sum()} of {n}, median rank {float(np.median(r)):g}"
    sections = [
        _section(q, queries[q], results[q], ranks[q] if ranks else None, missed[q] if missed else None)
        for q in range(n)
    ]
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{_CSS % (THUMB + 8, THUMB, THUMB)}</style></head><body>",
            head + "</p>",
            *sections,
            "</body></html>",
        ]
    )
    return write_text(path, page)


def _metrics_table(metrics: dict[str, float]) -> str:
    cells = "".join(f"<th>{html.escape(k)}</th>" for k in metrics)
    values = "".join(f"<td>{v:.2f}</td>" for v in metrics.values())
    return f'<table class="metrics"><tr>{cells}</tr><tr>{values}</tr></table>'


def write_caption_report(
    path: str | Path, image: str | Path, results: list[tuple[str, float, bool]], title: str = "crossmatch search"
) -> Path:
    """An image query's page: the image, then its top-k captions (rank, score; the image's own captions
    marked). results: (caption, score, is_match), best first."""
    uri = thumbnail_data_uri(image)
    img = f'<img src="{uri}" alt="{html.escape(Path(image).name)}">' if uri else html.escape(str(image))
    rows = "".join(
        f'<li class="{"match" if m else ""}">{s:.4f} {html.escape(c)}{" (match)" if m else ""}</li>'
        for c, s, m in results
    )
    n_match = sum(m for _, _, m in results)
    head = f"<h1>{html.escape(title)}</h1><p>query image {html.escape(Path(image).name)}; {n_match} of its own"
    head += f" captions among the top {len(results)}</p>"
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS % (THUMB + 8, THUMB, THUMB)}"
        " li.match { color: #1a7f37; }</style>"
        f"</head><body>{head}<figure>{img}</figure><ol>{rows}</ol></body></html>"
    )
    return write_text(path, page)


def report_from_scores(
    path: str | Path,
    scores: torch.Tensor | np.ndarray,
    captions: Sequence[str],
    image_paths: Sequence[str | Path],
    txt_to_img: torch.Tensor | Sequence[int],
    top_k: int = 5,
    max_queries: int = 50,
    sort: str = "worst",
    title: str = "crossmatch text-to-image retrieval",
    metrics: dict[str, float] | None = None,
) -> Path:
    """Text-to-image report from a score matrix: picks `max_queries` captions as queries and draws their
    top-k images (`metrics`, when given, are shown as a table under the title).

    Args:
        scores: (N_img, N_txt) similarity of every image with every caption.
        captions: N_txt caption strings; image_paths: N_img image files.
        txt_to_img: (N_txt,) index of each caption's image.
        sort: "worst" puts the captions whose image ranks lowest first (ties: caption order), so the page
            opens on the model's failures; "first" keeps the caption order.
    """
    s = torch.as_tensor(scores).float().cpu()  # (N_img, N_txt)
    t2i = torch.as_tensor(txt_to_img).long()  # (N_txt,)
    if s.shape != (len(image_paths), len(captions)) or len(t2i) != len(captions):
        raise ConfigError(
            f"report: scores {tuple(s.shape)} do not match {len(image_paths)} images x {len(captions)} captions"
        )
    if sort not in ("worst", "first"):
        raise ConfigError(f"report sort={sort!r}: choose 'worst' or 'first'")
    if len(t2i) and (t2i.min() < 0 or t2i.max() >= s.shape[0]):
        raise ConfigError(f"report: txt_to_img holds image indices outside [0, {s.shape[0]})")
    # (N_txt,) 1-based rank of each caption's image, ties against the model; a report's gallery may hold
    # images without captions, which metrics.ranks_t2i refuses
    own = t2i[:, None] == torch.arange(s.shape[0])[None, :]  # (N_txt, N_img)
    ranks = pessimistic_ranks(s.t(), own) + 1
    order = list(range(len(captions)))
    if sort == "worst":
        order.sort(key=lambda t: (-int(ranks[t]), t))
    picked = order[:max_queries]
    results, missed = [], []
    for t in picked:
        top = s[:, t].topk(min(top_k, s.shape[0]))  # (k,)
        gt = int(t2i[t])
        hits = zip(top.indices.tolist(), top.values.tolist(), strict=True)
        results.append([(image_paths[i], v, i == gt) for i, v in hits])
        missed.append((image_paths[gt], float(s[gt, t])))
    return write_html_report(
        path,
        [captions[t] for t in picked],
        results,
        [int(ranks[t]) for t in picked],
        title,
        missed=missed,
        metrics=metrics,
    )
