"""Validation and conversion of dataset files, format by format. Files are read by the training readers
themselves (one source of truth: an entry they refuse, such as a list-valued id or a string person id, stops
validation with their one-line message); then `check_entries` scans every entry and reports every problem
(no images at all, missing or undecodable images, empty captions, images without captions, duplicate ids,
one image file under two ids, image paths that leave the image folder, entries without a split) with
per-split statistics.

Formats: Karpathy-split JSON (Flickr30K, COCO), JSONL (crossmatch.data.jsonl), the person-search files
of CUHK-PEDES, ICFG-PEDES and RSTPReid (crossmatch.data.pedes), WebDataset tar shards
(crossmatch.data.shards), open_clip's CSV tables and folders of images with .txt captions
(crossmatch.data.csv_folder). All are read into canonical entries {"image", "captions", "split", "id"?, "pid"?},
which is also what conversion writes out.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from crossmatch.data.csv_folder import read_csv_entries, read_folder_entries
from crossmatch.data.datasets import outside_root
from crossmatch.data.jsonl import entries_to_karpathy, read_jsonl, read_karpathy_entries, write_jsonl
from crossmatch.data.pedes import IMAGE_DIR as PEDES_IMAGE_DIR
from crossmatch.data.pedes import PEDES, read_pedes
from crossmatch.data.remote import is_url
from crossmatch.data.shards import decode_image, is_shard_spec, read_shard_entries, write_shards
from crossmatch.data.transforms import load_image
from crossmatch.errors import ConfigError, DataError
from crossmatch.files import write_text

# format -> (default annotation file, default image folder), both relative to the dataset root.
DEFAULTS: dict[str, tuple[str, str]] = {
    "karpathy": ("dataset.json", "images"),
    "jsonl": ("dataset.jsonl", "images"),
    **{fmt: (spec.file, PEDES_IMAGE_DIR) for fmt, spec in PEDES.items()},
    "webdataset": ("", ""),  # a folder of .tar shards or a brace pattern: images inside the shards
    "csv": ("", ""),  # {split}.csv tables (a file, or every *.csv of a folder); images relative to their folder
    "folder": ("", ""),  # images with same-name .txt captions under the folder
}
EXAMPLES = 3  # culprits printed per kind of problem


@dataclass
class Source:
    """A dataset file and how to read it."""

    fmt: str  # a key of DEFAULTS
    file: Path  # the annotation file (csv: a table or the folder of tables; folder: the folder)
    image_dir: Path  # folder the image paths are relative to
    options: dict = field(default_factory=dict)  # csv: img_key, caption_key, sep; folder: split_file


def guess_format(file: Path) -> str:
    """The format of an annotation file from its name: *.jsonl, the person-search names, else Karpathy."""
    if file.suffix == ".jsonl":
        return "jsonl"
    return next((fmt for fmt, spec in PEDES.items() if spec.file == file.name), "karpathy")


def resolve_source(
    path: str | Path, fmt: str | None = None, json_name: str = "", image_dir: str = "", options: dict | None = None
) -> Source:
    """PATH (a dataset folder or its annotation file) + optional format, file name and image folder -> Source.
    A folder without an annotation file is read as CSV tables when it holds *.csv files, else as a folder of
    images with .txt captions. `options`: the csv and folder readers' settings (see Source).

    Raises:
        ConfigError: unknown format, or a folder holding no known annotation file.
    """
    if fmt is not None and fmt not in DEFAULTS:
        raise ConfigError(f"unknown format {fmt!r}; known: {', '.join(DEFAULTS)}")
    if fmt == "webdataset" or (fmt is None and is_shard_spec(path)):
        spec = str(path) if is_url(str(path)) else Path(path)  # Path would fold "http://" into "http:/"
        return Source("webdataset", spec, spec)
    path, options = Path(path), options or {}
    if fmt in ("csv", "folder") or (fmt is None and path.suffix == ".csv"):
        fmt = fmt or "csv"
        folder = path.parent if path.is_file() else path
        return Source(fmt, path, Path(image_dir) if image_dir else folder, options)
    if path.exists() and not path.is_dir():  # a FIFO or a device too: the reader refuses it in one line
        file = path
    elif json_name:
        file = path / json_name
    else:
        names = [DEFAULTS[fmt][0]] if fmt else [name for name, _ in DEFAULTS.values() if name]
        found = [path / n for n in names if (path / n).exists() and not (path / n).is_dir()]
        found += sorted(path.glob("dataset_*.json"))
        if not found and fmt is None and path.is_dir():  # no annotation file: tables, else images with captions
            fmt = "csv" if any(path.glob("*.csv")) else "folder"
            return Source(fmt, path, Path(image_dir) if image_dir else path, options)
        if not found:
            raise ConfigError(f"no dataset file in {path} (looked for {', '.join(names)}); pass --json-name")
        file = found[0]
    fmt = fmt or guess_format(file)
    return Source(fmt, file, Path(image_dir) if image_dir else file.parent / DEFAULTS[fmt][1])


def read_entries(src: Source) -> list[dict]:
    """Every canonical entry of the source file, in file order, through the training readers themselves: an
    entry that training would refuse (a key of the wrong type, bad negatives) is refused here in the same
    words (`crossmatch.data.datasets.check_entry`); content (images, empty captions, ids) is checked by
    `check_entries`."""
    if src.fmt == "jsonl":
        return read_jsonl(src.file)
    if src.fmt in PEDES:
        return read_pedes(src.file, src.fmt)
    if src.fmt == "webdataset":
        return read_shard_entries(src.file)[0]
    if src.fmt == "csv":  # a table is the split of its name
        tables = [src.file] if src.file.is_file() else sorted(src.file.glob("*.csv"))
        if not tables:
            raise DataError(f"no .csv table in {src.file}")
        keys = ("img_key", "caption_key", "sep")
        return [
            e
            for t in tables
            for e in read_csv_entries(t, t.stem, **{k: src.options[k] for k in keys if k in src.options})
        ]
    if src.fmt == "folder":
        return read_folder_entries(src.file, src.options.get("split_file", ""))
    return read_karpathy_entries(src.file)


@dataclass
class Report:
    """What `check_entries` found: culprits per kind of problem, and per-split statistics."""

    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    captions_per_image: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    pids: dict[str, set] = field(default_factory=lambda: defaultdict(set))

    @property
    def n_problems(self) -> int:
        return sum(len(v) for v in self.problems.values())


def check_shards(root: Path, progress: bool = False) -> Report:
    """`check_entries` for WebDataset shards: samples that cannot be read (corrupt tar member, no image, no
    caption) are problems too, and images are decoded from the shards' bytes."""
    problems: list[str] = []
    entries, blobs = read_shard_entries(root, problems.append, progress)
    report = check_entries(entries, root, progress, blobs=blobs)
    found = defaultdict(list)  # the shard problems first: they name shard and key
    for message in problems:  # iter_shard's messages: a broken tar or oversized member, else a bad sample
        unreadable = "corrupt tar" in message or "max_shard_member_bytes" in message
        found["unreadable sample" if unreadable else "bad sample (image, caption or json)"].append(message)
    for kind, culprits in report.problems.items():
        found[kind] += culprits
    report.problems = found
    return report


def check_entries(
    entries: list[dict],
    image_dir: Path,
    progress: bool = False,
    allow_outside_root: bool = False,
    blobs: dict[str, bytes] | None = None,
) -> Report:
    """Scan every entry: split and id bookkeeping first, then decode each image once (with a progress bar).
    Image paths that leave `image_dir` (absolute, `..`) are problems unless `allow_outside_root`.
    `blobs`: image bytes by entry name, for images that are not files under `image_dir` (shards)."""
    report, seen, first_id = Report(), Counter(), {}  # first_id: image path -> the id it was first listed under
    if not entries:
        report.problems["no images"].append("the file lists no image")
    for e in entries:
        split, name = e.get("split"), e["image"]
        if not isinstance(split, str) or not split:
            report.problems["no split"].append(name)
        caps = e.get("captions", [])
        report.captions_per_image[str(split)].append(len(caps))
        if e.get("pid") is not None:
            report.pids[str(split)].add(e["pid"])
        if not caps:
            report.problems["image without captions"].append(name)
        bad = [k for k, c in enumerate(caps) if not isinstance(c, str) or not c.strip()]
        report.problems["empty caption"] += [f"{name} (caption {k})" for k in bad]
        key = json.dumps(e.get("id", name), sort_keys=True)  # ids may be ints or strings: compare exactly
        seen[key] += 1
        if seen[key] == 2:
            report.problems["duplicate id"].append(f"{key} ({name})")
        if name not in first_id:
            first_id[name] = key
            if not allow_outside_root and outside_root(name):
                report.problems["image outside the image folder"].append(name)
        elif first_id[name] != key:  # one picture listed twice: its captions would count as two images
            report.problems["duplicate image file"].append(f"{name} (ids {first_id[name]} and {key})")
    paths = [p for p in first_id if allow_outside_root or not outside_root(p)]
    for name in tqdm(paths, desc="decode images", unit="img", disable=not progress):
        if blobs is not None:
            try:
                decode_image(blobs[name], name)
            except DataError as err:
                report.problems["unreadable image"].append(str(err))
            continue
        file = image_dir / name
        if not file.is_file():
            report.problems["missing image"].append(str(file))
            continue
        try:
            load_image(file)
        except DataError as err:
            report.problems["unreadable image"].append(str(err).removeprefix("cannot decode image "))
    return report


def format_report(src: Source, report: Report) -> str:
    """The summary table: per split images, captions, captions per image (min/mean/max), identities;
    then every kind of problem with its count and first culprits."""
    lines = [f"{src.file} (format {src.fmt}, images under {src.image_dir})"]
    lines.append(f"{'split':10}{'images':>9}{'captions':>10}{'cap/img min':>13}{'mean':>7}{'max':>5}{'ids':>8}")
    for split, counts in report.captions_per_image.items():
        ids = len(report.pids[split]) if report.pids[split] else "-"
        lines.append(
            f"{split:10}{len(counts):9d}{sum(counts):10d}{min(counts):13d}"
            f"{statistics.mean(counts):7.2f}{max(counts):5d}{ids:>8}"
        )
    if not report.n_problems:
        lines.append("no problems found")
        return "\n".join(lines)
    lines.append(f"{report.n_problems} problem(s):")
    for kind, culprits in report.problems.items():
        if culprits:
            more = f" (+{len(culprits) - EXAMPLES} more)" if len(culprits) > EXAMPLES else ""
            lines.append(f"  {kind:24}{len(culprits):6d}  e.g. {'; '.join(culprits[:EXAMPLES])}{more}")
    return "\n".join(lines)


def first_problem(report: Report) -> str:
    kind, culprits = next((k, v) for k, v in report.problems.items() if v)
    return f"{kind}: {culprits[0]}"


def convert(src: Source, dst: str | Path, to: str, shard_size: int = 1000) -> Path:
    """Write the entries of `src` to `dst` as `to` (karpathy | jsonl: image paths stay relative to
    `src.image_dir`; webdataset: `dst` is a folder of `{split}-NNNNNN.tar` shards of `shard_size` samples
    holding the images). Returns the written path.

    Raises:
        ConfigError: unknown target format, or `dst` is the source file itself.
    """
    dst = Path(dst)
    if to not in ("karpathy", "jsonl", "webdataset"):
        raise ConfigError(f"--to {to!r}: choose karpathy, jsonl or webdataset")
    if dst.resolve() == src.file.resolve():
        raise ConfigError(f"{dst} is the source file; choose another output path")
    if src.fmt == "webdataset" and to != "webdataset":
        raise ConfigError("shards hold their images: converting them to a JSON format needs the images as files")
    entries = read_entries(src)
    if to == "webdataset":
        write_shards(entries, src.image_dir, dst, shard_size)
        return dst
    if to == "jsonl":
        return write_jsonl(entries, dst)
    return write_text(dst, json.dumps(entries_to_karpathy(entries, dataset=src.file.stem), ensure_ascii=False))
