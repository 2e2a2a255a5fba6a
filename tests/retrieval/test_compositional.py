"""Compositional negatives: the exact negatives of the shapes generator, the test-split triples file, the
`ImageCaptionDataset.negatives` attribute, and `crossmatch evaluate --negatives` (SugarCrepe/ARO-style accuracy)."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

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
from tests.helpers import FixedScores, save_tiny_checkpoint

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


# ---- crossmatch evaluate --negatives -------------------------------------------------------------------------
class SignTimesLength(torch.nn.Module):
    """score(image, text) = s(image) * n(text): s = +1 for a dark image, -1 for a bright one; n = the caption's
    token count. Every triple's outcome can be worked out by hand. With `fusion`, the pair score comes from
    `score_pairs` and `similarity` returns zeros (so a scorer that used it would tie everything)."""

    def __init__(self, fusion: bool = False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))  # a parameter, for .to(device) / next(parameters())
        if fusion:
            self.score_pairs = lambda img, txt: img["s"] * txt["n"]  # (b,)

    def encode_image_features(self, batch):
        return {"s": torch.where(batch["image"].mean((1, 2, 3)) < 0, 1.0, -1.0)}  # (B,)

    def encode_text_features(self, batch):
        return {"n": batch["attention_mask"].sum(1).float()}  # (B,)

    def similarity(self, img, txt):
        if hasattr(self, "score_pairs"):
            return torch.zeros(len(img["s"]), len(txt["n"]))
        return img["s"][:, None] * txt["n"][None, :]  # (N_img, N_txt)


def _hand_made(root: Path) -> Path:
    """Two images (dark, bright) and three triples; `type` A twice, B once."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (0, 0, 0)).save(root / "images" / "dark.png")
    Image.new("RGB", (32, 32), (255, 255, 255)).save(root / "images" / "bright.png")
    triples = [
        # dark: s = +1, caption 4 words vs negative 3 words: 4 > 3, correct
        {"image": "images/dark.png", "caption": "a red circle left", "negative": "a red circle", "type": "A"},
        # bright: s = -1, -4 > -3 fails: wrong
        {"image": "images/bright.png", "caption": "a red circle left", "negative": "a red circle", "type": "A"},
        # bright (absolute path): -2 > -5, correct
        {"image": str(root / "images/bright.png"), "caption": "a square", "negative": "a blue square left of it",
         "type": "B"},
    ]  # fmt: skip
    path = root / "triples.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in triples))
    return path


@pytest.mark.parametrize("fusion", [False, True])
def test_negatives_accuracy_per_type_hand_checked(tmp_path: Path, fusion: bool) -> None:
    from crossmatch.config import load_config
    from crossmatch.data.tokenizer import CaptionTokenizer
    from crossmatch.retrieval.compositional import read_negatives
    from crossmatch.runs import evaluate_negatives

    path = _hand_made(tmp_path)
    cfg = load_config(None, [f"data.root={tmp_path}", "data.image_size=32", "model.name=tiny_vse"])
    tok = CaptionTokenizer.train(["a red circle left of a blue square it"], max_words=cfg.data.max_words)
    report = evaluate_negatives(cfg, SignTimesLength(fusion), tok, path, torch.device("cpu"))
    assert report == {
        "A": {"accuracy": 50.0, "correct": 1, "total": 2, "ties": 0},
        "B": {"accuracy": 100.0, "correct": 1, "total": 1, "ties": 0},
        "all": {"accuracy": pytest.approx(200 / 3), "correct": 2, "total": 3, "ties": 0},
    }
    # triples made in memory (e.g. the perturber's) score the same as the file's
    triples = read_negatives(path, tmp_path)
    assert evaluate_negatives(cfg, SignTimesLength(fusion), tok, triples, torch.device("cpu")) == report


def test_compositional_accuracy_ties_fail() -> None:
    from crossmatch.retrieval.compositional import compositional_accuracy

    pos, neg = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([1.0, 1.0, 0.7])
    report = compositional_accuracy(pos, neg, ["x", "x", "y"])
    assert report["x"] == {"accuracy": 50.0, "correct": 1, "total": 2, "ties": 1}  # the tie (1.0 vs 1.0) fails
    assert report["y"] == {"accuracy": 0.0, "correct": 0, "total": 1, "ties": 0}
    assert report["all"] == {"accuracy": 100 / 3, "correct": 1, "total": 3, "ties": 1}


def test_pair_scores_read_similarity_at_each_pair() -> None:
    """The batched scorer against the full matrix, with batches that split an image's pairs."""
    from crossmatch.retrieval.compositional import pair_scores

    torch.manual_seed(0)
    scores = torch.randn(5, 7)
    model = FixedScores(scores)
    pairs = torch.tensor([[4, 0], [0, 6], [2, 3], [0, 1], [4, 4], [1, 1], [2, 6]])
    got = pair_scores(model, {"idx": torch.arange(5)}, {"idx": torch.arange(7)}, pairs, batch_size=3)
    assert torch.equal(got, scores[pairs[:, 0], pairs[:, 1]])


@pytest.fixture
def tiny_ckpt(tmp_path: Path) -> Path:
    return save_tiny_checkpoint(tmp_path / "m.pt", "tiny_vse")


BAD_LINES = [
    ('{"image": "images/nope.png", "caption": "a", "negative": "b", "type": "t"}', "image images/nope.png not found"),
    ('{"image": "images/dark.png", "caption": "a cat", "negative": "  ", "type": "t"}', "empty 'negative'"),
    ('{"image": "images/dark.png", "caption": "a cat", "negative": "A  cat", "type": "t"}', "the negative equals"),
    ('{"image": "images/dark.png", "caption": "a cat", "negative": "a dog"', "not valid JSON"),
    ('{"image": "images/dark.png", "caption": "a cat", "type": "t"}', "missing key 'negative'"),
    ('["images/dark.png", "a cat", "a dog"]', "expected an object"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_bad_negatives_file_names_file_and_line(tmp_path: Path, tiny_ckpt: Path, capsys, line: str, message: str):
    from crossmatch.cli.main import main

    path = _hand_made(tmp_path)
    good = path.read_text().splitlines()
    path.write_text("\n".join([good[0], "", line, good[1]]) + "\n")  # the bad triple on line 3
    assert main(["evaluate", str(tiny_ckpt), "--negatives", str(path), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path} line 3: {message}" in err[0], err


def test_evaluate_negatives_cli_on_shapes(shapes: tuple[Path, dict], tmp_path: Path, capsys) -> None:
    """The whole command on the generator's own file: table printed, JSON written, counts those of the file."""
    from crossmatch.cli.main import main

    out, _ = shapes
    triples = [json.loads(line) for line in (out / NEGATIVES_FILE).read_text().splitlines()]
    ckpt = save_tiny_checkpoint(tmp_path / "m.pt", "tiny_vse", f"data.root={out}")
    report = tmp_path / "neg.json"
    assert main(["evaluate", str(ckpt), "--negatives", str(out / NEGATIVES_FILE), "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads(report.read_text())
    counts = Counter(t["type"] for t in triples)
    assert {k: v["total"] for k, v in doc["types"].items()} == {**counts, "all": len(triples)}
    for kind, row in doc["types"].items():
        assert row["accuracy"] == pytest.approx(100 * row["correct"] / row["total"], abs=1e-4)
        assert kind in printed


def test_box_region_model_reads_boxes_from_the_dataset(shapes: tuple[Path, dict], tmp_path: Path, capsys) -> None:
    """SCAN on box regions scores the file with each image's recorded boxes; an image the dataset does not
    know cannot be scored that way and is named with its line."""
    from crossmatch.cli.main import main

    out, _ = shapes
    ckpt = save_tiny_checkpoint(tmp_path / "scan.pt", "tiny_scan", "model.regions=boxes", f"data.root={out}")
    assert main(["evaluate", str(ckpt), "--negatives", str(out / NEGATIVES_FILE)]) == 0
    assert "all" in capsys.readouterr().out
    stranger = tmp_path / "stranger.png"
    Image.new("RGB", (32, 32)).save(stranger)
    lines = (out / NEGATIVES_FILE).read_text().splitlines()[:2]
    lines.append(json.dumps({**json.loads(lines[0]), "image": str(stranger)}))
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert main(["evaluate", str(ckpt), "--negatives", str(path)]) == 2
    assert f"{path} line 3: image {stranger} is not in the dataset" in capsys.readouterr().err


def test_negatives_survive_conversion_to_jsonl_and_back(shapes: tuple[Path, dict], tmp_path: Path) -> None:
    from crossmatch.data.datasets import karpathy_to_entries
    from crossmatch.data.jsonl import entries_to_karpathy

    _, data = shapes
    entries = karpathy_to_entries(data)
    assert entries[0]["negatives"] == [s.get("negatives", []) for s in data["images"][0]["sentences"]]
    back = entries_to_karpathy(entries)
    for old, new in zip(data["images"], back["images"], strict=True):
        assert "negatives" not in new
        assert [s.get("negatives") for s in new["sentences"]] == [s.get("negatives") for s in old["sentences"]]


def test_negatives_with_html_is_refused(tmp_path: Path, tiny_ckpt: Path, capsys) -> None:
    from crossmatch.cli.main import main

    path = _hand_made(tmp_path)
    args = ["evaluate", str(tiny_ckpt), "--negatives", str(path), "--html", str(tmp_path / "r.html")]
    assert main(args) == 2
    assert "--html" in capsys.readouterr().err
