"""WebDataset tar shards (`data.format: webdataset`; the format of Aizman et al., "High Performance I/O for
Large Scale Deep Learning", 2019, read and written with the `webdataset` package).

A shard is a plain .tar whose members are grouped into samples by key (the name up to the first dot):

    000017.jpg | 000017.png | ...   the image (the bytes of the original file)
    000017.txt                      one caption, or
    000017.json                     {"captions": [...], "split"?: "train", "id"?: any, "pid"?: int, ...}

`data.root` is a folder or a brace pattern (`/data/cc/{00000..00031}.tar`). For a folder, the shards of
split S are `{root}/{S}-*.tar` when there are such files (what `crossmatch data convert --to webdataset`
writes), else every `*.tar` in it. A sample belongs to the split its json names, or else to
`data.train_split`.

The train split is streamed (`crossmatch.data.shard_stream`): its shards are scanned once at start-up
(captions for the vocabulary, pair counts, and every sample checked), never held in memory, unless a
`sizes.json` + `pairs.json` beside them (written by `data convert`) give the counts. Shards may be local
files, http(s) URLs or `pipe:` commands (`crossmatch.data.remote`). Evaluation
needs the whole gallery with explicit image <-> caption maps, so the other splits are read once into an
indexed in-memory split (`ShardIndexedSplit`); keep them small, or convert them to JSONL.

Problems name the shard and the key: a corrupt or truncated tar member, a sample without image or caption,
a pattern that matches nothing (DataError, one line).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossmatch.config import DataConfig
from crossmatch.data.datasets import ImageCaptionDataset, ImageView, check_entry, parse_json
from crossmatch.data.formats import register_format
from crossmatch.data.remote import SIZES, expand, is_url, listed_counts, open_shard, write_counts
from crossmatch.data.transforms import MAX_IMAGE_PIXELS, WHITE, load_image
from crossmatch.errors import ConfigError, DataError, install_hint

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "ppm", "tif", "tiff")
META_KEYS = ("captions", "split", "id", "pid")  # the json keys with a meaning; others travel through
MAX_MEMBER_BYTES = 256 << 20  # default of data.max_shard_member_bytes


def _wds():
    try:
        import webdataset
    except ImportError as err:
        hint = install_hint("webdataset")
        raise ConfigError(f"data.format webdataset needs the webdataset package: {hint}") from err
    return webdataset


def is_shard_spec(root: str | Path) -> bool:
    """True for a brace pattern, a .tar file, or a folder holding .tar files (and no dataset file)."""
    s = str(root)
    if "{" in s or s.endswith(".tar") or is_url(s):
        return True
    p = Path(s)
    return p.is_dir() and any(p.glob("*.tar"))


def resolve_shards(root: str | Path, split: str | None = None, allow_pipe: bool = False) -> list[str]:
    """The shard files of `root` (see the module docstring), sorted for a folder, in pattern order otherwise;
    http(s) URLs and `pipe:` commands (with `allow_pipe`) as their pattern expands (crossmatch.data.remote).

    Raises:
        DataError: nothing matches, or a shard of the pattern does not exist.
        ConfigError: a pipe: command without `allow_pipe`.
    """
    s = str(root)
    if is_url(s):
        return expand(s, allow_pipe, split)
    if "{" in s or s.endswith(".tar"):
        paths = _wds().shardlists.expand_urls(s)
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise DataError(f"data.root {s}: shard {missing[0]} not found ({len(missing)} of {len(paths)} missing)")
        return paths
    folder = Path(s)
    if not folder.is_dir():
        raise DataError(f"data.root {s}: no such folder or shard pattern")
    named = sorted(folder.glob(f"{split}-*.tar")) if split else []
    paths = [str(p) for p in (named or sorted(folder.glob("*.tar")))]
    if not paths:
        raise DataError(f"data.root {s}: no .tar shard matches")
    return paths


@dataclass
class ShardSample:
    """One sample of a shard, parsed (image bytes not decoded)."""

    shard: str
    key: str
    position: int  # ordinal of the sample in its shard (all splits counted)
    image: bytes
    ext: str
    captions: list[str]
    split: str | None
    meta: dict[str, Any] = field(default_factory=dict)  # id, pid, boxes, twin, ... from the json

    def where(self) -> str:
        return f"shard {self.shard} key {self.key}"


def _parse(raw: dict[str, Any], position: int) -> ShardSample:
    shard, key = raw.get("__url__", "?"), raw.get("__key__", "?")
    exts = [e for e in IMAGE_EXTS if e in raw]
    if not exts:
        raise DataError(f"shard {shard} key {key}: no image member (.{', .'.join(IMAGE_EXTS[:3])}, ...)")
    meta: dict[str, Any] = {}
    if "json" in raw:
        meta = parse_json(raw["json"], f"shard {shard} key {key}: {key}.json")
        if not isinstance(meta, dict):
            raise DataError(f"shard {shard} key {key}: {key}.json is not an object")
    captions = meta.get("captions")
    if captions is None and "txt" in raw:
        captions = [raw["txt"].decode("utf-8", errors="replace")]
    if not isinstance(captions, list) or not captions:
        raise DataError(f"shard {shard} key {key}: sample without caption (no {key}.txt, no captions in {key}.json)")
    bad = [i for i, c in enumerate(captions) if not isinstance(c, str) or not c.strip()]
    if bad:
        raise DataError(f"shard {shard} key {key}: empty caption (caption {bad[0]})")
    check_entry({**meta, "image": f"{key}.{exts[0]}", "captions": captions}, f"shard {shard} key {key}")
    return ShardSample(
        shard, key, position, raw[exts[0]], exts[0], [c.strip() for c in captions], meta.get("split"), meta
    )


class MemberTooLarge(DataError):
    """A tar member that would inflate to more than data.max_shard_member_bytes (a gzip bomb): its shard ends."""


def _members(f, path: str, max_bytes: int, last: dict) -> Iterator[dict]:
    """The regular members of a tar stream (plain or compressed) as webdataset's {"fname", "data", "__url__"},
    each refused from its header when it would inflate to more than `max_bytes`."""
    with tarfile.open(fileobj=f, mode="r|*") as tar:
        for info in tar:
            if not info.isreg() or info.name.startswith("__"):  # webdataset's own metadata members
                continue
            last["fname"] = info.name
            if info.size > max_bytes:
                raise MemberTooLarge(
                    f"shard {path} key {info.name.split('.', 1)[0]}: member {info.name} inflates to {info.size} "
                    f"bytes, more than data.max_shard_member_bytes={max_bytes}"
                )
            yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": path}
            tar.members = []  # a stream's members list would grow with the shard


def iter_shard(
    path: str, on_problem: Callable[[str], None] | None = None, max_member_bytes: int = MAX_MEMBER_BYTES
) -> Iterator[ShardSample]:
    """The samples of one shard in file order (a regular file only; webdataset's grouping of members by key).

    A sample without image or caption, or a member that cannot be read (corrupt or truncated tar, or one
    that would inflate to more than `max_member_bytes`), raises a DataError naming the shard and the key;
    with `on_problem`, the message is passed to it instead and the sample skipped (a broken tar, or an
    oversized member, ends its shard: what follows cannot be located, or is not worth inflating).
    """
    wds = _wds()
    last = {"fname": None}
    try:
        with open_shard(path) as f:
            for position, raw in enumerate(wds.tariterators.group_by_keys(_members(f, path, max_member_bytes, last))):
                try:
                    yield _parse(raw, position)
                except DataError as err:
                    if on_problem is None:
                        raise
                    on_problem(str(err))
    except MemberTooLarge as err:
        if on_problem is None:
            raise
        on_problem(str(err))
    except DataError:
        raise
    except Exception as err:  # tarfile.ReadError, EOFError, OSError, ValueError (duplicate member)
        after = last["fname"]
        key = after.split(".", 1)[0] if after else "(first member)"
        detail = str(err).split(" @ ")[0].splitlines()[0] if str(err) else type(err).__name__
        message = f"shard {path} key {key}: corrupt tar member ({detail})"
        if on_problem is None:
            raise DataError(message) from err
        on_problem(message)


def shard_key(path: str, key: str) -> str:
    """The identity of a sample across splits: its shard file (resolved) and its key there."""
    return f"{path if is_url(path) else os.path.realpath(path)}/{key}"  # a URL names its shard as it is


def sample_split(sample: ShardSample, default: str) -> str:
    return sample.split if isinstance(sample.split, str) and sample.split else default


@dataclass
class ShardInfo:
    """What the start-up scan learns about one shard for one split."""

    path: str
    samples: int  # samples of every split
    images: int  # samples of the split
    pairs: int  # captions of the split


class ShardTrainSet:
    """The train split of a webdataset: shard list, per-shard counts and every caption (for the tokenizer)
    from one scan; the samples themselves are streamed by `crossmatch.data.shard_stream`."""

    streaming = True

    def __init__(self, cfg: DataConfig, split: str, progress: bool = False):
        self.root, self.split, self.default_split = cfg.root, split, cfg.train_split
        self.max_member_bytes = cfg.max_shard_member_bytes  # read by the stream's iter_shard calls
        self.max_image_pixels = cfg.max_image_pixels  # what load_image refuses (open_split sets it again)
        self.background = tuple(cfg.background) if cfg.background else WHITE
        paths = resolve_shards(cfg.root, split, cfg.allow_pipe)
        listed = listed_counts(paths, split)  # from sizes.json + pairs.json, when they list every shard
        self.listed = listed is not None  # then each shard is checked against its counts as it is streamed
        self._captions: list[str] | None = None
        self._image_keys: list[str] | None = None  # "shard/key" of each sample of the split (same-image checks)
        if listed is None:
            self._scan(paths)
        else:
            self.shards = [ShardInfo(p, n, n, pairs) for p, (n, pairs) in zip(paths, listed, strict=True)]
        self.num_images = sum(s.images for s in self.shards)
        self.num_pairs = sum(s.pairs for s in self.shards)
        if not self.num_pairs:
            raise DataError(f"data.root {cfg.root}: no sample of split {split!r} in {len(self.shards)} shard(s)")
        self.image_offsets, self.text_offsets = [], []  # global image / caption index of each shard's first
        n_img = n_txt = 0
        for s in self.shards:
            self.image_offsets.append(n_img)
            self.text_offsets.append(n_txt)
            n_img, n_txt = n_img + s.images, n_txt + s.pairs

    def _scan(self, paths: list[str]) -> None:
        """Counts, captions and image keys from one read of every shard (every sample checked)."""
        self.shards, self._captions, self._image_keys = [], [], []
        for path in paths:
            info = ShardInfo(path, 0, 0, 0)
            for sample in iter_shard(path, max_member_bytes=self.max_member_bytes):
                info.samples += 1
                if sample_split(sample, self.default_split) == self.split:
                    info.images += 1
                    info.pairs += len(sample.captions)
                    self._captions.extend(sample.captions)
                    self._image_keys.append(shard_key(path, sample.key))
            self.shards.append(info)

    @property
    def captions(self) -> list[str]:
        """Every caption of the split (a word vocabulary is trained on them): read on first use when the
        counts came from sizes.json, so a run with a named or saved tokenizer never scans the shards."""
        if self._captions is None:
            self._captions = [c for s in range(len(self.shards)) for sample in self.read(s) for c in self._own(sample)]
        return self._captions

    @property
    def image_keys(self) -> list[str]:
        """`shard_key` of every sample of the split (what makes two samples the same image): read on first use
        when the counts came from sizes.json."""
        if self._image_keys is None:
            self._image_keys = [
                shard_key(self.shards[s].path, sample.key)
                for s in range(len(self.shards))
                for sample in self.read(s)
                if sample_split(sample, self.default_split) == self.split
            ]
        return self._image_keys

    def _own(self, sample: ShardSample) -> list[str]:
        return sample.captions if sample_split(sample, self.default_split) == self.split else []

    def read(self, s: int) -> Iterator[ShardSample]:
        """The samples of shard s in file order. With listed counts, a shard read to its end that holds
        another number of the split's samples or captions is a DataError naming it."""
        info, images, pairs = self.shards[s], 0, 0
        for sample in iter_shard(info.path, max_member_bytes=self.max_member_bytes):
            if sample_split(sample, self.default_split) == self.split:
                images, pairs = images + 1, pairs + len(sample.captions)
            yield sample
        if self.listed and (images, pairs) != (info.images, info.pairs):
            raise DataError(
                f"shard {info.path} holds {images} {self.split!r} samples / {pairs} captions; {SIZES} and "
                f"pairs.json beside it say {info.images} / {info.pairs}: rewrite them or delete them to rescan"
            )

    def __repr__(self) -> str:
        counts = f"{len(self.shards)} shards, {self.num_images} images, {self.num_pairs} pairs"
        return f"ShardTrainSet({self.root}, {counts})"

    def __getattr__(self, name: str):
        if name in ("images", "txt_to_img", "img_to_txt", "image_view", "twins"):
            raise DataError(
                f"split {self.split!r} of the webdataset {self.root} is streamed for training; "
                "evaluation needs an indexed split (val/test shards, or a JSONL/Karpathy copy)"
            )
        raise AttributeError(name)


def decode_image(data: bytes, where: str, max_pixels: int = MAX_IMAGE_PIXELS, background=WHITE):
    """Image bytes of a shard -> (3, H, W) uint8 RGB tensor through `load_image`, the decoder of image files
    (pixel limit read from the header, EXIF orientation, transparency on `background`); a corrupt or
    oversized image is a DataError naming `where`."""
    return load_image(data, max_pixels, background, name=where)


class ShardIndexedSplit(ImageCaptionDataset):
    """A non-train split of a webdataset read into memory as an indexed split (image bytes kept, decoded on
    access), with the image <-> caption maps evaluation needs."""

    def __init__(self, cfg: DataConfig, split: str):
        self.root = Path(str(cfg.root).split("{")[0])
        entries, self.blobs, where, self.image_keys = [], [], [], []
        for path in resolve_shards(cfg.root, split, cfg.allow_pipe):
            for sample in iter_shard(path, max_member_bytes=cfg.max_shard_member_bytes):
                if sample_split(sample, cfg.train_split) != split:
                    continue
                entry = {k: v for k, v in sample.meta.items() if k != "captions"}
                entry.update(
                    image=f"{sample.key}.{sample.ext}",
                    captions=sample.captions,
                    split=split,
                    id=sample.meta.get("id", f"{Path(path).name}/{sample.key}"),
                )
                entries.append(entry)
                self.blobs.append(sample.image)
                self.image_keys.append(shard_key(path, sample.key))
                where.append(sample.where())
        self.where = where
        self._load(entries, split, Path(str(cfg.root)), cfg.root, files_on_disk=False)

    def image_view(self, transform, max_boxes: int = 0):
        return ShardImageView(self, transform, max_boxes)


class ShardImageView(ImageView):
    """ImageView over in-memory image bytes."""

    def pixels(self, i: int):
        return decode_image(self.ds.blobs[i], self.ds.where[i], self.ds.max_image_pixels, self.ds.background)

    def file_key(self, i: int) -> bytes:
        """SHA-1 of the preprocessing and the image's encoded bytes (as ImageView's of a file)."""
        return hashlib.sha1(self.preprocessing() + b"\0" + bytes(self.ds.blobs[i])).digest()


@register_format("webdataset")
def webdataset_split(cfg: DataConfig, split: str):
    """The train split streams (ShardTrainSet); any other split is read into memory (ShardIndexedSplit)."""
    if split == cfg.train_split:
        return ShardTrainSet(cfg, split)
    return ShardIndexedSplit(cfg, split)


# ---- conversion and validation ----------------------------------------------------------------------


def write_shards(entries: list[dict], image_dir: Path, dst: str | Path, shard_size: int = 1000) -> list[Path]:
    """Canonical entries (crossmatch.data.check) -> `{dst}/{split}-NNNNNN.tar`, `shard_size` samples each:
    KEY.{ext} (the image file's own bytes) + KEY.json ({"captions", "split", "id", "pid"?, other keys}).
    Shards are written into a hidden folder and moved into `dst` when all are complete.

    Raises:
        ConfigError: `dst` already holds shards, or shard_size < 1.
        DataError: a missing image file.
    """
    import os
    import shutil

    wds = _wds()
    if shard_size < 1:
        raise ConfigError(f"--shard-size {shard_size}: must be at least 1")
    dst = Path(dst)
    if dst.is_dir() and any(dst.glob("*.tar")):
        raise ConfigError(f"{dst} already holds .tar shards; choose an empty folder")
    tmp = dst / ".converting"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    by_split: dict[str, list[dict]] = {}
    for e in entries:
        by_split.setdefault(str(e.get("split")), []).append(e)
    n, counts = 0, {}
    for split, items in by_split.items():
        for i in range(0, len(items), shard_size):  # the writer starts a new shard every shard_size samples
            chunk = items[i : i + shard_size]
            counts[f"{split}-{i // shard_size:06d}.tar"] = (len(chunk), sum(len(e.get("captions", [])) for e in chunk))
        writer = wds.ShardWriter(str(tmp / f"{split}-%06d.tar"), maxcount=shard_size, verbose=0, mtime=0.0)
        try:
            for e in items:
                file = image_dir / e["image"]
                if not file.is_file():
                    raise DataError(f"image not found: {file} (entry {e.get('id', e['image'])})")
                ext = file.suffix.lower().lstrip(".") or "jpg"
                ext = "jpg" if ext == "jpeg" else ext
                meta = {"captions": e.get("captions", []), "split": e.get("split")}
                meta.update({k: v for k, v in e.items() if k not in ("image", "captions", "split")})
                writer.write({"__key__": f"{n:08d}", ext: file.read_bytes(), "json": json.dumps(meta).encode()})
                n += 1
        finally:
            writer.close()
    written = []
    for p in sorted(tmp.glob("*.tar")):
        os.replace(p, dst / p.name)  # each shard appears complete or not at all
        written.append(dst / p.name)
    write_counts(dst, counts)  # training reads these instead of scanning every shard
    shutil.rmtree(tmp, ignore_errors=True)
    return written


def read_shard_entries(
    root: str | Path, on_problem: Callable[[str], None] | None = None, progress: bool = False
) -> tuple[list[dict], dict[str, bytes]]:
    """Every sample of every shard of `root` as canonical entries ("image" is "SHARD.tar/KEY.ext"), with the
    image bytes by that name. `on_problem`: see `iter_shard`."""
    from tqdm import tqdm

    entries, blobs = [], {}
    for path in tqdm(resolve_shards(root), desc="read shards", unit="shard", disable=not progress):
        for sample in iter_shard(path, on_problem):
            entry = {k: v for k, v in sample.meta.items() if k != "captions"}
            entry.update(image=f"{Path(path).name}/{sample.key}.{sample.ext}", captions=sample.captions)
            entry["split"] = sample_split(sample, "train")  # as read with the default data.train_split
            entries.append(entry)
            blobs[entry["image"]] = sample.image
    return entries, blobs
