"""Compositional negatives: the exact negatives of the shapes generator, the test-split triples file, the
`ImageCaptionDataset.negatives` attribute, and `crossmatch evaluate --negatives` (SugarCrepe/ARO-style accuracy)."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from crossmatch.data.datasets import ImageCaptionDataset
from crossmatch.data.shapes import (
    COLORS,
    NEGATIVE_TYPES,
    NEGATIVES_FILE,
    SHAPE_WORDS,
    SIZE_WORDS,
    generate_shapes,
    relations,
)

SIZE = 64
SHAPE_OF = {w: k for k, words in SHAPE_WORDS.items() for w in words}
COLOR_OF = {w: k for k, (_, words) in COLORS.items() for w in words}
SIZE_OF = {w: k for k, words in SIZE_WORDS.items() for w in words}
REL_OF = {"left": "left", "right": "right", "above": "above", "over": "above", "higher": "above", "below": "below",
          "under": "below", "beneath": "below", "lower": "below"}  # fmt: skip


def true_of_scene(raw: str, img: dict) -> bool:
    """An independent reading of a shapes caption (from its words, not the generator's structures): it is true
    of the image entry when it names exactly the scene's objects (shape, colour, and size at the first mention)
    and every relation word holds between the nearest mention before and after it."""
    tok = raw.lower().replace(",", "").replace(":", "").split()
    by_name = {(o["shape"], o["color"]): (o, box) for o, box in zip(img["objects"], img["boxes"], strict=True)}
    mentions = [(k, (SHAPE_OF[t], COLOR_OF.get(tok[k - 1]))) for k, t in enumerate(tok) if t in SHAPE_OF]
    named = [name for _, name in mentions]
    if set(named) != set(by_name):
        return False
    firsts = {}
    for k, name in mentions:
        firsts.setdefault(name, k)
    for name, k in firsts.items():
        if SIZE_OF.get(tok[k - 2]) != by_name[name][0]["size"]:
            return False
    for k, t in enumerate(tok):
        if t not in REL_OF:
            continue
        subj = max((m for m in mentions if m[0] < k), key=lambda m: m[0])[1]
        obj = min((m for m in mentions if m[0] > k), key=lambda m: m[0])[1]
        if REL_OF[t] not in relations(by_name[subj][1], by_name[obj][1], SIZE):
            return False
    return True


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes_neg")
    path = generate_shapes(out, 24, 12, 16, seed=5, size=SIZE, workers=1)
    return out, json.loads(path.read_text())


def test_reader_of_captions_on_hand_written_cases() -> None:
    """The test's own reader, checked on a hand-made scene before it judges the generator."""
    circle = {"shape": "circle", "color": "red", "size": "small"}
    square = {"shape": "square", "color": "blue", "size": "large"}
    img = {"objects": [circle, square], "boxes": [[4, 20, 20, 36], [40, 22, 60, 42]]}  # circle 38 px left of square
    assert true_of_scene("a small red circle left of a large blue square", img)
    assert true_of_scene("a big cobalt box is to the right of a tiny crimson disc", img)
    assert not true_of_scene("a small blue circle left of a large red square", img)  # swap_attributes
    assert not true_of_scene("a large blue square left of a small red circle", img)  # swap_relation
    assert not true_of_scene("a small red circle right of a large blue square", img)  # flip_relation
    assert not true_of_scene("a small red circle left of a small blue square", img)  # replace_attribute (size)
    assert not true_of_scene("a small green circle left of a large blue square", img)  # replace_attribute (colour)


def test_exact_negatives_are_false_of_their_scene_and_never_the_caption(shapes: tuple[Path, dict]) -> None:
    _, data = shapes
    kinds, checked = Counter(), 0
    for img in data["images"]:
        for sent in img["sentences"]:
            assert true_of_scene(sent["raw"], img), sent["raw"]  # the reader agrees the caption is true
            negs = sent.get("negatives", [])
            assert len({n["raw"] for n in negs}) == len(negs)  # no duplicates
            assert len({n["type"] for n in negs}) == len(negs)  # at most one per type
            for neg in negs:
                assert neg["type"] in NEGATIVE_TYPES
                assert neg["raw"] != sent["raw"]
                assert not true_of_scene(neg["raw"], img), (sent["raw"], neg)
                if neg["type"] in ("swap_attributes", "swap_relation"):  # swaps keep the words: only binding changes
                    assert set(re.findall(r"[a-z]+", neg["raw"])) == set(sent["tokens"]), (sent["raw"], neg)
                kinds[neg["type"]] += 1
                checked += 1
    assert set(kinds) == set(NEGATIVE_TYPES) and checked > 200
    one_object = [s for img in data["images"] if len(img["objects"]) == 1 for s in img["sentences"]]
    for sent in one_object:  # no relation, no second object: only an attribute can be replaced
        assert [n["type"] for n in sent.get("negatives", [])] == ["replace_attribute"]


def test_negatives_do_not_change_the_rest_of_the_dataset(shapes: tuple[Path, dict], tmp_path: Path) -> None:
    """Negatives draw from their own generators: the captions are those of the dataset without them (the
    caption sampler is unchanged), and a second run writes the same bytes."""
    out, data = shapes
    again = generate_shapes(tmp_path / "again", 24, 12, 16, seed=5, size=SIZE, workers=2)
    assert again.read_bytes() == (out / "dataset.json").read_bytes()
    assert (tmp_path / "again" / NEGATIVES_FILE).read_bytes() == (out / NEGATIVES_FILE).read_bytes()


def test_shapes_writes_a_triples_file_consistent_with_the_json(shapes: tuple[Path, dict]) -> None:
    out, data = shapes
    lines = (out / NEGATIVES_FILE).read_text().splitlines()
    triples = [json.loads(line) for line in lines]
    expected = [
        (f"images/{img['filename']}", s["raw"], n["raw"], n["type"])
        for img in data["images"]
        if img["split"] == "test"
        for s in img["sentences"]
        for n in s.get("negatives", [])
    ]
    assert [(t["image"], t["caption"], t["negative"], t["type"]) for t in triples] == expected
    assert all(set(t) == {"image", "caption", "negative", "type"} for t in triples)
    assert all((out / t["image"]).is_file() for t in triples)
    test_ids = {img["filename"] for img in data["images"] if img["split"] == "test"}
    assert {t["image"].removeprefix("images/") for t in triples} == test_ids
    assert len(triples) >= 3 * 5 * len(test_ids)  # most captions have 3-4 negatives


def test_dataset_exposes_negatives_per_caption(shapes: tuple[Path, dict]) -> None:
    out, data = shapes
    ds = ImageCaptionDataset(out, "test")
    entries = [img for img in data["images"] if img["split"] == "test"]
    assert ds.negatives == [s.get("negatives", []) for img in entries for s in img["sentences"]]
    assert len(ds.negatives) == len(ds.captions)
    assert ds.first_images(2).negatives == ds.negatives[: len(ds.first_images(2).captions)]


def test_dataset_without_negatives_has_empty_lists(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"")
    sents = [{"raw": "a cat"}, {"raw": "a dog", "negatives": [{"raw": "a god", "type": "replace_attribute"}]}]
    images = [{"filename": "a.png", "imgid": 0, "split": "test", "sentences": sents}]
    (tmp_path / "dataset.json").write_text(json.dumps({"images": images}))
    ds = ImageCaptionDataset(tmp_path, "test")
    assert ds.negatives == [[], [{"raw": "a god", "type": "replace_attribute"}]]
    images[0]["sentences"] = [{"raw": "a cat"}]
    (tmp_path / "dataset.json").write_text(json.dumps({"images": images}))
    assert ImageCaptionDataset(tmp_path, "test").negatives == [[]]
