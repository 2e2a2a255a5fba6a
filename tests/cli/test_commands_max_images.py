"""`crossmatch evaluate --max-images N`: retrieval on the split's first N images and their captions."""

import json

import pytest
import torch

from crossmatch.cli.main import main
from crossmatch.metrics import retrieval_metrics
from crossmatch.runs import load_run, make_evaluator
from tests.helpers import save_tiny_checkpoint


@pytest.fixture(scope="module")
def vse_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("vse") / "vse.pt", "tiny_vse")


def test_max_images_scores_the_first_images_block_of_the_whole_split(vse_checkpoint, shapes_root, tmp_path):
    """The test split has 12 images x 5 captions; the first 4 images own the first 20 captions, so the subset's
    metrics are those of the (4, 20) top-left block of the whole split's score matrix."""
    out = tmp_path / "sub.json"
    args = ["evaluate", str(vse_checkpoint), "--max-images", "4", "--json", str(out), f"data.root={shapes_root}"]
    assert main(args) == 0
    got = json.loads(out.read_text())

    model, cfg, tok = load_run(str(vse_checkpoint), [f"data.root={shapes_root}"])
    full = make_evaluator(cfg, "test", tok, model, torch.device("cpu"))
    _, scores = full.evaluate(model)  # (12, 60)
    assert scores.shape == (12, 60)  # the cut is real: the whole split is 3x the subset
    expected = retrieval_metrics(scores[:4, :20], torch.arange(4).repeat_interleave(5))
    assert got["i2t_r1"] == pytest.approx(expected["i2t_r1"], abs=1e-3)  # the JSON rounds to 4 decimals
    assert got["t2i_r1"] == pytest.approx(expected["t2i_r1"], abs=1e-3)
    assert got["rsum"] == pytest.approx(expected["rsum"], abs=1e-3)
    assert got["t2i_meanr"] <= 4 and got["i2t_meanr"] <= 20  # ranks among 4 images / 20 captions, not 12 / 60


def test_negative_max_images_is_a_one_line_error(vse_checkpoint, shapes_root, capsys):
    assert main(["evaluate", str(vse_checkpoint), "--max-images", "-1", f"data.root={shapes_root}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "crossmatch: error: --max-images must be >= 0 (0: the whole split), got -1"


def test_max_images_with_negatives_is_refused(vse_checkpoint, shapes_root, capsys):
    negatives = str(shapes_root / "test_negatives.jsonl")
    assert main(["evaluate", str(vse_checkpoint), "--max-images", "4", "--negatives", negatives]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "crossmatch: error: --max-images cuts a retrieval split; --negatives scores every triple of its file"
    )
