"""Compositional matching in the SugarCrepe/ARO style (Hsieh et al. 2023; Yuksekgonul et al., ICLR 2023):
does the model score an image higher with its caption than with a negative caption that keeps the words and
changes their binding?

A negatives file is JSONL, one triple per line:
    {"image": "images/000123.png", "caption": "...", "negative": "...", "type": "swap_attributes"}
(`crossmatch data shapes` writes one for its test split: test_negatives.jsonl). The image path is relative to
the data root unless absolute. Accuracy = share of triples with score(image, caption) > score(image, negative),
strictly: a tie counts as a failure (the house tie policy: constant scores never look good), per `type` and
overall. Scores are the model's pair score: `score_pairs` (the ITM score of ALBEF/ViLT, as re-ranking uses it)
where the model has one, else its all-pairs `similarity` (dual encoders, SCAN) read at the pair.

Legend: T triples, N_img distinct images, N_txt distinct texts, P distinct (image, text) pairs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from crossmatch.data.datasets import ImageRecord, read_text
from crossmatch.data.transforms import MAX_IMAGE_PIXELS, WHITE
from crossmatch.errors import DataError
from crossmatch.models.protocols import PairScorer
from crossmatch.retrieval.evaluate import encode_all
from crossmatch.retrieval.rerank import score_pair_batches
from crossmatch.tensors import slice_features

TRIPLE_KEYS = ("image", "caption", "negative", "type")
OVERALL = "all"  # the row of every triple in the report


class NegativesFileError(DataError):
    """A bad line of a negatives file; the message names the file and the line number."""


@dataclass(frozen=True)
class Triple:
    image: str  # as written in the file
    path: Path  # the image file (resolved against the data root)
    caption: str
    negative: str
    type: str
    line: int  # 1-based line number in the file


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


def read_negatives(path: str | Path, root: str | Path) -> list[Triple]:
    """Every triple of a negatives file, checked: valid JSON objects with the four string keys, a non-empty
    negative that differs from its caption (ignoring case and spacing), an existing image file.

    Raises:
        NegativesFileError: the first bad line, as "FILE line N: problem"; also a file without any triple.
        DataError: a missing or unreadable file.
    """
    path, root = Path(path), Path(root)
    triples = []
    for n, line in enumerate(read_text(path, "negatives file").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise NegativesFileError(f"{where}: not valid JSON ({err.msg})") from err
        if not isinstance(obj, dict):
            raise NegativesFileError(f"{where}: expected an object with keys {', '.join(TRIPLE_KEYS)}")
        missing = [k for k in TRIPLE_KEYS if k not in obj]
        if missing:
            raise NegativesFileError(f"{where}: missing key {', '.join(repr(k) for k in missing)}")
        for key in TRIPLE_KEYS:
            if not isinstance(obj[key], str):
                raise NegativesFileError(f"{where}: {key!r} must be a string, not {type(obj[key]).__name__}")
            if not obj[key].strip():
                raise NegativesFileError(f"{where}: empty {key!r}")
        if _same_text(obj["caption"], obj["negative"]):
            raise NegativesFileError(f"{where}: the negative equals its caption ({obj['caption'][:60]!r})")
        image = Path(obj["image"])
        file = image if image.is_absolute() else root / image
        if not file.is_file():
            raise NegativesFileError(f"{where}: image {obj['image']} not found (looked for {file})")
        triples.append(Triple(obj["image"], file, obj["caption"].strip(), obj["negative"].strip(), obj["type"], n))
    if not triples:
        raise NegativesFileError(f"{path} line 1: no triples in the file")
    return triples


def unique(items: list) -> tuple[list, Tensor]:
    """Distinct items in order of first appearance, and (len(items),) long positions of the items among them."""
    first: dict = {}
    pos = [first.setdefault(x, len(first)) for x in items]
    return list(first), torch.tensor(pos, dtype=torch.long)


@torch.no_grad()
def pair_scores(
    model: nn.Module, img: dict[str, Tensor], txt: dict[str, Tensor], pairs: Tensor, batch_size: int = 256
) -> Tensor:
    """Scores of (image, text) pairs: pairs (P, 2) long rows into img / txt features -> (P,) float32 CPU.

    Pairs are sorted by image first, so a batch holds few distinct images. Fusion models: `score_pairs` on
    the row-aligned pairs, through the re-ranker's `score_pair_batches` (its stage-2 score). Others: the
    model's `similarity` between the batch's distinct images and its texts, (u, b), read at each pair.
    """
    order = torch.argsort(pairs[:, 0] * (int(pairs[:, 1].max()) + 1) + pairs[:, 1])  # by image, then text
    out = torch.zeros(len(pairs))
    if isinstance(model, PairScorer):
        out[order] = score_pair_batches(model, img, txt, pairs[order], batch_size)
        return out
    device = next(iter(img.values())).device
    for start in range(0, len(pairs), batch_size):
        rows = order[start : start + batch_size]
        i, t = pairs[rows].to(device).unbind(1)  # (b,), (b,)
        u, inv = torch.unique(i, return_inverse=True)  # (u,), (b,)
        block = model.similarity(slice_features(img, u), slice_features(txt, t))  # (u, b)
        out[rows] = block[inv, torch.arange(len(t), device=block.device)].float().cpu()  # (b,)
    return out


class TripleSplit:
    """The distinct images and texts of a list of triples, shaped like an `ImageCaptionDataset` for `ImageView`
    and `CaptionView` (images, captions, txt_to_img, max_image_pixels, background).

    Attributes:
        images: one ImageRecord per distinct image (boxes from `boxes(triple)` when given).
        captions: every distinct text (captions and negatives).
        img_of: (T,) long, the image of each triple. txt_of: (2T,) long, its caption then (from T on) its negative.
        types: (T,) perturbation type of each triple.
    """

    max_image_pixels: int = MAX_IMAGE_PIXELS
    background: tuple[int, ...] = WHITE

    def __init__(self, triples: list[Triple], boxes: Callable[[Triple], list[list[float]] | None] | None = None):
        paths, self.img_of = unique([t.path for t in triples])
        self.captions, self.txt_of = unique([t.caption for t in triples] + [t.negative for t in triples])
        first = {t.path: t for t in reversed(triples)}
        self.images = [ImageRecord(p, k, boxes=boxes(first[p]) if boxes else None) for k, p in enumerate(paths)]
        self.txt_to_img = [0] * len(self.captions)  # unused: CaptionView reads it
        self.types = [t.type for t in triples]


@torch.no_grad()
def score_triples(
    model: nn.Module, split: TripleSplit, image_loader, text_loader, device: torch.device, progress: bool = False
) -> tuple[Tensor, Tensor]:
    """(score(image, caption), score(image, negative)), two (T,) float32 CPU tensors. `image_loader` and
    `text_loader` iterate `ImageView(split, ...)` and `CaptionView(split, ...)` in order: every distinct image
    and text is encoded once, every distinct pair scored once."""
    was_training = model.training
    model.eval()
    try:
        img = encode_all(model.encode_image_features, image_loader, device, "encode images", progress)
        txt = encode_all(model.encode_text_features, text_loader, device, "encode texts", progress)
        T = len(split.img_of)
        pairs = torch.stack([torch.cat([split.img_of, split.img_of]), split.txt_of], 1)  # (2T, 2): pos, then neg
        distinct, where = torch.unique(pairs, dim=0, return_inverse=True)  # (P, 2), (2T,)
        scores = pair_scores(model, img, txt, distinct)[where]  # (2T,)
        return scores[:T], scores[T:]
    finally:
        model.train(was_training)


def compositional_accuracy(pos: Tensor, neg: Tensor, types: list[str]) -> dict[str, dict[str, float | int]]:
    """Per perturbation type (sorted) and overall (`OVERALL`, last): {"accuracy": percent of triples with
    pos > neg, "correct": count, "total": count, "ties": count of pos == neg (they fail; many ties usually mean
    the tokenizer maps caption and negative to the same ids: unknown words, or cut at data.max_words)}.
    pos, neg (T,)."""
    wins, ties = (pos > neg).tolist(), (pos == neg).tolist()
    out = {}
    for kind in [*sorted(set(types)), OVERALL]:
        rows = [k for k, t in enumerate(types) if kind in (t, OVERALL)]
        correct = sum(wins[k] for k in rows)
        out[kind] = {"accuracy": 100.0 * correct / len(rows), "correct": correct, "total": len(rows),
                     "ties": sum(ties[k] for k in rows)}  # fmt: skip
    return out


def format_accuracy_table(report: dict[str, dict[str, float | int]]) -> str:
    """The report of `compositional_accuracy` as a text table, one row per type, `all` last."""
    width = max(12, *(len(k) for k in report))
    lines = [f"{'type':{width}}{'accuracy':>10}{'correct':>9}{'total':>8}{'ties':>7}"]
    for kind, row in report.items():
        lines.append(f"{kind:{width}}{row['accuracy']:10.2f}{row['correct']:9d}{row['total']:8d}{row['ties']:7d}")
    return "\n".join(lines)
