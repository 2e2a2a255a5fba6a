"""JSONL image-caption datasets (one JSON object per line), and conversion to and from the Karpathy-split
JSON of Flickr30K and COCO (Karpathy & Fei-Fei, CVPR 2015).

A line is one image, the *canonical entry* every format converts to:

    {"image": "rel/path.jpg", "captions": ["...", ...], "split": "train", "id": 17, "pid": 3}

`image` is relative to `data.image_dir` (default `{root}/images`); `id` (default: the image path) must be
unique; `pid` (person identity) is optional and makes relevance identity-based in person search. Other
keys (e.g. `boxes`, `twin`) travel through conversions unchanged. The file is
`{root}/{data.json_name or 'dataset.jsonl'}`; blank lines are allowed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath

from crossmatch.config import DataConfig
from crossmatch.data.datasets import (  # noqa: F401  (karpathy_to_entries is re-exported)
    ANNOTATION_KEY,
    ImageCaptionDataset,
    check_entry,
    dataset_from_entries,
    karpathy_to_entries,
    parse_json,
    read_karpathy_json,
    read_text,
)
from crossmatch.data.formats import register_format
from crossmatch.errors import DataError
from crossmatch.files import MAX_ANNOTATION_BYTES, open_regular, write_text

DEFAULT_NAME = "dataset.jsonl"
ENTRY_KEYS = ("image", "captions", "split", "id", "pid")


def read_jsonl(path: str | Path, max_line_bytes: int = MAX_ANNOTATION_BYTES) -> list[dict]:
    """Every entry of a JSONL dataset file, its types checked (`check_entry`; captions and files are not
    checked). The file is streamed line by line (only a regular file: `open_regular`); a line may hold at
    most `max_line_bytes` (`data.max_annotation_bytes`).

    Raises:
        DataError: missing, unreadable or special file, a line that is not UTF-8 or not a JSON object, or
            an entry without "image"/"captions" or with a key of the wrong type.
    """
    path = Path(path)
    entries = []
    with open_regular(path, "dataset file") as f:
        for n, raw in enumerate(iter(lambda: f.readline(max_line_bytes + 1), b""), 1):
            if len(raw.rstrip(b"\n")) > max_line_bytes:  # its newline aside
                raise DataError(f"{path} line {n} holds more than {ANNOTATION_KEY}={max_line_bytes} bytes")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                byte = err.object[err.start]
                raise DataError(f"dataset file {path} is not UTF-8 text (byte 0x{byte:02x} on line {n})") from err
            if not line.strip():
                continue
            entry = parse_json(line, f"{path} line {n}")
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                raise DataError(f"{path} line {n} has no 'image' path (expected {{'image': ..., 'captions': [...]}})")
            if not isinstance(entry.get("captions"), list):
                raise DataError(f"{path} line {n} ({entry['image']}) has no 'captions' list")
            check_entry(entry, f"{path} line {n} ({entry['image']})")
            entries.append(entry)
    return entries


def write_jsonl(entries: list[dict], path: str | Path) -> Path:
    """Write entries one per line, atomically (a temporary file renamed onto `path`)."""
    return write_text(path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))


def entries_to_karpathy(entries: list[dict], dataset: str = "converted") -> dict:
    """Canonical entries -> Karpathy-split JSON; sentence ids run over all captions in order."""
    images, sentid = [], 0
    for i, e in enumerate(entries):
        path = PurePosixPath(e["image"])
        imgid = e.get("id", i)
        sents, negatives = [], e.get("negatives") or []
        for c, raw in enumerate(e["captions"]):
            tokens = re.findall(r"\w+", raw.lower()) if isinstance(raw, str) else []
            sents.append({"raw": raw, "tokens": tokens, "imgid": imgid, "sentid": sentid})
            if c < len(negatives) and negatives[c]:  # per-caption negatives go back onto their sentence
                sents[-1]["negatives"] = negatives[c]
            sentid += 1
        img = {"filename": path.name, "imgid": imgid, "split": e.get("split")}
        if str(path.parent) != ".":
            img["filepath"] = str(path.parent)
        img.update({"sentids": [s["sentid"] for s in sents], "sentences": sents})
        img.update({k: v for k, v in e.items() if (k not in ENTRY_KEYS or k == "pid") and k != "negatives"})
        images.append(img)
    return {"dataset": dataset, "images": images}


def read_karpathy_entries(path: str | Path, max_bytes: int = MAX_ANNOTATION_BYTES) -> list[dict]:
    """A Karpathy-split JSON file -> canonical entries (checked as the training reader checks them)."""
    return karpathy_to_entries(read_karpathy_json(Path(path), max_bytes), path)


@register_format("jsonl")
def jsonl(cfg: DataConfig, split: str) -> ImageCaptionDataset:
    """{root}/{json_name or dataset.jsonl}, images under data.image_dir or {root}/images."""
    root = Path(cfg.root)
    path = root / (cfg.json_name or DEFAULT_NAME)
    image_dir = Path(cfg.image_dir) if cfg.image_dir else root / "images"
    splits = cfg.splits_to_read(split)
    entries = read_jsonl(path, cfg.max_annotation_bytes)
    return dataset_from_entries(entries, splits, image_dir, path, root, cfg.allow_outside_root)
