"""scripts/people_report.py: the training-free colour floor on hand-made captions and images, its report
through the script on generated people data, and a trained run's report equal to `crossmatch evaluate`."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from crossmatch.cli.main import main as cli
from crossmatch.data.people import COLORS
from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    return load_script("people_report")


def two_colour_image(top: str, bottom: str, rows: int = 8, width: int = 4) -> np.ndarray:
    """An image whose upper half is one palette colour and whose lower half another."""
    img = np.zeros((rows, width, 3), dtype=np.uint8)
    img[: rows // 2], img[rows // 2 :] = COLORS[top][0], COLORS[bottom][0]
    return img  # (rows, width, 3)


def test_colour_words_go_to_the_region_of_their_garment_and_hair_is_skipped(script):
    caption = (
        "The person wears a crimson and white striped tee, grey pants and black sneakers. They have long brown "
        "hair. A pedestrian carries a pink backpack."
    )
    assert script.colour_mentions(caption) == [
        ("upper", "red"),  # crimson is a word for red
        ("upper", "white"),
        ("lower", "grey"),
        ("lower", "black"),
        ("whole", "pink"),
    ]


def test_colour_fractions_count_the_pixels_of_each_half(script):
    img = np.zeros((8, 4, 3), dtype=np.uint8)
    img[:4] = COLORS["red"][0]
    img[4:6] = COLORS["blue"][0]
    img[6:] = (0, 255, 255)  # cyan: farther than MAX_DISTANCE from every palette colour
    f = script.colour_fractions(img)  # (R, P)
    red, blue = script.PALETTE.index("red"), script.PALETTE.index("blue")
    expected = np.zeros((3, len(script.PALETTE)))
    expected[0, red] = 1.0  # upper half: all red
    expected[1, blue] = 0.5  # lower half: half blue, half unassigned
    expected[2, red], expected[2, blue] = 0.5, 0.25  # the whole crop
    np.testing.assert_allclose(f, expected)


def test_the_floor_tells_swapped_colours_apart(script):
    images = [two_colour_image("red", "blue"), two_colour_image("blue", "red")]
    captions = ["A person in a red top and blue trousers.", "A person in a blue top and red trousers."]
    s = script.floor_scores(images, captions)  # (2, 2)
    hit, miss = 2 * math.log(1 + script.EPS), 2 * math.log(script.EPS)
    np.testing.assert_allclose(s.numpy(), [[hit, miss], [miss, hit]], rtol=1e-12)


def test_the_floor_report_through_the_script(script, people_root, capsys):
    assert script.main(["--data", str(people_root)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scorer"] == "colour floor" and out["split"] == "test"
    assert all(0 <= out[k] <= 100 for k in ("t2i_r1", "t2i_mAP", "t2i_mINP", "i2t_r1", "t2i_twin_acc"))
    # the test split is one twin pair, of one kind, whose accuracy is the total's
    kinds = [k.removeprefix("twin_pairs_") for k in out if k.startswith("twin_pairs_")]
    assert len(kinds) == 1 and out[f"twin_pairs_{kinds[0]}"] == 1
    assert out[f"t2i_twin_acc_{kinds[0]}"] == out["t2i_twin_acc"]


@pytest.mark.slow
def test_a_run_s_report_equals_crossmatch_evaluate(script, people_root, tmp_path, capsys):
    run = tmp_path / "run"
    overrides = ["model.name=tiny_tipcb", "data.num_workers=0", "train.epochs=1", "train.max_steps_per_epoch=2",
                 "train.batch_size=8", "train.warmup_steps=0", "eval.batch_size=16"]  # fmt: skip
    args = ["train", str(ROOT / "configs" / "people_tipcb.yaml"), "--run-dir", str(run), f"data.root={people_root}",
            "data.image_size=[96,32]"]  # fmt: skip
    assert cli([*args, *overrides]) == 0
    assert cli(["evaluate", str(run), "--split", "test", "--json", str(tmp_path / "m.json")]) == 0
    capsys.readouterr()
    assert script.main(["--data", str(people_root), "--run", str(run)]) == 0
    out = json.loads(capsys.readouterr().out)
    want = json.loads((tmp_path / "m.json").read_text())
    for key in ("t2i_r1", "t2i_mAP", "t2i_mINP", "i2t_mAP", "t2i_twin_acc"):
        assert out[key] == round(want[key], 2)
