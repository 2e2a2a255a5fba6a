"""Dataset formats (JSONL, CUHK-PEDES, ICFG-PEDES, RSTPReid), `crossmatch data validate` and
`crossmatch data convert`, and the example configs for real datasets."""

import json
from pathlib import Path

import pytest

from crossmatch.cli.main import main
from crossmatch.config import DataConfig, load_config
from crossmatch.data.datasets import ImageCaptionDataset
from crossmatch.data.formats import open_split
from crossmatch.data.pedes import PEDES
from crossmatch.errors import DataError
from crossmatch.models import list_models
from tests.helpers import ROOT, png, write_pedes

CONFIGS = ROOT / "configs"


def write_jsonl(root: Path, lines: list[dict], images: bool = True) -> Path:
    for e in lines:
        if images:
            png(root / "images" / e["image"])
    (root / "dataset.jsonl").write_text("\n".join(json.dumps(e) for e in lines) + "\n\n")
    return root


def test_jsonl_reads_splits_maps_pids_and_restval(tmp_path):
    write_jsonl(
        tmp_path,
        [
            {"image": "a.png", "captions": ["a red cat", " a cat "], "split": "train", "id": 7, "pid": 3},
            {"image": "sub/b.png", "captions": ["b"], "split": "test", "id": 8},
            {"image": "c.png", "captions": ["c one", "c two", "c three"], "split": "train"},
            {"image": "d.png", "captions": ["d"], "split": "restval", "id": 9},
        ],
    )
    cfg = DataConfig(root=str(tmp_path), format="jsonl")
    train = open_split(cfg, "train")
    assert train.captions == ["a red cat", "a cat", "c one", "c two", "c three"]
    assert train.txt_to_img == [0, 0, 1, 1, 1] and train.img_to_txt == [[0, 1], [2, 3, 4]]
    assert [r.imgid for r in train.images] == [7, "c.png"]  # the path is the default id
    assert [r.pid for r in train.images] == [3, None]
    assert train.images[0].path == tmp_path / "images" / "a.png"
    test = open_split(cfg, "test")
    assert test.images[0].path == tmp_path / "images" / "sub" / "b.png" and test.txt_to_img == [0]
    cfg.restval = True
    assert len(open_split(cfg, "train").images) == 3 and len(open_split(cfg, "test").images) == 1


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"image": "a.png", "captions": ["x"], "split": "train"}\nnot json', "line 2 is not valid JSON"),
        ('{"captions": ["x"], "split": "train"}', "line 1 has no 'image'"),
        ('{"image": "a.png", "captions": ["  "], "split": "train"}', "empty caption for image a.png"),
        ('{"image": "gone.png", "captions": ["x"], "split": "train"}', "missing, first: .*gone.png"),
    ],
)
def test_jsonl_errors_name_the_culprit(tmp_path, line, match):
    png(tmp_path / "images" / "a.png")
    (tmp_path / "dataset.jsonl").write_text(line)
    with pytest.raises(DataError, match=match):
        open_split(DataConfig(root=str(tmp_path), format="jsonl"), "train")


@pytest.mark.parametrize("fmt", sorted(PEDES))
def test_person_search_formats_read_identities(tmp_path, fmt):
    write_pedes(
        tmp_path,
        fmt,
        [
            ("p1/a.jpg", 1, ["a man in red", "red shirt man"], "train"),
            ("p1/b.jpg", 1, ["man in a red coat"], "train"),
            ("p2/a.jpg", 2, ["woman with a bag", "a woman"], "test"),
            ("p4/a.jpg", 4, ["a boy"], "test"),
            ("p4/b.jpg", 4, ["boy running", "the boy"], "test"),
        ],
    )
    cfg = DataConfig(root=str(tmp_path), format=fmt)
    train, test = open_split(cfg, "train"), open_split(cfg, "test")
    assert [r.pid for r in train.images] == [1, 1] and [r.pid for r in test.images] == [2, 4, 4]
    assert test.captions == ["woman with a bag", "a woman", "a boy", "boy running", "the boy"]
    assert test.txt_to_img == [0, 0, 1, 2, 2]
    assert [r.imgid for r in test.images] == ["p2/a.jpg", "p4/a.jpg", "p4/b.jpg"]
    assert test.images[2].path == tmp_path / "imgs" / "p4" / "b.jpg"
    item = test.image_view(lambda x: x.float())[1]  # ImageView emits the identity
    assert item["pid"] == 4 and item["image_idx"] == 1


def karpathy_fixture(root: Path) -> Path:
    """COCO-like: a filepath folder, 1 to 3 captions, a restval image, extra keys (boxes)."""
    images = []
    for i, (folder, split, caps) in enumerate(
        [("train2014", "train", ["one", "uno"]), ("val2014", "test", ["two"]), ("", "restval", ["3a", "3b", "3c"])]
    ):
        name = f"im{i}.png"
        png(root / "images" / folder / name, (40 * i, 100, 100))
        sents = [{"raw": c, "tokens": [c], "imgid": 10 + i, "sentid": 5 * i + k} for k, c in enumerate(caps)]
        entry = {"filename": name, "imgid": 10 + i, "split": split, "sentences": sents, "boxes": [[0, 0, 4, 4]]}
        images.append({**entry, "filepath": folder} if folder else entry)
    (root / "dataset.json").write_text(json.dumps({"dataset": "coco-like", "images": images}))
    return root / "dataset.json"


def test_convert_karpathy_to_jsonl_and_back_is_lossless(tmp_path, capsys):
    src = karpathy_fixture(tmp_path)
    assert main(["data", "convert", str(tmp_path), str(tmp_path / "d.jsonl"), "--to", "jsonl"]) == 0
    assert "wrote" in capsys.readouterr().out
    lines = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert lines[0] == {"image": "train2014/im0.png", "captions": ["one", "uno"], "split": "train", "id": 10,
                        "boxes": [[0, 0, 4, 4]]}  # fmt: skip
    assert main(["data", "convert", str(tmp_path / "d.jsonl"), str(tmp_path / "back.json"), "--to", "karpathy"]) == 0
    orig, back = json.loads(src.read_text())["images"], json.loads((tmp_path / "back.json").read_text())["images"]
    keys = ("filename", "filepath", "imgid", "split", "boxes")
    assert [{k: e.get(k) for k in keys} for e in back] == [{k: e.get(k) for k in keys} for e in orig]
    assert [[s["raw"] for s in e["sentences"]] for e in back] == [[s["raw"] for s in e["sentences"]] for e in orig]
    for split in ("train", "test", "restval"):
        a = ImageCaptionDataset(tmp_path, split)
        b = ImageCaptionDataset(tmp_path, split, json_name="back.json")
        c = open_split(DataConfig(root=str(tmp_path), format="jsonl", json_name="d.jsonl"), split)
        for ds in (b, c):
            assert [r.path for r in ds.images] == [r.path for r in a.images]
            assert ds.captions == a.captions and ds.txt_to_img == a.txt_to_img
            assert [r.imgid for r in ds.images] == [r.imgid for r in a.images]


def test_convert_person_search_keeps_identities(tmp_path):
    write_pedes(tmp_path, "rstpreid", [("a.jpg", 5, ["x y"], "train"), ("b.jpg", 6, ["z"], "train")])
    assert main(["data", "convert", str(tmp_path), str(tmp_path / "k.json"), "--to", "karpathy"]) == 0
    k = json.loads((tmp_path / "k.json").read_text())["images"]
    assert [(e["filename"], e["pid"], e["imgid"]) for e in k] == [("a.jpg", 5, "a.jpg"), ("b.jpg", 6, "b.jpg")]
    assert main(["data", "convert", str(tmp_path / "k.json"), str(tmp_path / "p.jsonl"), "--to", "jsonl"]) == 0
    cfg = DataConfig(root=str(tmp_path), format="jsonl", json_name="p.jsonl", image_dir=str(tmp_path / "imgs"))
    assert [r.pid for r in open_split(cfg, "train").images] == [5, 6]
    assert main(["data", "convert", str(tmp_path / "k.json"), str(tmp_path / "k.json"), "--to", "jsonl"]) == 2


def test_validate_reports_every_problem_before_failing(tmp_path, capsys):
    lines = [
        {"image": "ok.png", "captions": ["fine", "also fine"], "split": "train", "id": 1},
        {"image": "gone.png", "captions": ["x"], "split": "train", "id": 2},
        {"image": "bad.png", "captions": ["y"], "split": "val", "id": 3},
        {"image": "empty.png", "captions": ["z", "  "], "split": "val", "id": 4},
        {"image": "dup.png", "captions": ["w"], "split": "test", "id": 1},
    ]
    write_jsonl(tmp_path, lines, images=False)
    for name in ("ok.png", "empty.png", "dup.png"):
        png(tmp_path / "images" / name)
    (tmp_path / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    assert main(["data", "validate", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()}
    assert rows["train"][:5] == ["2", "3", "1", "1.50", "2"]  # images, captions, cap/img min, mean, max
    assert rows["val"][:2] == ["2", "3"] and rows["test"][:2] == ["1", "1"]
    kinds = ("missing", "unreadable", "empty", "duplicate")
    counts = {k: int(line.split()[2]) for line in out.splitlines() for k in kinds if line.strip().startswith(k)}
    assert counts == {"missing": 1, "unreadable": 1, "empty": 1, "duplicate": 1}
    assert "gone.png" in out and "bad.png" in out and "empty.png (caption 1)" in out and "1 (dup.png)" in out
    assert "4 problem(s)" in out and "crossmatch: error: 4 problem(s)" in err


def test_validate_clean_person_search_dataset_exits_0(tmp_path, capsys):
    write_pedes(tmp_path, "cuhk_pedes", [("a.jpg", 1, ["x", "y"], "train"), ("b.jpg", 1, ["z"], "train")])
    assert main(["data", "validate", str(tmp_path / "reid_raw.json")]) == 0
    out = capsys.readouterr().out
    assert "format cuhk_pedes" in out and "no problems found" in out
    assert out.splitlines()[2].split() == ["train", "2", "3", "1", "1.50", "2", "1"]  # 1 identity


@pytest.mark.parametrize("name", ["vse_f30k", "vse_coco", "tipcb_cuhk"])
def test_example_configs_load_and_name_registered_models(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.model["name"] in list_models()
    assert cfg.data.format in ("karpathy", "cuhk_pedes")
    if name == "vse_coco":
        assert cfg.data.restval and cfg.eval.folds == 5 and cfg.data.json_name == "dataset_coco.json"
    if name == "tipcb_cuhk":
        assert cfg.eval.metric == "t2i_r1"
