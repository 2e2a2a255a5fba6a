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
    ImageCaptionDataset,
    dataset_from_entries,
    karpathy_to_entries,
    read_karpathy_json,
    read_text,
)
from crossmatch.data.formats import register_format
from crossmatch.errors import DataError
from crossmatch.files import write_text

DEFAULT_NAME = "dataset.jsonl"
ENTRY_KEYS = ("image", "captions", "split", "id", "pid")


def read_jsonl(path: str | Path) -> list[dict]:
    """Every entry of a JSONL dataset file, checked for structure only (captions and files are not checked).

    Raises:
        DataError: missing or unreadable file (not UTF-8), a line that is not a JSON object, or an entry
            without "image"/"captions".
    """
    path = Path(path)
    lines = read_text(path, "dataset file").splitlines()
    entries = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {n} is not valid JSON: {err.msg}") from err
        except RecursionError as err:
            raise DataError(f"{path} line {n} is nested too deeply to be a dataset entry") from err
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise DataError(f"{path} line {n} has no 'image' path (expected {{'image': ..., 'captions': [...]}})")
        if not isinstance(entry.get("captions"), list):
            raise DataError(f"{path} line {n} ({entry['image']}) has no 'captions' list")
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


def read_karpathy_entries(path: str | Path) -> list[dict]:
    """A Karpathy-split JSON file -> canonical entries."""
    return karpathy_to_entries(read_karpathy_json(Path(path)))


@register_format("jsonl")
def jsonl(cfg: DataConfig, split: str) -> ImageCaptionDataset:
    """{root}/{json_name or dataset.jsonl}, images under data.image_dir or {root}/images."""
    root = Path(cfg.root)
    path = root / (cfg.json_name or DEFAULT_NAME)
    image_dir = Path(cfg.image_dir) if cfg.image_dir else root / "images"
    splits = cfg.splits_to_read(split)
    return dataset_from_entries(read_jsonl(path), splits, image_dir, path, root, cfg.allow_outside_root)
