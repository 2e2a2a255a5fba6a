"""A run folder, and an index, moved elsewhere keep working: the dataset is found from the run folder, index files
store paths relative to the index. Also what `crossmatch train` prints and keeps (the summary, curves.png, last.pt
and a weights-only best.pt) and where scalars go (`train.loggers`)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

import crossmatch
from crossmatch.cli.main import main
from crossmatch.engine.checkpoint import atomic_save, load_checkpoint
from tests import helpers


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.slow
def test_a_moved_run_evaluates_searches_exports_and_loads_from_another_folder(
    shapes_root, tmp_path, monkeypatch, capsys
):
    project = tmp_path / "project"
    shutil.copytree(shapes_root, project / "data")
    monkeypatch.chdir(project)  # trained as a user does: relative paths from the project folder
    args = ["train", str(helpers.ROOT / "configs/vse_shapes.yaml"), "--run-dir", "runs/r"]
    assert main([*args, *helpers.tiny_overrides("data")]) == 0
    out = capsys.readouterr().out
    # the summary: best and last validation rows, the files, the folder's size, the next commands
    lines = out.splitlines()
    assert lines[0] == "trained tiny_vse for 2 epoch(s) into runs/r"
    history = load_checkpoint(Path("runs/r/checkpoints/last.pt"))["trainer"]["history"]
    best = max(history, key=lambda r: r["rsum"])
    assert f"best val  epoch {best['epoch']}: rsum {best['rsum']:.2f}, i2t_r1 {best['i2t_r1']:.2f}" in out
    if best is not history[-1]:
        assert f"last val  epoch 2: rsum {history[-1]['rsum']:.2f}" in out
    size = sum(p.stat().st_size for p in Path("runs/r").rglob("*") if p.is_file()) / 2**20
    assert f"what the run wrote ({size:.1f} MB in runs/r):" in out
    for shown in ("runs/r/checkpoints/best.pt", "runs/r/curves.png", "runs/r/train.log", "runs/r/tb"):
        assert shown in out, shown
    assert "crossmatch evaluate runs/r --split test" in out and "tensorboard --logdir runs/r/tb" in out
    assert Path("runs/r/curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # disk: last.pt has the full state for --resume, best.pt the weights and what rebuilds the model
    assert sorted(p.name for p in Path("runs/r/checkpoints").iterdir()) == ["best.pt", "last.pt"]
    best_pt = load_checkpoint(Path("runs/r/checkpoints/best.pt"))
    assert "optimizer" not in best_pt and best_pt["data_root_from_run"] == "../../data"
    assert "optimizer" in load_checkpoint(Path("runs/r/checkpoints/last.pt"))

    shutil.move(project, tmp_path / "moved")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # "data" relative to here does not exist: found from the run folder
    run = str(tmp_path / "moved" / "runs" / "r")
    assert main(["evaluate", run, "--split", "test"]) == 0
    assert f"on {tmp_path / 'moved' / 'data'} [test]" in capsys.readouterr().out
    assert main(["search", run, "--query", "a red circle", "--top-k", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) >= 3  # three ranked test images of the moved dataset
    model = crossmatch.load(run)
    assert Path(model.run_config.data.root) == tmp_path / "moved" / "data"
    if importlib.util.find_spec("onnxruntime") is not None:
        assert main(["export", run, "--onnx", "onnx", "--no-verify"]) == 0
        assert (elsewhere / "onnx" / "image_encoder.onnx").is_file()


def test_a_run_whose_dataset_is_nowhere_names_the_paths_tried_and_the_override(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    ckpt = helpers.save_tiny_checkpoint(run / "checkpoints" / "best.pt", "tiny_vse", "data.root=gone/shapes")
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", str(run)]) == 2
    line = error_line(capsys)
    assert line == (
        f"crossmatch: error: dataset of run {run} not found (tried gone/shapes, {run / 'gone' / 'shapes'}); "
        "pass data.root=PATH"
    )
    state = load_checkpoint(ckpt)
    atomic_save({**state, "data_root_from_run": "../../shapes"}, ckpt)  # where training saw it, from the run
    assert main(["search", str(run), "--query", "a red circle"]) == 2
    assert f"(tried gone/shapes, {tmp_path.parent / 'shapes'}, {run / 'gone' / 'shapes'})" in error_line(capsys)
    assert crossmatch.load(str(run)).run_config.data.root == "gone/shapes"  # loading needs no data


def test_the_data_root_override_wins_over_the_stored_path(shapes_root, tmp_path, capsys):
    run = tmp_path / "run"
    helpers.save_tiny_checkpoint(run / "checkpoints" / "best.pt", "tiny_vse", "data.root=gone/shapes")
    assert main(["evaluate", str(run), f"data.root={shapes_root}"]) == 0
    assert f"on {shapes_root} [test]" in capsys.readouterr().out


def test_a_moved_index_finds_its_images_and_checkpoint_and_prints_relative_paths(
    shapes_root, tmp_path, monkeypatch, capsys
):
    a = tmp_path / "a"
    shutil.copytree(shapes_root / "images", a / "photos", ignore=lambda d, names: sorted(names)[5:])
    helpers.save_tiny_checkpoint(a / "m.pt", "tiny_vse")
    monkeypatch.chdir(a)
    assert main(["index", "build", "m.pt", "photos", "--out", "idx"]) == 0
    built = capsys.readouterr().out
    assert (
        built.startswith("indexed 5 images (E=16, tiny_vse, float32) into idx")
        and "next: crossmatch index query idx" in built
    )
    meta = json.loads(Path("idx/meta.json").read_text())
    assert (meta["image_dir"], meta["checkpoint"]) == ("../photos", "../m.pt")
    shutil.move(a, tmp_path / "b")
    monkeypatch.chdir(tmp_path / "b")
    assert main(["index", "query", "idx", "--query", "a red circle", "--top-k", "5"]) == 0
    shown = sorted(line.split()[-1] for line in capsys.readouterr().out.splitlines())
    assert shown == sorted(f"photos/{p.name}" for p in Path("photos").iterdir())  # relative to here, as given
    assert main(["index", "query", "idx", "--query", "a red circle", "--top-k", "1", "--absolute-paths"]) == 0
    assert capsys.readouterr().out.split()[-1].startswith(str(tmp_path / "b" / "photos"))
    assert main(["index", "build", "m.pt", "photos", "--out", "abs_idx", "--absolute-paths"]) == 0
    assert json.loads(Path("abs_idx/meta.json").read_text())["image_dir"] == str(tmp_path / "b" / "photos")


def test_a_logger_name_that_does_not_exist_is_a_one_line_error(shapes_root, tmp_path, capsys):
    assert main(helpers.train_args(shapes_root, tmp_path / "run", "train.loggers=[tensorboard,mlflow]")) == 2
    assert "train.loggers=['tensorboard', 'mlflow']: each must be one of tensorboard, jsonl, wandb" in error_line(
        capsys
    )
    assert not (tmp_path / "run").exists()


def test_wandb_offline_records_the_logged_scalars(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from crossmatch.engine.logging import MetricLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = MetricLogger(tmp_path, loggers=["jsonl", "wandb"], config={"model": {"name": "tiny_vse"}})
    logger.log({"loss": 1.5}, step=3)
    logger.log({"rsum": 42.0}, step=3, split="val", epoch=1)
    assert logger._wandb.name == tmp_path.name  # the wandb run is named after the run folder
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"split": "train", "step": 3, "loss": 1.5}, {"split": "val", "step": 3, "epoch": 1, "rsum": 42.0}]
    assert not (tmp_path / "tb").exists()  # tensorboard was not asked for
    (record,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")  # written locally, for `wandb sync`
    deadline = time.monotonic() + 30  # wandb's service process may still be flushing the record after finish()
    while not (b"train/loss" in record.read_bytes() and b"val/rsum" in record.read_bytes()):
        assert time.monotonic() < deadline, "the offline wandb record never got the logged keys"
        time.sleep(0.2)


@pytest.mark.slow
def test_best_pt_of_a_resumed_run_is_still_what_evaluate_reads(shapes_root, tmp_path):
    """--resume from last.pt (full state) keeps best.pt weights-only, and best.pt loads as before."""
    from crossmatch.runs import train

    cfg = helpers.tiny_cfg(shapes_root, "train.epochs=1")
    train(cfg, tmp_path / "run")
    train(helpers.tiny_cfg(shapes_root, "train.epochs=2"), tmp_path / "run", resume=True)
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert sorted(best) == ["config", "data_root_from_run", "loss", "model", "tokenizer", "trainer"]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["trainer"]["epoch"] == 2
    model = crossmatch.load(str(tmp_path / "run"))
    assert all(torch.equal(v, best["model"][k]) for k, v in model.state_dict().items())


def test_a_relative_image_dir_inside_the_dataset_moves_with_it(tmp_path, monkeypatch):
    from crossmatch.config import load_config
    from crossmatch.runs import locate_data_root

    (tmp_path / "moved" / "data" / "coco" / "images").mkdir(parents=True)
    run = tmp_path / "moved" / "runs" / "r"
    monkeypatch.chdir(tmp_path)  # neither data/coco nor run/data/coco exists from here
    cfg = load_config(None, ["data.root=data/coco", "data.image_dir=data/coco/images"])
    found = locate_data_root(cfg, run, "../../data/coco", required=True).data
    coco = tmp_path / "moved" / "data" / "coco"  # found through the path recorded from the run folder
    assert (found.root, found.image_dir) == (str(coco), str(coco / "images"))
