"""The everyday CLI path (issue "green on any machine, a CLI that behaves"): run folders that refuse to be
silently replaced, help that documents itself, devices, the run header, run folders as checkpoints,
split names, search outputs in both directions, and rounded metrics."""

import argparse
import json

import pytest
import torch
from PIL import Image

from crossmatch.cli.help import has_default
from crossmatch.cli.main import _parser, main
from tests.helpers import train_args


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("crossmatch: error:"), err
    return err[0]


@pytest.fixture(scope="module")
def run(shapes_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("behaviour") / "run"
    assert main(train_args(shapes_root, run, "train.epochs=1")) == 0
    return run


@pytest.mark.slow
def test_a_run_dir_with_checkpoints_is_not_silently_replaced(shapes_root, run, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    rows = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(train_args(shapes_root, run, "train.epochs=1")) == 2
    line = one_error_line(capsys)
    assert "--resume" in line and "--overwrite" in line and str(run) in line
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == before
    assert (run / "metrics.jsonl").read_text() == rows  # nothing appended


@pytest.mark.slow
def test_overwrite_starts_the_run_again(shapes_root, tmp_path):
    run = tmp_path / "run"
    assert main(train_args(shapes_root, run, "train.epochs=1")) == 0
    assert main(train_args(shapes_root, run, "train.epochs=1", "--overwrite")) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["split"], r["step"], "rsum" in r) for r in rows]
    assert len(steps) == len(set(steps))  # one run's rows, not two appended
    assert (run / "train.log").read_text().count("training tiny_vse") == 1
    with pytest.raises(SystemExit) as exit_:  # one or the other: argparse refuses the pair
        main([*train_args(shapes_root, run), "--resume", "--overwrite"])
    assert exit_.value.code == 2


def test_a_failed_start_leaves_no_run_dir(tmp_path, capsys):
    run = tmp_path / "never"
    assert main(train_args(tmp_path / "no-data", run)) == 2
    assert "dataset file not found" in one_error_line(capsys)
    assert not run.exists()


def test_version_and_models(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    from crossmatch import __version__

    assert capsys.readouterr().out.strip() == f"crossmatch {__version__}"
    assert main(["models"]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.strip().splitlines())
    from crossmatch import list_models

    assert sorted(lines) == list_models()  # every registered name, each with a description
    assert "SCAN" in lines["scan_t2i"] and "tests" in lines["tiny_vse"]
    assert main(["models", "albef"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == ["albef_minilm", "albef_small", "tiny_albef"]


def commands(parser: argparse.ArgumentParser, prefix=()):
    """Every leaf command parser, by its words: ('train',), ('data', 'shapes'), ('index', 'build'), ..."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                has_sub = any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
                yield from commands(sub, (*prefix, name)) if has_sub else [((*prefix, name), sub)]


def test_every_command_documents_its_options_defaults_and_two_examples():
    found = dict(commands(_parser()))
    assert {("train",), ("evaluate",), ("search",), ("models",), ("demo",), ("data", "shapes")} <= set(found)
    for words, sub in found.items():
        text = sub.format_help()
        example_lines = [ln for ln in text.split("examples:")[-1].splitlines() if "crossmatch" in ln]
        assert "examples:" in text and len(example_lines) >= 2, words
        for action in sub._actions:
            if action.help in (None, argparse.SUPPRESS) or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (words, action.dest)  # every argument says what it is
            if action.option_strings and has_default(action):  # 0 included (0 == False)
                assert "(default:" in sub._get_formatter()._format_action(action), (words, action.dest)


def test_an_unavailable_device_is_one_line(shapes_root, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(train_args(shapes_root, tmp_path / "r", "--device", "cuda")) == 2
    assert "no CUDA device" in one_error_line(capsys)
    assert main(train_args(shapes_root, tmp_path / "r", "train.device=tpu")) == 2
    assert "choose auto, cpu, cuda or cuda:N" in one_error_line(capsys)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_the_run_header_says_what_the_run_is(run):
    log = (run / "train.log").read_text()
    assert "device cpu (world size 1)" in log and "CPU threads" in log
    n_params = sum(p.numel() for p in __import__("crossmatch").load(run / "checkpoints" / "best.pt").parameters())
    assert f"model tiny_vse: {n_params:,} parameters, {n_params:,} trainable" in log
    assert "train 40 images / 200 captions, val 12 images / 60 captions, test 12 images / 60 captions" in log
    assert "preprocessing: RGB, squash resize to 32x32 (bilinear), mean (0.485, 0.456, 0.406)" in log


@pytest.mark.slow
def test_evaluate_takes_a_run_dir_and_writes_rounded_metrics(run, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["evaluate", str(run), "--json", str(a), "--device", "cpu"]) == 0
    assert main(["evaluate", str(run / "checkpoints" / "best.pt"), "--json", str(b)]) == 0
    metrics = json.loads(a.read_text())
    assert metrics == json.loads(b.read_text())
    assert all(round(v, 4) == v for v in metrics.values())  # 4 decimals, no 28.999999999999996


@pytest.mark.slow
def test_an_unknown_split_lists_the_splits_that_exist(run, capsys):
    assert main(["evaluate", str(run), "--split", "tst"]) == 2
    assert "its splits: test, train, val" in one_error_line(capsys)


@pytest.mark.slow
def test_search_outputs_are_checked_first_and_written_in_both_directions(shapes_root, run, tmp_path, capsys):
    best = str(run / "checkpoints" / "best.pt")
    for bad, culprit in (
        (["--query", "a circle", "--out", str(tmp_path / "x.txt")], ".png"),
        (["--query", "a circle", "--top-k", "0"], "--top-k 0"),
        (["--query", "   "], "the query is empty"),
        (["--query", "zzz qqq"], "no word of the query"),
    ):
        assert main(["search", best, *bad]) == 2, bad
        assert culprit in one_error_line(capsys), bad
    assert not (tmp_path / "x.txt").exists()
    from crossmatch.data.datasets import ImageCaptionDataset

    image = ImageCaptionDataset(shapes_root, "test").images[0].path  # a split image: its captions are matches
    for out in (tmp_path / "caps.html", tmp_path / "caps.png"):
        assert main(["search", best, "--image", str(image), "--top-k", "3", "--out", str(out)]) == 0
        assert out.is_file() and out.stat().st_size > 0
    page = (tmp_path / "caps.html").read_text()
    assert page.count("<li") == 3 and "data:image/png;base64" in page
    assert Image.open(tmp_path / "caps.png").size[1] >= 128  # the query image and its captions


def test_gallery_labels_file_names_and_a_match_outside_the_top_k(tmp_path):
    from crossmatch.search.gallery import draw_gallery

    pics = [torch.full((3, 8, 8), 40 * k, dtype=torch.uint8) for k in range(3)]
    plain = draw_gallery("q", pics, [0.3, 0.2, 0.1], [False] * 3, tmp_path / "a.png", names=["a.png", "b", "c"])
    marked = draw_gallery(
        "q", pics, [0.3, 0.2, 0.1], [False] * 3, tmp_path / "b.png", names=["a.png", "b", "c"], match_rank=("x", 7)
    )
    assert Image.open(marked).size[1] == Image.open(plain).size[1] + 14  # one more header line: the true match


def test_html_summary_sentence(tmp_path):
    from crossmatch.search.report import write_html_report

    rows = [[("a.png", 0.5, True)], [("b.png", 0.4, False)]]
    page = write_html_report(tmp_path / "r.html", ["q1", "q2"], rows, [1, 4], metrics={"rsum": 123.456}).read_text()
    assert "true match at rank 1 for 1 of 2, median rank 2.5" in page and "123.46" in page
