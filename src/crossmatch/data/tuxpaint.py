"""A real captioned dataset from Tux Paint's stamps (Debian package `tuxpaint-stamps-default`, GPL-2).

The package ships about 800 photos and drawings (PNGs, mostly with transparent backgrounds), each with
its authors' English caption as the first line of a `.txt` beside it (the other lines are translations,
`xx.utf8=...`). `build_tuxpaint` reads a `.deb` (fetched with `apt-get download` when no source is given)
or an unpacked stamps folder, and writes a Karpathy-format dataset: `images/` (the original PNGs) and
`dataset.json` with a deterministic train/val/test split BY CAPTION TEXT: a caption that several stamps
share ("A flower.") goes to train as a whole, so no caption string appears in two splits and the
evaluation splits have one unambiguous image per caption. The files are never part of this repository.

Stamps without a PNG (SVG-only ones: no rasteriser here) and PNGs without a `.txt` (the `_mirror`
variants, left-right flipped copies) are left out. The output is written to a temporary folder beside
`--out` and renamed onto it, so an error leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from crossmatch.errors import DataError
from crossmatch.files import write_text

PACKAGE = "tuxpaint-stamps-default"
STAMPS_IN_DEB = Path("usr/share/tuxpaint/stamps")
# Captions the 2022.06.04 package ships without their image (the pictures live in another package).
KNOWN_ORPHANS = {"seasonal/christmas/gift.txt", "seasonal/christmas/gift2.txt"}
SPLIT_FRACTIONS = {"val": 0.1, "test": 0.1}  # of the distinct single-image captions; the rest is train


def fetch_deb(folder: Path) -> Path:
    """`apt-get download tuxpaint-stamps-default` into `folder`; the .deb it wrote."""
    if shutil.which("apt-get") is None:
        raise DataError(
            f"apt-get is not available to download {PACKAGE}: fetch its .deb from https://packages.debian.org/"
            f"{PACKAGE} and pass it with --source"
        )
    done = subprocess.run(["apt-get", "download", PACKAGE], cwd=folder, capture_output=True, text=True)
    debs = sorted(folder.glob(f"{PACKAGE}_*.deb"))
    if done.returncode != 0 or not debs:
        detail = (done.stderr.strip().splitlines() or ["no .deb written"])[-1]
        raise DataError(f"apt-get download {PACKAGE} failed: {detail} (pass a downloaded .deb with --source)")
    return debs[0]


def _ar_members(data: bytes, path: Path) -> dict[str, bytes]:
    """The members of a Unix `ar` archive (the container of a .deb)."""
    if not data.startswith(b"!<arch>\n"):
        raise DataError(f"{path} is not a Debian package (.deb) nor a stamps folder")
    out, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError as err:
            raise DataError(f"{path}: corrupt ar header of member {name!r}") from err
        out[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)  # members are 2-byte aligned
    return out


def extract_deb(deb: Path, folder: Path) -> Path:
    """Unpack the data part of `deb` into `folder` (Python's own ar + tar reading); its stamps folder."""
    members = _ar_members(deb.read_bytes(), deb)
    data = next((members[k] for k in members if k.startswith("data.tar")), None)
    if "debian-binary" not in members or data is None:
        raise DataError(f"{deb} is an ar archive but not a Debian package (no debian-binary / data.tar)")
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = [
                m
                for m in tar.getmembers()
                if m.name.lstrip("./").startswith(str(STAMPS_IN_DEB)) and m.name.endswith((".png", ".svg", ".txt"))
            ]
            tar.extractall(folder, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{deb}: cannot unpack its data archive: {err}") from err
    stamps = folder / STAMPS_IN_DEB
    if not stamps.is_dir():
        raise DataError(f"{deb} holds no {STAMPS_IN_DEB} folder (not {PACKAGE}?)")
    return stamps


def stamps_folder(source: Path) -> Path:
    """The stamps folder of an unpacked package root or of a stamps folder itself."""
    for candidate in (source / STAMPS_IN_DEB, source / "stamps", source):
        if candidate.is_dir() and any(candidate.rglob("*.txt")):
            return candidate
    raise DataError(f"{source} is a folder without Tux Paint stamps (no .txt captions under it)")


def read_caption(txt: Path) -> str:
    """The English caption of a stamp: the first line of its .txt."""
    try:
        text = txt.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"caption file {txt} is not UTF-8 (byte {err.start})") from err
    caption = (text.splitlines() or [""])[0].strip()
    if not caption:
        raise DataError(f"caption file {txt} is empty (its first line holds no caption)")
    return caption


def collect_stamps(stamps: Path) -> tuple[list[tuple[str, str]], int]:
    """(relative PNG path, caption) of every captioned PNG stamp, sorted by path, and how many SVG-only
    stamps were left out. Every PNG is decoded once, so a corrupt one is named here."""
    found, svg_only = [], 0
    for txt in sorted(stamps.rglob("*.txt")):
        rel = txt.relative_to(stamps).as_posix()
        png = txt.with_suffix(".png")
        if not png.is_file():
            if txt.with_suffix(".svg").is_file():
                svg_only += 1
                continue
            if rel in KNOWN_ORPHANS:
                continue
            raise DataError(f"caption file {txt} has no image beside it ({png.name} or .svg)")
        caption = read_caption(txt)
        try:
            with Image.open(png) as im:
                im.load()
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise DataError(
                f"cannot decode image {png}: {str(err).splitlines()[0] if str(err) else 'corrupt'}"
            ) from err
        found.append((png.relative_to(stamps).as_posix(), caption))
    if not found:
        raise DataError(f"{stamps}: no captioned PNG stamps")
    return found, svg_only


def split_by_caption(captions: list[str]) -> list[str]:
    """The split of each item, a function of the caption texts alone: captions shared by several items go
    to train; the distinct ones, ordered by the SHA-1 of their text, give the first 10% to test, the next
    10% to val and the rest to train."""
    counts: dict[str, int] = {}
    for c in captions:
        counts[c] = counts.get(c, 0) + 1
    single = sorted((c for c, n in counts.items() if n == 1), key=lambda c: hashlib.sha1(c.encode()).hexdigest())
    n_test, n_val = round(len(single) * SPLIT_FRACTIONS["test"]), round(len(single) * SPLIT_FRACTIONS["val"])
    where = {c: "test" for c in single[:n_test]} | {c: "val" for c in single[n_test : n_test + n_val]}
    return [where.get(c, "train") for c in captions]


def _karpathy(stamps: list[tuple[str, str]], splits: list[str]) -> dict:
    images = []
    for i, ((rel, caption), split) in enumerate(zip(stamps, splits, strict=True)):
        tokens = re.findall(r"[a-z0-9]+", caption.lower())
        sent = {"raw": caption, "tokens": tokens, "imgid": i, "sentid": i}
        images.append({"filename": rel, "imgid": i, "split": split, "sentids": [i], "sentences": [sent]})
    return {"dataset": "tuxpaint", "source": PACKAGE, "license": "GPL-2.0-or-later", "images": images}


def build_tuxpaint(out: str | Path, source: str | Path | None = None) -> tuple[Path, dict[str, int]]:
    """Write the Tux Paint dataset to `out` (dataset.json + images/) from `source` (a .deb, an unpacked
    package or stamps folder; None: `apt-get download`). Returns the dataset file and the split sizes.

    Raises:
        DataError: naming the file: a missing or non-Debian source, an undecodable image, a caption file
            without image, empty or not UTF-8, or an `out` that holds files already.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not an empty folder: choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tuxpaint-") as work:
        work = Path(work)
        if source is None:
            stamps = extract_deb(fetch_deb(work), work / "deb")
        else:
            source = Path(source)
            if not source.exists():
                raise DataError(f"--source {source} does not exist")
            stamps = stamps_folder(source) if source.is_dir() else extract_deb(source, work / "deb")
        found, svg_only = collect_stamps(stamps)
        splits = split_by_caption([c for _, c in found])
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            for rel, _ in found:
                (staging / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(stamps / rel, staging / "images" / rel)
            write_text(staging / "dataset.json", json.dumps(_karpathy(found, splits), indent=1) + "\n")
            if out.exists():
                out.rmdir()  # empty, checked above
            os.replace(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    sizes = {s: splits.count(s) for s in ("train", "val", "test")} | {"svg_only_skipped": svg_only}
    return out / "dataset.json", sizes
