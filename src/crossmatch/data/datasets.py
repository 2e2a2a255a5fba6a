"""Image–caption datasets in the Karpathy-split JSON format of Flickr30K and COCO (also written by
`crossmatch data shapes`), with explicit image <-> caption maps for evaluation.

A split is read once into `ImageCaptionDataset` (records only, no pixels). Three torch Dataset views
feed the loaders: `PairView` (one item per caption, for training), `ImageView` (one item per image) and
`CaptionView` (one item per caption), so evaluation encodes every image and every caption exactly once.

Text negatives (`loss.text_negatives: K`): a sentence of the Karpathy JSON may carry its own exact negatives,
`"negatives": [{"raw": str, "type": str}, ...]` (written by the shapes generator, which knows each scene);
`PairView` then draws K of them per pair, and for captions without such a list K from the rule-based
perturber (`crossmatch.data.negatives`), seeded by the item seed, so the stream stays a pure function of
(seed, epoch, position).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from torch.utils.data import Dataset

from crossmatch.data.negatives import Negative, normalise, perturb, pick
from crossmatch.data.tokenizer import CaptionTokenizer
from crossmatch.data.transforms import MAX_IMAGE_PIXELS, WHITE, apply_transform, load_image
from crossmatch.errors import DataError
from crossmatch.files import MAX_ANNOTATION_BYTES, open_regular, read_bytes

ANNOTATION_KEY = "data.max_annotation_bytes"  # the setting that caps a dataset file read whole


@dataclass
class ImageRecord:
    path: Path  # image file
    imgid: int | str  # id in the dataset file
    caption_ids: list[int] = field(default_factory=list)  # indices into ImageCaptionDataset.captions
    boxes: list[list[float]] | None = None  # (K, 4) xyxy pixels, when the dataset records objects
    pid: int | None = None  # person identity (person-search datasets): relevance is by identity
    objects: list[dict] | None = None  # shapes data: [{"shape", "color", "size"}] (groups of data.hard_batches)


def read_text(path: Path, what: str, max_bytes: int = MAX_ANNOTATION_BYTES) -> str:
    """A UTF-8 text file, read whole (`crossmatch.files.read_bytes`: a regular file of at most `max_bytes`,
    `data.max_annotation_bytes`); a missing, unreadable, special or oversized one, or one that is not UTF-8,
    raises a one-line DataError."""
    path = Path(path)
    data = read_bytes(path, what, max_bytes, ANNOTATION_KEY)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        byte = err.object[err.start]
        raise DataError(f"{what} {path} is not UTF-8 text (byte 0x{byte:02x} at offset {err.start})") from err


def parse_json(text: str | bytes, where: str):
    """json.loads with every failure as a one-line DataError naming `where`: malformed JSON, nesting too deep,
    an integer of more digits than Python converts (4,300)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where} is not valid JSON: {err.msg} at line {err.lineno}") from err
    except RecursionError as err:
        raise DataError(f"{where} is nested too deeply to be a dataset file") from err
    except UnicodeDecodeError as err:
        byte = err.object[err.start]
        raise DataError(f"{where} is not UTF-8 text (byte 0x{byte:02x} at offset {err.start})") from err
    except ValueError as err:  # int() of a 5,000-digit number: "Exceeds the limit (4300 digits) ..."
        raise DataError(f"{where} is not valid JSON: {str(err).split(':')[0]}") from err


def load_json(path: Path, what: str, max_bytes: int = MAX_ANNOTATION_BYTES):
    """Parse a JSON file; a missing, unreadable, oversized or malformed one raises a one-line DataError
    naming `what` and the path."""
    return parse_json(read_text(path, what, max_bytes), f"{what} {path}")


def read_karpathy_json(path: Path, max_bytes: int = MAX_ANNOTATION_BYTES) -> dict:
    data = load_json(path, "dataset file", max_bytes)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"dataset file {path} has no 'images' list (expected the Karpathy-split format)")
    return data


# Karpathy image keys that the canonical entry represents in its own way (everything else is copied through).
KARPATHY_KEYS = ("filename", "filepath", "sentences", "sentids", "imgid", "split")


def karpathy_to_entries(data: dict, source: str | Path = "dataset file") -> list[dict]:
    """Karpathy-split JSON ({"images": [...]}) -> canonical entries, in file order:
    {"image": filepath/filename, "captions": [raw, ...], "split", "id": imgid (else cocoid, else the file
    name), and every other key (boxes, twin, pid, ...) copied through}; when a sentence has "negatives"
    (exact compositional negatives, [{"raw", "type"}], written by `crossmatch data shapes`), the entry has
    "negatives": one such list per caption.

    Raises:
        DataError: an entry that is not an object, a `filename`/`filepath` that is not a string,
            `sentences` that is not a list, or an entry that `check_entry` refuses (naming `source`).
    """
    entries = []
    for n, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "filename" not in img:
            raise DataError(f"image entry {n} without 'filename': {str(img)[:80]}")
        for key in ("filename", "filepath"):
            if key in img and not isinstance(img[key], str):
                raise DataError(f"image entry {n}: '{key}' must be a string, not {type(img[key]).__name__}")
        sents = img.get("sentences", [])
        if not isinstance(sents, list):
            kind = type(sents).__name__
            raise DataError(f"image {img['filename']} (entry {n}): 'sentences' must be a list, not {kind}")
        entry = {
            "image": str(PurePosixPath(img.get("filepath", ""), img["filename"])),
            "captions": [s.get("raw") if isinstance(s, dict) else s for s in sents],
            "split": img.get("split"),
            "id": img.get("imgid", img.get("cocoid", img["filename"])),
        }
        entry.update({k: v for k, v in img.items() if k not in KARPATHY_KEYS})
        if any(isinstance(s, dict) and s.get("negatives") for s in sents):
            entry["negatives"] = [s.get("negatives", []) if isinstance(s, dict) else [] for s in sents]
        check_entry(entry, f"{source} image entry {n} ({entry['image']})")
        entries.append(entry)
    return entries


def read_negatives(negs, caption: str, where: str) -> list[dict]:
    """A sentence's "negatives" list, checked: [{"raw": text, "type": name}] with the text stripped;
    DataError for one that is not {"raw": non-empty str, "type": str} or that equals its caption."""
    if not isinstance(negs, list):
        raise DataError(f"'negatives' of caption {caption!r} of {where} must be a list, not {type(negs).__name__}")
    out = []
    for n, neg in enumerate(negs):
        raw = neg.get("raw") if isinstance(neg, dict) else None
        if not isinstance(raw, str) or not raw.strip() or not isinstance(neg.get("type"), str):
            raise DataError(f"negative {n} of caption {caption!r} of {where}: expected {{'raw': text, 'type': name}}")
        if normalise(raw) == normalise(caption):
            raise DataError(f"negative {n} of caption {caption!r} of {where} equals the caption")
        out.append({"raw": raw.strip(), "type": neg["type"]})
    return out


def _show(value) -> str:
    """A short repr of a value for a message (a huge int cannot even be printed)."""
    try:
        text = repr(value)
    except ValueError:
        text = "..."
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _is_id(value) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _is_box(box) -> bool:
    numbers = isinstance(box, list) and len(box) == 4
    return numbers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)


def check_entry(entry: dict, where: str, negatives: bool = True, pid_key: str = "pid") -> None:
    """The types of one canonical entry, the rule every reader applies (and so `crossmatch data validate`):
    "image" a string, "captions" a list, "id" and "twin" a string or an integer, "pid" and "twin_pid" integers,
    "boxes" a list of [x1, y1, x2, y2] numbers, "negatives" one list of {"raw", "type"} per caption
    (checked by `read_negatives` unless `negatives` is False). Empty captions are the loaders' concern.
    `pid_key` names the person identity as the file does (person-search files call it "id").

    Raises:
        DataError: one line naming `where` (the file and entry), the key and what it holds.
    """
    if not isinstance(entry.get("image"), str) or not entry["image"]:
        raise DataError(f"{where}: the image path must be a non-empty string, not {_show(entry.get('image'))}")
    if not isinstance(entry.get("captions"), list):
        raise DataError(f"{where}: 'captions' must be a list, not {_show(entry.get('captions'))}")
    for key in ("id", "twin"):
        if key in entry and not _is_id(entry[key]):
            raise DataError(f"{where}: '{key}' must be a string or an integer, not {_show(entry[key])}")
    for key, name in (("pid", pid_key), ("twin_pid", "twin_pid")):
        pid = entry.get(key)
        if pid is not None and (not isinstance(pid, int) or isinstance(pid, bool)):
            raise DataError(f"{where}: '{name}' (person identity) must be an integer, not {_show(pid)}")
    boxes = entry.get("boxes")
    if boxes is not None and (not isinstance(boxes, list) or not all(_is_box(b) for b in boxes)):
        raise DataError(f"{where}: 'boxes' must be a list of [x1, y1, x2, y2] numbers, not {_show(boxes)}")
    negs = entry.get("negatives")
    if negs is None:
        return
    if not isinstance(negs, list) or not all(n is None or isinstance(n, list) for n in negs):
        raise DataError(f"{where}: 'negatives' must hold one list per caption, not {_show(negs)}")
    if negatives:
        for caption, per_caption in zip(entry["captions"], negs, strict=False):
            if per_caption and isinstance(caption, str):
                read_negatives(per_caption, caption.strip(), where)


def outside_root(image: str) -> bool:
    """True when an entry's image path leaves its image folder: absolute, or through `..`."""
    path = PurePosixPath(image)
    return path.is_absolute() or ".." in path.parts or PureWindowsPath(image).is_absolute()


class ImageCaptionDataset:
    """One split of a Karpathy-split JSON dataset.

    Attributes:
        images: one ImageRecord per image of the split, in file order.
        captions: every caption of the split (raw text).
        txt_to_img: (n_txt,) index of each caption's image in `images`.
        img_to_txt: per image, the indices of its captions (any number, not assumed contiguous).
        twins: (i, j) index pairs of "twin" scenes (shapes data), each pair once.
        twin_pids: (pid_a, pid_b) twin identity pairs (person search: "twin_pid" of the entries), a < b, each
            pair once, both identities in the split.
        negatives: per caption, its exact compositional negatives [{"raw": str, "type": str}] (the sentence's
            "negatives" in the dataset file, written by `crossmatch data shapes`; [] when it has none).
        max_image_pixels: larger images are unreadable (`data.max_image_pixels`, set by `open_split`).
        background: RGB 0-255 behind transparent pixels (`data.background`, set by `open_split`).
    """

    max_image_pixels: int = MAX_IMAGE_PIXELS
    background: tuple[int, ...] = WHITE
    twin_pids: list[tuple[int, int]] = []  # filled by _load; never mutated in place

    def __init__(
        self,
        root: str | Path,
        split: str | list[str],
        image_dir: str | Path | None = None,
        json_name: str = "dataset.json",
        allow_outside_root: bool = False,
        max_annotation_bytes: int = MAX_ANNOTATION_BYTES,
    ):
        self.root = Path(root)
        path = self.root / json_name
        entries = karpathy_to_entries(read_karpathy_json(path, max_annotation_bytes), path)
        image_dir = Path(image_dir) if image_dir else self.root / "images"
        self._load(entries, split, image_dir, json_name, allow_outside_root)

    def _load(
        self,
        entries: list[dict],
        split: str | list[str],
        image_dir: Path,
        source: str | Path,
        allow_outside_root: bool = False,
        files_on_disk: bool = True,
    ) -> None:
        """Fill the split from canonical entries (see `karpathy_to_entries`), checking as it goes (that every
        image file exists, unless the images are not files: `files_on_disk` False)."""
        splits, name = ([split] if isinstance(split, str) else list(split)), Path(source).name
        self.images, self.captions, self.txt_to_img, self.negatives = [], [], [], []
        id_to_index: dict = {}
        twin_of: dict = {}
        twin_pid_of: dict[int, int] = {}
        for n, entry in enumerate(entries):
            if entry.get("split") not in splits:
                continue
            check_entry(entry, f"{name} entry {n}", negatives=False)  # readers check too; entries may come from code
            image_id = entry.get("id", entry["image"])
            if not allow_outside_root and outside_root(entry["image"]):
                raise DataError(
                    f"image path {entry['image']} (id {image_id}) in {name} leaves the image folder {image_dir}; "
                    "set data.allow_outside_root=true to allow it"
                )
            pid = entry.get("pid")
            objects = entry.get("objects") if isinstance(entry.get("objects"), list) else None
            rec = ImageRecord(image_dir / entry["image"], image_id, boxes=entry.get("boxes"), pid=pid, objects=objects)
            captions = entry.get("captions", [])
            negatives = list(entry.get("negatives") or [])[: len(captions)]
            negatives += [None] * (len(captions) - len(negatives))
            for raw, negs in zip(captions, negatives, strict=True):
                if not isinstance(raw, str) or not raw.strip():
                    raise DataError(f"empty caption for image {entry['image']} (id {image_id}) in {name}")
                rec.caption_ids.append(len(self.captions))
                self.captions.append(raw.strip())
                where = f"image {entry['image']} (id {image_id}) in {name}"
                self.negatives.append([] if not negs else read_negatives(negs, raw.strip(), where))
                self.txt_to_img.append(len(self.images))
            if not rec.caption_ids:
                raise DataError(f"image {entry['image']} (id {image_id}) has no captions in {name}")
            if image_id in id_to_index:
                raise DataError(f"duplicate image id {image_id} in {name}")
            id_to_index[image_id] = len(self.images)
            if "twin" in entry:
                twin_of[len(self.images)] = entry["twin"]
            if pid is not None and entry.get("twin_pid") is not None:
                twin_pid_of[pid] = entry["twin_pid"]
            self.images.append(rec)
        if not self.images:
            known = sorted({str(e.get("split")) for e in entries if e.get("split") is not None})
            raise DataError(
                f"split {'+'.join(splits)!r} of {source} has no images; its splits: {', '.join(known) or 'none'}"
            )
        missing = [r.path for r in self.images if files_on_disk and not r.path.is_file()]
        if missing:
            raise DataError(f"{len(missing)} image file(s) of split {'+'.join(splits)} missing, first: {missing[0]}")
        self.twins = sorted({tuple(sorted((i, id_to_index[t]))) for i, t in twin_of.items() if t in id_to_index})
        pids = {r.pid for r in self.images}
        self.twin_pids = sorted({tuple(sorted((p, t))) for p, t in twin_pid_of.items() if t in pids and t != p})

    def image_view(self, transform, max_boxes: int = 0) -> Dataset:
        """The per-image torch Dataset of this split (formats with precomputed features return theirs)."""
        return ImageView(self, transform, max_boxes)

    def first_images(self, n: int):
        """This split cut to its first `n` images and their captions (`eval.max_images`: quick validation);
        twin pairs (and twin identity pairs) are kept when both remain. The split itself when it has at most
        `n` images."""
        return first_images(self, n)

    @property
    def img_to_txt(self) -> list[list[int]]:
        return [r.caption_ids for r in self.images]

    def __repr__(self) -> str:
        return f"ImageCaptionDataset({self.root}, {len(self.images)} images, {len(self.captions)} captions)"


def first_images(ds, n: int):
    """A shallow copy of a split (ImageCaptionDataset or alike) restricted to its first `n` images. The
    captions of an image follow those of the images before it, so the kept captions are a prefix and every
    index (caption_ids, txt_to_img) stays valid."""
    if n <= 0 or n >= len(ds.images):
        return ds
    n_txt = sum(len(r.caption_ids) for r in ds.images[:n])
    if max(ds.txt_to_img[:n_txt]) >= n or min(ds.txt_to_img[n_txt:], default=n) < n:
        raise DataError(f"cannot take the first {n} images of {ds!r}: its captions are not in image order")
    sub = copy.copy(ds)
    sub.images, sub.captions, sub.txt_to_img = ds.images[:n], ds.captions[:n_txt], ds.txt_to_img[:n_txt]
    if getattr(ds, "negatives", None) is not None:
        sub.negatives = ds.negatives[:n_txt]
    sub.twins = [(i, j) for i, j in ds.twins if i < n and j < n]
    kept = {r.pid for r in sub.images}
    sub.twin_pids = [(a, b) for a, b in getattr(ds, "twin_pids", []) if a in kept and b in kept]
    return sub


class ImageView(Dataset):
    """Item i: {"image": (3, S, S), "image_idx": i[, "boxes": (K, 4)]}."""

    def __init__(self, ds: ImageCaptionDataset, transform, max_boxes: int = 0):
        self.ds, self.transform, self.max_boxes = ds, transform, max_boxes

    def __len__(self) -> int:
        return len(self.ds.images)

    def pixels(self, i: int) -> torch.Tensor:
        """The decoded image i, (3, H, W) uint8 (formats whose images are not files override this)."""
        return load_image(self.ds.images[i].path, self.ds.max_image_pixels, self.ds.background)

    def preprocessing(self) -> bytes:
        """What an image goes through after its file: the transform (every parameter) and the background."""
        return f"{self.transform!r}|background={list(self.ds.background)}".encode()

    def file_key(self, i: int) -> bytes:
        """Image i's item key: SHA-1 of its file and of `preprocessing()` (see `file_key`)."""
        return file_key(self.ds.images[i].path, self.preprocessing())

    def __getitem__(self, i: int) -> dict:
        rec = self.ds.images[i]
        boxes = rec.boxes[: self.max_boxes] if (self.max_boxes and rec.boxes) else None
        image, boxes = apply_transform(self.transform, self.pixels(i), boxes)
        item = {"image": image, "image_idx": i}
        if rec.pid is not None:
            item["pid"] = rec.pid
        if self.max_boxes:
            item["boxes"] = boxes if boxes is not None else torch.zeros(0, 4)
        return item


class KeyedImageView(Dataset):
    """Item i: {"image_key": keys[i], "image_idx": i[, "pid"]}, no pixels: for a model that already holds the
    outputs of its frozen image tower under these keys (`models.frozen_cache.warm_up` fills them once and swaps
    this view in), so an epoch decodes no image. `failed[i]` is the message of an image that could not be
    read when the cache was filled: it is raised again here (a DataError), so `PairView(skip_bad=True)`
    skips and counts it every epoch as the decoding view would."""

    def __init__(self, view: ImageView, keys: list[bytes | None], failed: dict[int, str]):
        self.ds, self.keys, self.failed = view.ds, keys, failed

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        if i in self.failed:
            raise DataError(self.failed[i])
        item = {"image_key": self.keys[i], "image_idx": i}
        if self.ds.images[i].pid is not None:
            item["pid"] = self.ds.images[i].pid
        return item


def file_key(path: str | Path, salt: bytes) -> bytes:
    """SHA-1 of `salt` (what the file's pixels go through: the preprocessing) and the file's bytes.

    Raises:
        DataError: naming the file when it cannot be read.
    """
    h = hashlib.sha1(salt + b"\0")
    try:
        with open_regular(path, "image") as f:  # a FIFO or a device would never end
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as err:
        raise DataError(f"cannot read image {path}: {err.strerror or err}") from err
    return h.digest()


class CaptionView(Dataset):
    """Item t: {"input_ids": list[int], "text_idx": t, "image_idx": its image}."""

    def __init__(self, ds: ImageCaptionDataset, tokenizer: CaptionTokenizer):
        self.ds = ds
        self.ids = tokenizer.encode_batch(ds.captions)  # tokenised once: captions are tiny

    def __len__(self) -> int:
        return len(self.ds.captions)

    def __getitem__(self, t: int) -> dict:
        return {"input_ids": self.ids[t], "text_idx": t, "image_idx": self.ds.txt_to_img[t]}


class PairView(Dataset):
    """Training pairs, one per caption: the image item and the caption item merged.

    Indices may come as (t, seed) from `EpochSampler`: the augmentation of that item then draws from
    its own generator, so a run resumed mid-epoch or with other worker counts sees identical crops.
    With `skip_bad`, an unreadable image yields {"skipped": (image index, reason)} instead of raising;
    `collate` drops it and the Trainer counts the image against `data.max_bad_samples` once per epoch.

    With `text_negatives` K > 0 an item also holds "neg_input_ids": K id lists and "neg_valid": K bools:
    K negatives of the caption (the dataset's exact ones when it has them, else the perturber's), drawn
    with the item seed (the caption index when there is none); a caption with fewer than K has its
    remaining slots filled with its own ids and marked invalid (never used as a negative).
    """

    def __init__(
        self,
        ds: ImageCaptionDataset,
        tokenizer: CaptionTokenizer,
        transform,
        max_boxes: int = 0,
        skip_bad: bool = False,
        text_negatives: int = 0,
    ):
        self.images = ds.image_view(transform, max_boxes)
        self.captions = CaptionView(ds, tokenizer)
        self.skip_bad = skip_bad
        self.ds, self.tokenizer, self.text_negatives = ds, tokenizer, text_negatives

    def negatives(self, t: int, seed: int) -> list[Negative]:
        """Up to `text_negatives` negatives of caption t, a pure function of (t, seed)."""
        exact = getattr(self.ds, "negatives", None)
        exact = exact[t] if exact else []
        if not exact:  # the dataset file gives none for this caption: the rule-based perturber
            return perturb(self.ds.captions[t], self.text_negatives, seed)
        return pick([Negative(n["raw"], n["type"]) for n in exact], self.text_negatives, seed)

    def _with_negatives(self, item: dict, t: int, seed: int | None) -> dict:
        K = self.text_negatives
        negs = self.negatives(t, t if seed is None else seed)
        ids = self.tokenizer.encode_batch([n.text for n in negs]) if negs else []
        item["neg_input_ids"] = ids + [item["input_ids"]] * (K - len(ids))  # K lists
        item["neg_valid"] = [True] * len(ids) + [False] * (K - len(ids))  # K bools
        return item

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        t, seed = index if isinstance(index, tuple) else (index, None)
        cap = self.captions[t]
        if self.text_negatives > 0:
            cap = self._with_negatives(dict(cap), t, seed)
        try:
            if seed is None:
                return {**self.images[cap["image_idx"]], **cap}
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only: torch.manual_seed would also (lazily) seed every CUDA device, which
                # records a Python stack trace per call when CUDA is not initialised (a third of an item's time)
                # and would reseed the CUDA stream that fork_rng(devices=[]) does not restore.
                torch.default_generator.manual_seed(seed % (1 << 64))  # item seeds of large train.seed values
                return {**self.images[cap["image_idx"]], **cap}
        except DataError as err:
            if not self.skip_bad:
                raise
            return {"skipped": (cap["image_idx"], str(err))}


def dataset_from_entries(
    entries: list[dict],
    split: str | list[str],
    image_dir: str | Path,
    source: str | Path,
    root: str | Path = "",
    allow_outside_root: bool = False,
) -> ImageCaptionDataset:
    """One split of a dataset given as canonical entries, the lines of the JSONL format (crossmatch.data.jsonl):
    {"image": path relative to `image_dir`, "captions": [str, ...], "split": str, "id"?: any, "pid"?: int,
    "boxes"?: (K, 4), "twin"?: id}. Checks as the Karpathy reader does and raises on the first problem.

    Args:
        entries: every entry of the dataset file, in file order (other splits are skipped).
        split: split name(s) to keep.
        image_dir: folder the "image" paths are relative to.
        source: the dataset file, named in error messages.
        root: dataset folder (ImageCaptionDataset.root).
        allow_outside_root: accept image paths that leave `image_dir` (absolute, or through `..`).
    Raises:
        DataError: an empty caption, an image without captions, a duplicate id, an empty split, missing files,
            an image path outside `image_dir`.
    """
    ds = ImageCaptionDataset.__new__(ImageCaptionDataset)  # the constructor reads a Karpathy file: bypass it
    ds.root = Path(root)
    ds._load(entries, split, Path(image_dir), source, allow_outside_root)
    return ds
