"""Data inputs a hostile user can give, each kept to one promise (the test's docstring states it):

- one image decoder for every source: shard members go through `load_image` as files do (pixel limit from the
  header, background, bomb protection) and 16-bit greyscale is scaled to 8 bits, not clipped to white;
- one set of entry checks: a dataset entry of the wrong type fails in one line naming the file and the entry,
  in every format, and `data validate` says exactly what training says;
- an error inside a loader worker is the same one line as without workers;
- only regular files are opened (a FIFO or a device is refused at once, never waited on), files read whole
  are capped (`data.max_annotation_bytes`) and so is what a shard member may inflate to;
- the size and count options of `data shapes` and `features`, and the `features.json` index, are checked
  before any work.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crossmatch.cli.main import main
from crossmatch.config import DataConfig
from crossmatch.data.formats import open_split
from crossmatch.data.transforms import load_image, to_rgb
from crossmatch.errors import DataError
from tests.helpers import (
    ENTRIES,
    error_line,
    png_header_bomb,
    save_tiny_checkpoint,
    train_args,
    write_karpathy,
    write_tar,
)

MiB = 1 << 20


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def shard_of(folder: Path, images: dict[str, bytes], split: str = "test", **meta) -> Path:
    """One shard `{split}-000000.tar` in `folder`: each key's image and a json with two captions (+ `meta`)."""
    members = {}
    for key, data in images.items():
        members[f"{key}.png"] = data
        caps = {"captions": [f"picture {key}", f"image {key}"], "split": split, **meta}
        members[f"{key}.json"] = json.dumps(caps).encode()
    return write_tar(folder / f"{split}-000000.tar", members)


# ---- one image decoder ----------------------------------------------------------------------------------

GREY_16 = np.array([[0, 257, 25700], [32896, 65280, 65535]], dtype=np.uint16)  # (2, 3)
GREY_8 = np.array([[0, 1, 100], [128, 254, 255]], dtype=np.uint8)  # round(v / 257)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_wide_greyscale_is_scaled_to_8_bits_not_clipped(mode):
    """A 16-bit greyscale image (Pillow modes I;16, I;16B, and I) keeps its tones: v -> round(v / 257) in each
    RGB channel, where a plain convert would clip everything above 255 to white."""
    wide = {"I;16": GREY_16, "I;16B": GREY_16.astype(">u2"), "I": GREY_16.astype(np.int32)}[mode]
    image = Image.fromarray(wide)
    assert image.mode == mode
    rgb = np.asarray(to_rgb(image))  # (2, 3, 3)
    assert rgb.shape == (2, 3, 3) and (rgb == GREY_8[:, :, None]).all()


def test_a_16_bit_png_file_and_shard_member_decode_alike(tmp_path):
    """A 16-bit greyscale PNG decodes to the same scaled pixels from a file, from a shard member and in the
    thumbnails of HTML reports."""
    import base64

    from crossmatch.search.report import thumbnail_data_uri

    data = png_bytes(Image.fromarray(GREY_16))
    (tmp_path / "grey.png").write_bytes(data)
    expected = torch.from_numpy(GREY_8).expand(3, 2, 3)  # (3, H, W)
    assert torch.equal(load_image(tmp_path / "grey.png"), expected)
    shard_of(tmp_path / "s", {"000": data})
    view = open_split(DataConfig(root=str(tmp_path / "s"), format="webdataset"), "test").image_view(lambda x: x)
    assert torch.equal(view[0]["image"], expected)
    thumb = base64.b64decode(thumbnail_data_uri(tmp_path / "grey.png").split(",", 1)[1])
    assert (np.asarray(Image.open(io.BytesIO(thumb))) == GREY_8[:, :, None]).all()  # (2, 3, 3): not shrunk


def test_shards_honour_the_pixel_limit_and_the_background(tmp_path):
    """`data.max_image_pixels` and `data.background` apply to shard images as to image files: an image over
    the limit is a one-line DataError naming shard and key; transparent pixels take the background colour."""
    clear = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # 1600 fully transparent pixels
    folder = tmp_path / "s"
    shard_of(folder, {"000": png_bytes(clear)})
    cfg = DataConfig(root=str(folder), format="webdataset", max_image_pixels=1000)
    with pytest.raises(DataError, match=r"image shard .*test-000000.tar key 000 is 40 x 40 pixels, more than"):
        open_split(cfg, "test").image_view(lambda x: x)[0]
    cfg = DataConfig(root=str(folder), format="webdataset", background=[0, 0, 255])
    pixels = open_split(cfg, "test").image_view(lambda x: x)[0]["image"]  # (3, 40, 40)
    assert pixels[:, 0, 0].tolist() == [0, 0, 255] and torch.equal(pixels, pixels[:, :1, :1].expand(3, 40, 40))


def test_the_train_stream_decodes_with_the_pixel_limit_and_skips_a_bomb(tmp_path):
    """The streamed train split decodes through the same path, with the configured data.max_image_pixels: a
    decompression bomb inside a shard is one skipped sample (with data.max_bad_samples), named by shard and
    key, never a crash."""
    from crossmatch.data.shard_stream import build_shard_loader
    from crossmatch.data.tokenizer import CaptionTokenizer
    from crossmatch.data.transforms import build_image_transform

    bomb = png_header_bomb(tmp_path / "bomb.png").read_bytes()
    plain = png_bytes(Image.new("RGB", (8, 8), (200, 10, 10)))
    folder = tmp_path / "s"
    shard_of(folder, {f"{i:03d}": bomb if i == 2 else plain for i in range(4)}, split="train")
    data = open_split(DataConfig(root=str(folder), format="webdataset", max_image_pixels=1000), "train")
    loader = build_shard_loader(
        data, CaptionTokenizer.train(data.captions), build_image_transform(8, train=False), batch_size=4, seed=0,
        buffer_size=1, skip_bad=True,
    )  # fmt: skip
    loader.set_epoch(0, 0)
    batches = list(loader)
    skipped = [s for b in batches for s in b.get("skipped", [])]
    assert len(skipped) == 2  # the bomb's 2 captions
    assert all("key 002 is 30000 x 30000 pixels, more than data.max_image_pixels=1000" in s for s in skipped)
    assert sum(len(b["image_idx"]) for b in batches) == 6  # 8 pairs: 2 batches, 6 decoded


def test_validate_reports_a_bomb_inside_a_shard(tmp_path, capsys):
    """`data validate` of shards holding a decompression bomb reports it as an unreadable image: one line."""
    bomb = png_header_bomb(tmp_path / "bomb.png").read_bytes()
    shard_of(tmp_path / "s", {"000": bomb, "001": png_bytes(Image.new("RGB", (8, 8)))})
    assert main(["data", "validate", str(tmp_path / "s")]) == 2
    line = error_line(capsys)
    assert "unreadable image" in line and "test-000000.tar/000.png is 30000 x 30000 pixels" in line


# ---- one set of entry checks: training and validate agree ---------------------------------------------------


def _karpathy(root: Path, edit) -> Path:
    write_karpathy(root, ENTRIES)
    data = json.loads((root / "dataset.json").read_text())
    edit(data["images"][0])
    (root / "dataset.json").write_text(json.dumps(data))
    return root


def _jsonl(root: Path, **change) -> Path:
    write_karpathy(root, ENTRIES)  # for its images
    entries = [
        {"image": f"00{i}.png", "captions": e["captions"], "split": e["split"], "id": i} for i, e in enumerate(ENTRIES)
    ]
    entries[0].update(change)
    (root / "dataset.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return root


def _jsonl_raw(root: Path, key: str, raw: str) -> Path:
    """A JSONL entry whose `key` is the literal JSON text `raw` (numbers json.dumps cannot write)."""
    _jsonl(root)
    lines = (root / "dataset.jsonl").read_text().splitlines()
    lines[0] = lines[0][:-1] + f', "{key}": {raw}}}'
    (root / "dataset.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _pedes(root: Path, **change) -> Path:
    write_karpathy(root, ENTRIES)
    (root / "images").rename(root / "imgs")
    records = [
        {"file_path": f"00{i}.png", "id": i + 1, "captions": e["captions"], "split": e["split"]}
        for i, e in enumerate(ENTRIES)
    ]
    records[0].update(change)
    (root / "reid_raw.json").write_text(json.dumps(records))
    (root / "dataset.json").unlink()
    return root


def _pedes_raw(root: Path, raw: str) -> Path:
    _pedes(root)
    text = (root / "reid_raw.json").read_text()
    (root / "reid_raw.json").write_text(text.replace('"id": 1,', f'"id": {raw},', 1))
    return root


def _shards(root: Path, **meta) -> Path:
    images = {"000": png_bytes(Image.new("RGB", (8, 8), (9, 9, 9)))}
    shard_of(root, images, split="train", **meta)
    shard_of(root, {"001": images["000"]}, split="test")
    return root


HUGE = "7" * 5000  # more digits than Python converts to an int (4,300)
WRONG_TYPES = {  # name: (format, make(root), words of the one line)
    "karpathy id a list": ("karpathy", lambda r: _karpathy(r, lambda i: i.update(imgid=[1, 2])), "'id' must be"),
    "karpathy twin a list": ("karpathy", lambda r: _karpathy(r, lambda i: i.update(twin=[1])), "'twin' must be"),
    "karpathy pid a string": ("karpathy", lambda r: _karpathy(r, lambda i: i.update(pid="a3")), "'pid' (person"),
    "karpathy negative type an int": (
        "karpathy",
        lambda r: _karpathy(r, lambda i: i["sentences"][0].update(negatives=[{"raw": "a cat", "type": 3}])),
        "expected {'raw': text, 'type': name}",
    ),
    "jsonl boxes a string": ("jsonl", lambda r: _jsonl(r, boxes="0 0 4 4"), "'boxes' must be a list of [x1, y1"),
    "jsonl pid a float": ("jsonl", lambda r: _jsonl(r, pid=1.5), "'pid' (person identity) must be an integer"),
    "jsonl pid a string": ("jsonl", lambda r: _jsonl(r, pid="3"), "'pid' (person identity) must be an integer"),
    "jsonl id an object": ("jsonl", lambda r: _jsonl(r, id={"a": 1}), "'id' must be a string or an integer"),
    "jsonl negatives a number": ("jsonl", lambda r: _jsonl(r, negatives=5), "'negatives' must hold one list"),
    "jsonl 5000-digit id": ("jsonl", lambda r: _jsonl_raw(r, "id", HUGE), "4300 digits"),
    "cuhk id a string": ("cuhk_pedes", lambda r: _pedes(r, id="abc"), "'id' (person identity) must be an integer"),
    "cuhk id a list": ("cuhk_pedes", lambda r: _pedes(r, id=[4]), "'id' (person identity) must be an integer"),
    "cuhk 5000-digit id": ("cuhk_pedes", lambda r: _pedes_raw(r, HUGE), "4300 digits"),
    "shard pid a string": ("webdataset", lambda r: _shards(r, pid="x"), "'pid' (person identity) must be"),
    "shard id a list": ("webdataset", lambda r: _shards(r, id=[1, 2]), "'id' must be a string or an integer"),
}
NAMED = {"karpathy": "dataset.json", "jsonl": "dataset.jsonl", "cuhk_pedes": "reid_raw.json", "webdataset": ".tar"}


@pytest.mark.parametrize("name", WRONG_TYPES)
def test_entries_of_the_wrong_type_are_refused_alike_by_train_and_validate(tmp_path, capsys, name):
    """An entry with a key of the wrong type (ids or twins as lists or objects, a person id that is a string
    or a float, a 5,000-digit number, negatives or boxes of the wrong type) is refused by training in one line naming
    the file and the entry, in every format; `data validate` refuses the same file (never "no problems")."""
    fmt, make, words = WRONG_TYPES[name]
    root = make(tmp_path / "data")
    assert main(train_args(root, tmp_path / "run", f"data.format={fmt}", "data.val_split=test")) == 2
    line = error_line(capsys)
    assert words in line and NAMED[fmt] in line, line
    assert main(["data", "validate", str(root), "--format", fmt]) == 2
    checked = error_line(capsys)
    assert words in checked and NAMED[fmt] in checked, checked


# ---- worker errors --------------------------------------------------------------------------------------------


def test_an_error_in_a_loader_worker_is_the_same_one_line(shapes_copy, tmp_path, capsys):
    """With data.num_workers > 0, a data error inside a worker prints the same single line as without workers
    (not "Caught DataError in DataLoader worker process 0." and a traceback), for training and evaluation."""
    for image in json.loads((shapes_copy / "dataset.json").read_text())["images"]:
        if image["split"] in ("train", "test"):
            (shapes_copy / "images" / image["filename"]).write_bytes(b"not a png")
    lines = {}
    for workers in (0, 1):
        run = tmp_path / f"run{workers}"
        assert main(train_args(shapes_copy, run, f"data.num_workers={workers}", "train.epochs=1")) == 2
        lines["train", workers] = error_line(capsys)
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pt", "tiny_vse")
    for workers in (0, 1):
        argv = ["evaluate", str(ckpt), "--split", "test", f"data.root={shapes_copy}", f"data.num_workers={workers}"]
        assert main(argv) == 2
        lines["evaluate", workers] = error_line(capsys)
    for command in ("train", "evaluate"):
        assert lines[command, 1] == lines[command, 0], lines
        assert "cannot decode image" in lines[command, 1] and "Caught" not in lines[command, 1]


def test_a_chained_error_from_a_worker_keeps_its_own_message():
    """A DataError raised (from another exception) in a DataLoader worker reaches the caller as a DataError
    whose message is the original one."""
    from torch.utils.data import DataLoader, Dataset

    class Broken(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            try:
                raise ValueError("inner detail")
            except ValueError as err:
                raise DataError(f"image not found: /data/{i}.png") from err

    caught = []
    try:
        list(DataLoader(Broken(), num_workers=1))
    except DataError as err:
        caught.append(str(err))
        # torch's re-raising frame holds the exception (a cycle): without this, the loader's worker lives until
        # the cyclic GC, whose finaliser then takes 5 s in some later test (cli.main drops tracebacks likewise)
        err.__traceback__ = None
    assert caught == ["image not found: /data/0.png"]


# ---- only regular files, bounded reads -----------------------------------------------------------------------


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


@pytest.mark.timeout(60)
def test_a_fifo_is_refused_at_once_wherever_a_file_is_read(tmp_path, fifo, capsys):
    """A FIFO given as the dataset file (train and validate, Karpathy and JSONL), as --image, as a negatives
    file, as a shard or as an image of the dataset is refused in one line; nothing waits for a writer."""
    root = write_karpathy(tmp_path / "data", ENTRIES)
    (root / "dataset.json").unlink()
    os.mkfifo(root / "dataset.json")
    assert main(train_args(root, tmp_path / "run")) == 2
    assert "dataset.json is a FIFO (named pipe), not a regular file" in error_line(capsys)
    assert main(["data", "validate", str(root)]) == 2
    assert "dataset.json is a FIFO" in error_line(capsys)
    assert main(["data", "validate", str(fifo), "--format", "jsonl"]) == 2
    assert f"{fifo} is a FIFO" in error_line(capsys)
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pt", "tiny_vse")
    gallery = write_karpathy(tmp_path / "gallery", ENTRIES)
    assert main(["search", str(ckpt), "--image", str(fifo), f"data.root={gallery}"]) == 2
    assert f"image {fifo} is a FIFO" in error_line(capsys)
    assert main(["evaluate", str(ckpt), "--negatives", str(fifo), "--data", str(gallery)]) == 2
    assert f"{fifo} is a FIFO" in error_line(capsys)
    shards = tmp_path / "shards"
    _shards(shards)
    os.mkfifo(shards / "train-000001.tar")
    assert main(["data", "validate", str(shards)]) == 2
    assert "train-000001.tar is a FIFO" in error_line(capsys)
    with pytest.raises(DataError, match="is a FIFO"):
        load_image(fifo)


@contextlib.contextmanager
def data_limit(extra: int):
    """At most `extra` more bytes of heap for this process (RLIMIT_DATA): a reader that tried to read a device
    whole would get a MemoryError instead of exhausting the machine."""
    used = next(
        int(ln.split()[1]) * 1024
        for ln in Path("/proc/self/status").read_text().splitlines()
        if ln.startswith("VmData:")
    )
    old = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (used + extra, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, old)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmData from /proc")
@pytest.mark.timeout(60)
def test_a_character_device_is_refused_without_reading_it(tmp_path, capsys):
    """/dev/zero as a dataset file (Karpathy, JSONL, person search; given by name or through a symlink) is
    refused in one line, unread, by validate and by training (under a 2 GiB heap limit, so that a reader that
    tried fails with a MemoryError instead of exhausting the machine's memory)."""
    for name in ("dataset.json", "dataset.jsonl", "reid_raw.json"):
        (tmp_path / name).symlink_to("/dev/zero")
    with data_limit(2 << 30):
        for fmt, name in (("karpathy", "dataset.json"), ("jsonl", "dataset.jsonl"), ("cuhk_pedes", "reid_raw.json")):
            assert main(["data", "validate", str(tmp_path), "--format", fmt, "--json-name", name]) == 2
            assert error_line(capsys).endswith(f"{tmp_path / name} is a character device, not a regular file")
        assert main(["data", "validate", "/dev/zero", "--format", "jsonl"]) == 2
        assert error_line(capsys).endswith("file /dev/zero is a character device, not a regular file")
        assert main(train_args(tmp_path, tmp_path / "run", "data.format=jsonl")) == 2
        assert error_line(capsys).endswith("dataset.jsonl is a character device, not a regular file")


def test_files_read_whole_are_capped_and_jsonl_lines_too(tmp_path, capsys):
    """A dataset file read whole larger than data.max_annotation_bytes (Karpathy, person search), or a JSONL
    line longer than it, is refused in one line naming the file and the setting."""
    karpathy = write_karpathy(tmp_path / "k", ENTRIES)
    size = (karpathy / "dataset.json").stat().st_size
    assert main(train_args(karpathy, tmp_path / "r1", "data.max_annotation_bytes=200")) == 2
    assert f"dataset.json holds {size} bytes, more than data.max_annotation_bytes=200" in error_line(capsys)
    at_cap = DataConfig(root=str(karpathy), max_annotation_bytes=size)
    assert open_split(at_cap, "train").captions == ENTRIES[0]["captions"]  # exactly at the cap: read
    pedes = _pedes(tmp_path / "p")
    argv = train_args(pedes, tmp_path / "r2", "data.format=cuhk_pedes", "data.max_annotation_bytes=100")
    assert main(argv) == 2
    assert "reid_raw.json holds" in error_line(capsys)
    jsonl = _jsonl(tmp_path / "j", captions=["a red shape " * 20])
    assert main(train_args(jsonl, tmp_path / "r3", "data.format=jsonl", "data.max_annotation_bytes=200")) == 2
    assert "dataset.jsonl line 1 holds more than data.max_annotation_bytes=200 bytes" in error_line(capsys)


@pytest.fixture(scope="module")
def gzip_bomb(tmp_path_factory) -> Path:
    """A 1.2 MB gzip-compressed shard whose one member declares, and inflates to, 260 MiB of zeros."""
    folder = tmp_path_factory.mktemp("gzbomb") / "s"
    folder.mkdir()
    info = tarfile.TarInfo("000.png")
    info.size = 260 * MiB
    z = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: a gzip stream
    block = bytes(MiB)
    parts = [z.compress(info.tobuf(format=tarfile.GNU_FORMAT))]
    parts += [z.compress(block) for _ in range(260)] + [z.compress(bytes(1024)), z.flush()]  # data, end of archive
    (folder / "train-000000.tar").write_bytes(b"".join(parts))
    return folder


def test_a_shard_member_may_not_inflate_beyond_the_cap(gzip_bomb, tmp_path, capsys):
    """A shard member that would inflate to more than data.max_shard_member_bytes (default 256 MiB; a gzip
    bomb) is refused from its tar header, unread: `data validate` reports it, opening the split fails in one
    line naming shard and member."""
    assert (gzip_bomb / "train-000000.tar").stat().st_size < 2 * MiB
    assert main(["data", "validate", str(gzip_bomb)]) == 2
    line = error_line(capsys)
    assert "unreadable sample" in line and "member 000.png inflates to 272629760 bytes" in line
    assert "more than data.max_shard_member_bytes=268435456" in line
    small = tmp_path / "s"
    _shards(small)
    with pytest.raises(DataError, match=r"key 001: member 001.\w+ inflates to \d+ bytes, more than .*=20$"):
        open_split(DataConfig(root=str(small), format="webdataset", max_shard_member_bytes=20), "test")


# ---- options checked before any work ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--size", "0"], "--size 0: must be 24 to 4096 px"),
        (["--size", "100000"], "--size 100000: must be 24 to 4096 px"),
        (["--train", "-1"], "--train -1: must be 0 to 10,000,000 images"),
        (["--train", "0", "--val", "0", "--test", "0"], "all 0: the dataset would hold no image"),
        (["--seed", "-3"], "--seed -3: must be 0 to 2**63 - 1"),
        (["--out-is-a-file"], "is a file; give a folder"),
    ],
)
def test_data_shapes_checks_its_options_first(tmp_path, capsys, argv, words):
    """`data shapes` with a size, a count or a seed out of range, or --out a file, fails in one line before
    writing anything."""
    out = tmp_path / "out"
    if argv == ["--out-is-a-file"]:
        out.write_text("precious")
        argv = []
    assert main(["data", "shapes", "--out", str(out), "--train", "2", "--val", "1", "--test", "1", *argv]) == 2
    assert words in error_line(capsys)
    assert not (out / "images").exists() and (not out.is_file() or out.read_text() == "precious")


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda p: p.write_text('{"test": {"kind": "glo'), "features index .*features.json is not valid JSON"),
        (lambda p: p.write_text("[1, 2]"), "features index .*features.json is damaged"),
        (lambda p: p.write_text('{"test": 3}'), "features index .*features.json is damaged"),
        (None, "--batch-size 0: must be at least 1"),
    ],
)
def test_features_checks_its_index_and_batch_size_first(shapes_root, tmp_path, capsys, damage, words):
    """`features` with a damaged features.json in --out, or --batch-size 0, fails in one line before any work
    (the damaged index is left as it was)."""
    import re

    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pt", "tiny_vse")
    out = tmp_path / "feats"
    out.mkdir()
    argv = ["features", str(ckpt), "--data", str(shapes_root), "--out", str(out), "--device", "cpu"]
    if damage is None:
        argv += ["--batch-size", "0"]
    else:
        damage(out / "features.json")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(argv) == 2
    assert re.search(words, error_line(capsys))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
