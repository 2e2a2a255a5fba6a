"""The synthetic person-search dataset (`crossmatch data people`): pixels at known points of a rendered figure,
captions that state only what the view shows, determinism across worker counts, identity-disjoint splits,
twin identities that differ exactly as declared, the CUHK-PEDES reader and conversions keeping `twin_pid`,
and twin accuracy by identity on a hand-made score matrix."""

import json
import random
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from crossmatch.cli.main import main
from crossmatch.config import DataConfig
from crossmatch.data.check import convert, resolve_source
from crossmatch.data.formats import open_split
from crossmatch.data.jsonl import read_jsonl
from crossmatch.data.people import (
    COLORS,
    TWIN_KINDS,
    Shot,
    caption,
    generate_people,
    keypoints,
    make_twin,
    render,
    sample_attributes,
    sample_shot,
    twin_kind,
)
from crossmatch.data.shards import read_shard_entries
from crossmatch.metrics import twin_identity_accuracy
from crossmatch.retrieval.person import TWIN_KEY, format_person_table, person_metrics
from tests.helpers import train_args

SIZE = (128, 48)
PLAIN = {  # a red t-shirt, blue trousers, white shoes; nothing else
    "hair_color": "black", "hair_length": "short", "hat": None, "upper": "tshirt", "upper_color": "red",
    "stripes": None, "logo": None, "lower": "trousers", "lower_color": "blue", "shoes": "white", "bag": None,
    "bag_color": None, "item": None, "item_color": None, "skin": 0,
}  # fmt: skip


def shot(view: str = "front", **changes) -> Shot:
    """A shot without colour cast, noise or occluder (pixels keep the palette's exact colours)."""
    base = dict(view=view, facing=1, h=100.0, cx=24.0, top=12.0, arms=(8.0, 8.0), legs=(3.0, 3.0), occluder=None,
                gain=(1.0, 1.0, 1.0), noise=0.0, scene=7)  # fmt: skip
    return Shot(**{**base, **changes})


def pixel(img: Image.Image, point: tuple[float, float]) -> tuple[int, int, int]:
    return img.getpixel((int(point[0]), int(point[1])))


def test_a_front_view_shows_the_garment_and_shoe_colours_at_known_pixels():
    s = shot("front")
    img, pts = render(PLAIN, s, SIZE), keypoints(s)
    assert img.size == (48, 128)
    assert pixel(img, pts["torso"]) == COLORS["red"][0] == (200, 30, 35)
    mid_leg = [(a + b) / 2 for a, b in zip(pts["hip_0"], pts["foot_0"], strict=True)]
    assert pixel(img, mid_leg) == COLORS["blue"][0]
    assert pixel(img, pts["shoe_0"]) == pixel(img, pts["shoe_1"]) == COLORS["white"][0]
    # a backpack hides the torso from behind only; the occluder hides the shoes
    with_pack = {**PLAIN, "bag": "backpack", "bag_color": "green"}
    assert pixel(render(with_pack, s, SIZE), pts["torso"]) == COLORS["red"][0]
    back = shot("back")
    assert pixel(render(with_pack, back, SIZE), keypoints(back)["torso"]) == COLORS["green"][0]
    hidden = render(PLAIN, shot("front", occluder=90.0), SIZE)
    assert pixel(hidden, pts["shoe_0"]) not in {COLORS["white"][0], COLORS["blue"][0]}
    # the colour cast scales every channel
    cast = render(PLAIN, shot("front", gain=(0.5, 1.0, 1.0)), SIZE)
    assert pixel(cast, pts["torso"]) == (100, 30, 35)


WORDS = {
    "backpack": r"\b(backpack|rucksack)\b",
    "logo": r"\blogo\b",
    "shoes": r"\b(shoes|sneakers|trainers)\b",
    "gendered": r"\b(man|woman|men|women|he|she|his|her|him|boy|girl|male|female)\b",
}


def test_a_caption_states_every_visible_attribute_and_never_a_hidden_one():
    seen = set()
    for n in range(300):
        rng = random.Random(n)
        a = sample_attributes(rng)
        s = sample_shot(rng, SIZE, rng.choice(("front", "back", "side")))
        text = caption(rng, a, s).lower()
        has = {k: re.search(w, text) is not None for k, w in WORDS.items()}
        assert not has["gendered"], text
        assert has["backpack"] == (a["bag"] == "backpack" and s.view != "front"), (s.view, text)
        assert has["logo"] == (a["logo"] is not None and s.view == "front"), (s.view, text)
        assert has["shoes"] == (s.occluder is None), text
        assert COLORS[a["upper_color"]][1][0] in text or any(w in text for w in COLORS[a["upper_color"]][1])
        seen.add((s.view, a["bag"] == "backpack", a["logo"] is not None, s.occluder is not None))
    # every case the rules distinguish came up
    assert {("front", True), ("back", True), ("side", True)} <= {(v, b) for v, b, _, _ in seen}
    assert {("front", True), ("back", True)} <= {(v, lg) for v, _, lg, _ in seen}
    assert any(o for *_, o in seen)


def test_twins_differ_exactly_as_declared():
    kinds = set()
    for n in range(200):
        rng = random.Random(n)
        twin = make_twin(rng, sample_attributes(rng))
        if twin is None:
            continue
        a, b, kind, differs = twin
        kinds.add(kind)
        assert sorted(k for k in a if a[k] != b[k]) == differs
        assert twin_kind(differs) == kind  # what a record's "twin_differs" maps back to
        if kind == "swap_colors":
            assert (a["upper_color"], a["lower_color"]) == (b["lower_color"], b["upper_color"])
        if kind == "handbag":
            assert a["bag"] == "handbag"  # visible in every view, so every caption tells the pair apart
    assert kinds == set(TWIN_KINDS)


def test_the_written_splits_are_identity_disjoint_and_twins_name_each_other(people_root):
    records = json.loads((people_root / "reid_raw.json").read_text())
    assert len(records) == 10 * 4 and all(len(r["captions"]) == 2 for r in records)
    split_of: dict[int, set] = {}
    for r in records:
        split_of.setdefault(r["id"], set()).add(r["split"])
        assert (people_root / "imgs" / r["file_path"]).is_file()
        assert Image.open(people_root / "imgs" / r["file_path"]).size == (32, 96)
    assert all(len(s) == 1 for s in split_of.values())  # every identity in one split
    assert sorted(split_of) == list(range(1, 11))  # ids 1.. run train, val, test
    by_id = {r["id"]: r for r in records}
    twins = {(r["id"], r["twin_pid"]) for r in records if "twin_pid" in r}
    assert {(7, 8), (8, 7), (9, 10), (10, 9)} <= twins  # val/test identities 0, 1 are a twin pair
    for a, b in twins:
        assert by_id[a]["split"] == by_id[b]["split"] and by_id[b]["twin_pid"] == a
        differs = sorted(k for k in by_id[a]["attributes"] if by_id[a]["attributes"][k] != by_id[b]["attributes"][k])
        assert differs == by_id[a]["twin_differs"]
    for pid in split_of:  # 4 images of each identity: every view
        assert {r["view"]["view"] for r in records if r["id"] == pid} == {"front", "back", "side"}


def test_the_cuhk_pedes_reader_reads_it_with_twin_identities(people_root):
    cfg = DataConfig(root=str(people_root), format="cuhk_pedes")
    test = open_split(cfg, "test")
    assert len(test.images) == 8 and len(test.captions) == 16
    assert {r.pid for r in test.images} == {9, 10} and test.twin_pids == [(9, 10)]
    assert test.first_images(4).twin_pids == []  # identity 10's images are cut off
    train = open_split(cfg, "train")
    assert {r.pid for r in train.images} == set(range(1, 7)) and (1, 2) in train.twin_pids


def test_validate_and_convert_keep_twin_pid(people_root, tmp_path, capsys):
    assert main(["data", "validate", str(people_root)]) == 0
    assert "no problems found" in capsys.readouterr().out
    src = resolve_source(people_root)
    jsonl = convert(src, tmp_path / "people.jsonl", "jsonl")
    entries = {e["image"]: e for e in read_jsonl(jsonl)}
    assert entries["test/00009_0.png"]["twin_pid"] == 10 and entries["test/00009_0.png"]["pid"] == 9
    cfg = DataConfig(root=str(tmp_path), format="jsonl", json_name="people.jsonl", image_dir=str(people_root / "imgs"))
    assert open_split(cfg, "test").twin_pids == [(9, 10)]
    shards = convert(src, tmp_path / "shards", "webdataset", shard_size=100)
    meta = [e for e in read_shard_entries(shards)[0] if e.get("pid") == 10]
    assert len(meta) == 4 and all(e["twin_pid"] == 9 for e in meta)


def test_generation_is_deterministic_whatever_the_worker_count(tmp_path):
    files = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        generate_people(out, 2, 0, 2, images_per_id=3, size=(64, 24), seed=5, workers=workers)
        files.append({p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert files[0] == files[1] and len(files[0]) == 1 + 4 * 3
    other = tmp_path / "seed6"
    generate_people(other, 2, 0, 2, images_per_id=3, size=(64, 24), seed=6, workers=1)
    assert (other / "reid_raw.json").read_bytes() != files[0][Path("reid_raw.json")]


# Hand-made (N_img=5, N_txt=4) scores: image pids [1, 1, 2, 2, 3]; twins (1, 2).
# Captions: 0, 1 of pid 1 (images 0, 1), 2 of pid 2, 3 of pid 3 (not a twin).
SCORES = torch.tensor(
    [
        [0.9, 0.2, 0.1, 0.5],
        [0.1, 0.3, 0.6, 0.5],
        [0.5, 0.3, 0.4, 0.5],
        [0.2, 0.1, 0.6, 0.5],
        [0.0, 0.0, 0.0, 0.9],
    ]
)
PIDS = torch.tensor([1, 1, 2, 2, 3])
TXT_TO_IMG = torch.tensor([0, 1, 2, 4])


def test_twin_accuracy_by_identity_on_a_hand_made_matrix():
    # caption 0 (pid 1): best own 0.9 > best twin 0.5: win. Caption 1 (pid 1): own 0.3 ties twin 0.3: a tie fails.
    # Caption 2 (pid 2): own max(0.4, 0.6) = 0.6 ties pid 1's 0.6: fails. Caption 3 (pid 3): no twin, not a case.
    assert twin_identity_accuracy(SCORES.t(), PIDS[TXT_TO_IMG], PIDS, [(1, 2)]) == pytest.approx(100 / 3)
    better = SCORES.clone()
    better[3, 2] = 0.7  # caption 2 now prefers its own identity
    assert twin_identity_accuracy(better.t(), PIDS[TXT_TO_IMG], PIDS, [(2, 1)]) == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="no gallery item"):
        twin_identity_accuracy(SCORES.t(), PIDS[TXT_TO_IMG], PIDS, [(1, 4)])
    with pytest.raises(ValueError, match="one identity"):
        twin_identity_accuracy(SCORES.t(), PIDS[TXT_TO_IMG], PIDS, [(1, 1)])
    m = person_metrics(SCORES, TXT_TO_IMG, PIDS, twin_pids=[(1, 2), (3, 99)])  # (3, 99): 99 is not in the split
    assert m[TWIN_KEY] == pytest.approx(100 / 3) and "twin" in format_person_table(m)
    assert TWIN_KEY not in person_metrics(SCORES, TXT_TO_IMG, PIDS)


@pytest.mark.slow
def test_a_person_search_run_on_it_reports_twin_accuracy(people_root, tmp_path):
    run = tmp_path / "run"
    extra = ["data.format=cuhk_pedes", "data.num_workers=0", "data.min_word_freq=1", "model.name=tiny_tipcb",
             "model.pretrained=false", "train.epochs=1", "train.batch_size=8", "train.max_steps_per_epoch=1",
             "train.warmup_steps=0", "eval.batch_size=16"]  # fmt: skip
    assert main(train_args(people_root, run, *extra, config="configs/tipcb_cuhk.yaml")) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r.get("split") == "val" and "t2i_r1" in r]
    assert val and all(0 <= r[TWIN_KEY] <= 100 for r in val)  # val identities 7 and 8 are twins
