"""`data.format: csv` (open_clip's CsvDataset tables) and `data.format: folder` (images with .txt captions):
reading, grouping, splitting, and both through `data validate` and `data convert`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from crossmatch.cli.main import main
from crossmatch.config import DataConfig, load_config
from crossmatch.data import formats
from crossmatch.data.csv_folder import hash_split
from crossmatch.errors import DataError


def image(path: Path, colour=(255, 0, 0)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path.name


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def csv_root(tmp_path) -> Path:
    """train.csv: a.png with two captions (rows 1 and 3), b.png with one; val.csv: c.png; tab-separated."""
    root = tmp_path / "cc"
    for name, colour in (("a", (255, 0, 0)), ("b", (0, 255, 0)), ("c", (0, 0, 255))):
        image(root / "imgs" / f"{name}.png", colour)
    rows = ["filepath\ttitle", "imgs/a.png\ta red square", "imgs/b.png\ta green square", "imgs/a.png\tall red"]
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    (root / "val.csv").write_text("filepath\ttitle\nimgs/c.png\ta blue square\n")
    return root


def test_csv_rows_of_one_image_are_one_image_with_its_captions(csv_root):
    ds = formats.open_split(DataConfig(root=str(csv_root), format="csv"), "train")
    assert [r.path for r in ds.images] == [csv_root / "imgs/a.png", csv_root / "imgs/b.png"]  # first-row order
    assert ds.captions == ["a red square", "all red", "a green square"]
    assert ds.txt_to_img == [0, 0, 1]
    val = formats.open_split(DataConfig(root=str(csv_root), format="csv"), "val")
    assert val.captions == ["a blue square"] and len(val.images) == 1


def test_csv_columns_and_separator_are_config_keys(tmp_path):
    root = tmp_path / "c"
    image(root / "x.png")
    (root / "train.csv").write_text('caption,image\n"a red, square",x.png\n')  # a quoted separator inside
    keys = ["data.csv_img_key=image", "data.csv_caption_key=caption", "data.csv_separator=,"]  # as typed in a shell
    cfg = load_config(None, [f"data.root={root}", "data.format=csv", *keys]).data
    assert cfg.csv_separator == "," and formats.open_split(cfg, "train").captions == ["a red, square"]
    with pytest.raises(DataError, match=r"has no column 'filepath' \(columns: 'caption,image', separated by tab\)"):
        formats.open_split(DataConfig(root=str(root), format="csv"), "train")


def test_a_missing_csv_column_is_one_line_through_validate(csv_root, capsys):
    args = ["data", "validate", str(csv_root / "train.csv"), "--csv-caption-key", "caption"]
    assert main(args) == 2
    err = one_line_error(capsys)
    assert "has no column 'caption'" in err and "data.csv_caption_key" in err


def test_validate_reads_every_table_of_a_csv_folder(csv_root, capsys):
    assert main(["data", "validate", str(csv_root), "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert "(format csv, images under " in out and "no problems found" in out
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines()[2:4]}
    assert rows == {"train": ["2", "3"], "val": ["1", "1"]}  # images, captions per split


def test_hash_split_is_90_5_5_of_the_relative_paths():
    names = [f"shard{i % 7}/img_{i:05d}.jpg" for i in range(4000)]
    counts = {s: sum(hash_split(n) == s for n in names) for s in ("train", "val", "test")}
    # SHA-1 buckets are uniform: each count is within 4 binomial standard deviations of 90/5/5 (sd 19, 14, 14)
    assert abs(counts["train"] - 3600) < 76 and abs(counts["val"] - 200) < 56 and abs(counts["test"] - 200) < 56
    bucket = int(hashlib.sha1(b"shard0/img_00000.jpg").hexdigest(), 16) % 100  # the documented rule, by hand
    assert hash_split("shard0/img_00000.jpg") == ("train" if bucket < 90 else "val" if bucket < 95 else "test")


@pytest.fixture
def folder_root(tmp_path) -> Path:
    """Three captioned images at two depths, one image without a .txt."""
    root = tmp_path / "photos"
    for rel, caps in (("a.png", "a red square\n\nred\n"), ("x/b.png", "a green square"), ("x/y/c.png", "blue")):
        image(root / rel)
        (root / rel).with_suffix(".txt").write_text(caps)
    image(root / "x" / "lonely.png")
    return root


def test_folder_images_take_their_txt_lines_and_a_split_file(folder_root, tmp_path):
    split_file = tmp_path / "splits.json"
    split_file.write_text(json.dumps({"a.png": "train", "x/b.png": "train", "x/y/c.png": "test"}))
    cfg = DataConfig(root=str(folder_root), format="folder", split_file=str(split_file))
    train = formats.open_split(cfg, "train")
    assert [r.path for r in train.images] == [folder_root / "a.png", folder_root / "x/b.png"]
    assert train.captions == ["a red square", "red", "a green square"]  # blank lines skipped
    assert formats.open_split(cfg, "test").captions == ["blue"]  # x/lonely.png is listed nowhere: in no split


def test_a_folder_image_without_captions_is_reported_by_validate(folder_root, capsys):
    assert main(["data", "validate", str(folder_root)]) == 2  # the format is guessed: no annotation file, no .csv
    captured = capsys.readouterr()
    assert "(format folder, images under " in captured.out
    assert captured.err.strip() == (
        f"crossmatch: error: 1 problem(s) in {folder_root}, first: image without captions: x/lonely.png"
    )


def test_convert_a_folder_to_jsonl_keeps_images_captions_and_splits(folder_root, tmp_path, capsys):
    (folder_root / "x" / "lonely.png").unlink()
    out = tmp_path / "photos.jsonl"
    assert main(["data", "convert", str(folder_root), str(out), "--to", "jsonl"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out} (jsonl, ") and "3 images, 4 captions" in printed
    assert f"data.image_dir={folder_root}" in printed  # the next step names the image folder
    entries = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(e["image"], e["captions"], e["split"]) for e in entries] == [
        ("a.png", ["a red square", "red"], hash_split("a.png")),
        ("x/b.png", ["a green square"], hash_split("x/b.png")),
        ("x/y/c.png", ["blue"], hash_split("x/y/c.png")),
    ]
