"""`crossmatch data tuxpaint` (crossmatch.data.tuxpaint) on a synthetic stand-in of the Tux Paint stamps (never the
network, never the real GPL-2 files): the Karpathy split by caption text, the Debian package reader, and bad input
named in one line with nothing left behind."""

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from crossmatch.cli.main import main
from crossmatch.data.tuxpaint import build_tuxpaint, split_by_caption
from crossmatch.errors import DataError


def make_stamps(root: Path, captions: dict[str, str]) -> Path:
    """A Tux Paint-like stamps folder: category/name.png (RGBA, transparent corner) + name.txt."""
    for rel, caption in captions.items():
        png = root / f"{rel}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        im = Image.new("RGBA", (8, 6), (len(rel) * 20 % 256, 40, 90, 255))
        im.putpixel((0, 0), (0, 0, 0, 0))
        im.save(png)
        (root / f"{rel}.txt").write_text(f"{caption}\nfr.utf8=Une traduction.\n", encoding="utf-8")
    return root


CAPTIONS = {f"animals/a{i}": f"An animal number {i}." for i in range(20)} | {
    "plants/f1": "A flower.",
    "plants/f2": "A flower.",
    "plants/f3": "A flower.",
}


def test_tuxpaint_writes_karpathy_split_by_caption_text(tmp_path):
    stamps = make_stamps(tmp_path / "stamps", CAPTIONS)
    (stamps / "animals" / "a0_mirror.png").write_bytes((stamps / "animals" / "a0.png").read_bytes())  # no .txt
    (stamps / "animals" / "only.svg").write_text("<svg/>")
    (stamps / "animals" / "only.txt").write_text("An SVG-only stamp.")
    path, sizes = build_tuxpaint(tmp_path / "out", stamps)
    data = json.loads(path.read_text())
    assert sizes == {"train": 19, "val": 2, "test": 2, "svg_only_skipped": 1}  # 20 distinct single captions: 2 + 2
    by_split = {}
    for img in data["images"]:
        by_split.setdefault(img["split"], set()).add(img["sentences"][0]["raw"])
        assert (tmp_path / "out" / "images" / img["filename"]).is_file()
    assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"])
    assert "A flower." in by_split["train"]  # a shared caption goes to train as a whole
    assert not (by_split["val"] & by_split["test"])
    again = build_tuxpaint(tmp_path / "out2", stamps)[0]
    assert json.loads(again.read_text()) == data  # deterministic
    ds_root = tmp_path / "out"
    from crossmatch.data.datasets import ImageCaptionDataset

    ds = ImageCaptionDataset(ds_root, "train")
    assert len(ds.images) == 19


def test_split_by_caption_depends_on_the_text_alone():
    caps = [f"c{i}" for i in range(30)]
    assert split_by_caption(caps) == [dict(zip(caps[::-1], split_by_caption(caps[::-1]), strict=True))[c] for c in caps]


def make_deb(path: Path, stamps: Path) -> Path:
    """A minimal Debian package: ar archive with debian-binary, control.tar.gz and data.tar.gz."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        tar.add(stamps, arcname="./usr/share/tuxpaint/stamps")
    members = [("debian-binary", b"2.0\n"), ("control.tar.gz", b""), ("data.tar.gz", data.getvalue())]
    out = b"!<arch>\n"
    for name, body in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(body):<10}`\n".encode() + body
        out += b"\n" if len(body) % 2 else b""
    path.write_bytes(out)
    return path


def test_tuxpaint_reads_a_deb(tmp_path):
    deb = make_deb(tmp_path / "stamps.deb", make_stamps(tmp_path / "stamps", CAPTIONS))
    path, sizes = build_tuxpaint(tmp_path / "out", deb)
    assert sizes["train"] == 19 and len(json.loads(path.read_text())["images"]) == 23


@pytest.mark.parametrize(
    "breakage, culprit",
    [
        (lambda s: (s / "animals" / "a3.png").write_bytes(b"not a png"), "a3.png"),
        (lambda s: (s / "animals" / "lonely.txt").write_text("A lonely caption."), "lonely.txt"),
        (lambda s: (s / "animals" / "a4.txt").write_text("\n"), "a4.txt"),
        (lambda s: (s / "animals" / "a5.txt").write_bytes(b"Caf\xe9.\n"), "a5.txt"),
    ],
    ids=["undecodable", "no-image", "empty", "not-utf8"],
)
def test_tuxpaint_bad_input_names_the_file_and_leaves_nothing(tmp_path, capsys, breakage, culprit):
    stamps = make_stamps(tmp_path / "stamps", CAPTIONS)
    breakage(stamps)
    (tmp_path / "parent").mkdir()
    assert main(["data", "tuxpaint", "--out", str(tmp_path / "parent" / "out"), "--source", str(stamps)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("crossmatch: error:") and culprit in err[0]
    assert list((tmp_path / "parent").iterdir()) == []


def test_tuxpaint_refuses_a_missing_or_non_debian_source(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_tuxpaint(tmp_path / "out", tmp_path / "missing.deb")
    (tmp_path / "x.deb").write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(DataError, match="x.deb is not a Debian package"):
        build_tuxpaint(tmp_path / "out", tmp_path / "x.deb")
    assert not (tmp_path / "out").exists()
