"""Two ways to bring image-caption pairs without writing an annotation file first.

`data.format: csv`, as open_clip's `CsvDataset` reads it: one table per split, `{root}/{split}.csv`, a row per
(image, caption) pair, the image path in column `data.csv_img_key` (default `filepath`) and the caption in
`data.csv_caption_key` (default `title`), columns separated by `data.csv_separator` (default a tab; `\\t`
written out also means a tab). Image paths are relative to `root` (or absolute). The rows of one image are
grouped into one image with several captions, in the order of its first row, so that retrieval counts every
image once.

`data.format: folder`: images anywhere under `root` (any depth), each with a text file of the same name
(`cat.jpg` + `cat.txt`), one caption per line (blank lines skipped). The split of an image is a hash of its
path relative to `root`: SHA-1 mod 100 below 90 is train, below 95 val, else test (stable when images are
added or removed), unless `data.split_file` names a JSON file {relative path: split name}; images it does not
list belong to no split.

Both produce canonical entries ({"image", "captions", "split", "id"}: crossmatch.data.jsonl), read like the
other formats by `data validate` and `data convert`.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from crossmatch.config import DataConfig
from crossmatch.data.datasets import ImageCaptionDataset, dataset_from_entries, load_json, read_text
from crossmatch.data.formats import register_format
from crossmatch.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
HASH_SPLITS = ((90, "train"), (95, "val"), (100, "test"))  # SHA-1 of the relative path mod 100 < bound -> split


def separator(sep: str) -> str:
    """`data.csv_separator` as a character: the two characters `\\t` (as typed in a shell) are a tab.

    Raises:
        DataError: not one character.
    """
    sep = "\t" if sep == "\\t" else sep
    if len(sep) != 1:
        raise DataError(f"data.csv_separator={sep!r}: must be one character (a tab is \\t)")
    return sep


def read_csv_entries(path: Path, split: str, img_key: str = "filepath", caption_key: str = "title", sep: str = "\t"):
    """The canonical entries of one CSV table: one per image, its captions in row order, `split` for all.

    Raises:
        DataError: a missing or unreadable file, a missing column (naming the columns found and the config key to
            set), a row without an image path.
    """
    text = read_text(path, "csv file")
    rows = csv.DictReader(text.splitlines(), delimiter=separator(sep))
    columns = rows.fieldnames or []
    for key, option in ((img_key, "data.csv_img_key"), (caption_key, "data.csv_caption_key")):
        if key not in columns:
            found = ", ".join(repr(c) for c in columns) or "none"
            shown = "tab" if separator(sep) == "\t" else repr(separator(sep))
            raise DataError(
                f"{path} has no column {key!r} (columns: {found}, separated by {shown}); set {option} "
                "or data.csv_separator"
            )
    by_image: dict[str, dict] = {}
    for n, row in enumerate(rows, 2):  # line 1 is the header
        image = (row.get(img_key) or "").strip()
        if not image:
            raise DataError(f"{path} line {n}: no image path in column {img_key!r}")
        entry = by_image.setdefault(image, {"image": image, "captions": [], "split": split, "id": image})
        entry["captions"].append(row.get(caption_key) or "")
    return list(by_image.values())


def hash_split(relative: str) -> str:
    """The split of an image of a folder dataset from its relative path (see the module docstring)."""
    bucket = int(hashlib.sha1(relative.encode("utf-8")).hexdigest(), 16) % 100
    return next(name for bound, name in HASH_SPLITS if bucket < bound)


def read_split_file(path: str | Path) -> dict[str, str]:
    """`data.split_file`: a JSON object {relative image path: split name}.

    Raises:
        DataError: missing, not JSON, or not an object of strings.
    """
    splits = load_json(Path(path), "split file")
    if not isinstance(splits, dict) or not all(isinstance(v, str) for v in splits.values()):
        raise DataError(f"split file {path} must be a JSON object {{image path: split name}}")
    return {Path(k).as_posix(): v for k, v in splits.items()}


def list_images(image_dir: str | Path) -> list[Path]:
    """Every image file under `image_dir` (recursive, by extension), sorted by relative path.

    Raises:
        DataError: `image_dir` is not a folder, or holds no image.
    """
    root = Path(image_dir)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
    return files


def read_folder_entries(root: str | Path, split_file: str | Path = "") -> list[dict]:
    """The canonical entries of a folder dataset, sorted by relative path; an image without its .txt has no
    captions (a problem `data validate` reports and a reader refuses).

    Raises:
        DataError: `root` is not a folder, or holds no image.
    """
    root = Path(root)
    images = list_images(root)
    splits = read_split_file(split_file) if split_file else None
    entries = []
    for image in images:
        rel = image.relative_to(root).as_posix()
        txt = image.with_suffix(".txt")
        captions = (
            [c.strip() for c in read_text(txt, "caption file").splitlines() if c.strip()] if txt.is_file() else []
        )
        split = splits.get(rel) if splits is not None else hash_split(rel)
        entries.append({"image": rel, "captions": captions, "split": split, "id": rel})
    return entries


@register_format("csv")
def csv_format(cfg: DataConfig, split: str) -> ImageCaptionDataset:
    """{root}/{split}.csv (open_clip's CsvDataset layout); image paths relative to root."""
    root = Path(cfg.root)
    entries, files = [], []
    for name in cfg.splits_to_read(split):
        path = root / f"{name}.csv"
        if name != split and not path.is_file():
            continue  # e.g. no restval table
        files.append(path)
        entries += read_csv_entries(path, name, cfg.csv_img_key, cfg.csv_caption_key, cfg.csv_separator)
    return dataset_from_entries(entries, cfg.splits_to_read(split), root, files[0], root, cfg.allow_outside_root)


@register_format("folder")
def folder_format(cfg: DataConfig, split: str) -> ImageCaptionDataset:
    """Images with same-name .txt captions under root; split by path hash or data.split_file."""
    root = Path(cfg.root)
    entries = read_folder_entries(root, cfg.split_file)
    return dataset_from_entries(entries, cfg.splits_to_read(split), root, root, root, cfg.allow_outside_root)
