"""The command line end to end on a tiny dataset: data -> train -> evaluate -> search, and clean errors."""

import json
import subprocess
import sys

import pytest

from crossmatch.cli.main import main
from tests.helpers import train_args

KEYS = "i2t_r1 i2t_r5 i2t_r10 i2t_medr i2t_meanr t2i_r1 t2i_r5 t2i_r10 t2i_medr t2i_meanr rsum".split()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    root = tmp / "data"
    assert (
        main(["data", "shapes", "--out", str(root), "--train", "30", "--val", "10", "--test", "10", "--size", "32"])
        == 0
    )
    assert main(train_args(root, tmp / "run")) == 0
    return root, tmp / "run"


@pytest.mark.slow
def test_train_writes_the_run_folder(trained):
    _, run = trained
    for name in (
        "config.yaml",
        "tokenizer.json",
        "train.log",
        "metrics.jsonl",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "curves.png",
    ):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]  # the rest is opt-in
    assert {p.name for p in (run / "tb").iterdir()} == {"train", "val"}  # one writer per split, same tags
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows} == {"train", "val"}
    assert "val rsum=" in (run / "train.log").read_text()


@pytest.mark.slow
def test_train_and_val_loss_share_a_tensorboard_chart(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run = trained
    tags = {}
    for split in ("train", "val"):
        acc = EventAccumulator(str(run / "tb" / split))
        acc.Reload()
        tags[split] = set(acc.Tags()["scalars"])
    shared = tags["train"] & tags["val"]
    assert {"loss", "triplet_loss"} <= shared  # the same tags: one chart holds both curves
    assert {"train/lr", "train/grad_norm"} <= tags["train"] and {"retrieval/rsum", "retrieval/i2t_r1"} <= tags["val"]
    assert shared == {"loss", "triplet_loss"}  # nothing else collides
    acc = EventAccumulator(str(run / "tb" / "val"))
    acc.Reload()
    val_loss = [e.value for e in acc.Scalars("loss")]
    assert len(val_loss) == 2 and all(v > 0 for v in val_loss)  # one per validated epoch
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val_rows = [r for r in rows if r["split"] == "val" and "loss" in r]
    assert [r["loss"] for r in val_rows] == pytest.approx(val_loss)
    assert all(r["triplet_loss"] == pytest.approx(r["loss"]) for r in val_rows)  # the only term of the sum


@pytest.mark.slow
def test_evaluate_prints_a_table_and_writes_the_metrics(trained, tmp_path, capsys):
    _, run = trained
    out = tmp_path / "m.json"
    assert main(["evaluate", str(run / "checkpoints" / "best.pt"), "--split", "test", "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert KEYS == [k for k in metrics if k != "twin_acc"] and "twin_acc" in metrics
    assert metrics["rsum"] == pytest.approx(sum(metrics[k] for k in KEYS if "_r" in k and "medr" not in k))
    printed = capsys.readouterr().out
    assert "R@1" in printed and f"rsum {metrics['rsum']:.2f}" in printed


@pytest.mark.slow
def test_search_both_directions_and_gallery(trained, tmp_path, capsys):
    root, run = trained
    caption = json.loads((root / "dataset.json").read_text())["images"][-1]["sentences"][0]["raw"]
    gallery = tmp_path / "g.png"
    assert (
        main(
            ["search", str(run / "checkpoints" / "best.pt"), "--query", caption, "--top-k", "4", "--out", str(gallery)]
        )
        == 0
    )
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()[:1].isdigit()]
    assert len(lines) == 4
    from PIL import Image

    assert Image.open(gallery).size[0] > 4 * 128
    image = sorted((root / "images").iterdir())[0]
    assert main(["search", str(run / "checkpoints" / "best.pt"), "--image", str(image), "--top-k", "3"]) == 0
    assert len([ln for ln in capsys.readouterr().out.splitlines() if ln.strip()[:1].isdigit()]) == 3


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, culprit",
    [
        (["train.lrr=1"], "train.lrr"),
        (["model.name=nope"], "unknown model 'nope'"),
        (["model.embed_dimm=3"], "model.embed_dimm"),
        (["data.root=/does/not/exist"], "dataset file not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(trained, tmp_path, capsys, args, culprit):
    root, _ = trained
    assert main(train_args(root, tmp_path / "bad", *args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("crossmatch: error:") and culprit in err[0]


def test_bad_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["evaluate", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x.pt" in err[0]


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "crossmatch", "--help"], capture_output=True, text=True, check=True)
    assert all(cmd in out.stdout for cmd in ("data", "train", "evaluate", "search", "demo"))


@pytest.mark.slow
def test_html_reports_from_evaluate_and_search(trained, tmp_path):
    root, run = trained
    best = str(run / "checkpoints" / "best.pt")
    assert main(["evaluate", best, "--html", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64") >= 5 and "<html" in page.lower()
    caption = json.loads((root / "dataset.json").read_text())["images"][-1]["sentences"][0]["raw"]
    assert main(["search", best, "--query", caption, "--top-k", "3", "--out", str(tmp_path / "s.html")]) == 0
    assert caption in (tmp_path / "s.html").read_text()


@pytest.mark.slow
def test_search_reranks_with_a_fusion_model(trained, tmp_path, capsys):
    root, _ = trained
    run = tmp_path / "albef"
    assert main(train_args(root, run, "model.name=tiny_albef", "train.epochs=1", "eval.rerank_k=3")) == 0
    capsys.readouterr()
    assert main(["search", str(run / "checkpoints" / "best.pt"), "--query", "a red circle", "--top-k", "5"]) == 0
    scores = [float(ln.split()[1]) for ln in capsys.readouterr().out.splitlines() if ln.strip()[:1].isdigit()]
    # the top 3 are re-scored by ITM; ranks 4-5 follow in stage-1 order, below every re-scored image
    assert len(scores) == 5 and scores == sorted(scores, reverse=True) and max(scores[3:]) < min(scores[:3])


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(shapes_root, tmp_path, capsys):
    run = tmp_path / "demo"
    small = ["data.image_size=32", "train.epochs=1", "train.batch_size=8", "train.max_steps_per_epoch=3"]
    assert main(["demo", "--data", str(shapes_root), "--run-dir", str(run), "--time", *small]) == 0
    out = capsys.readouterr().out
    assert all(f"[{k}/6]" in out for k in range(1, 7)) and "<- match" in out
    for phase in ("data", "train", "evaluate", "search", "curves", "total"):  # --time: one row each
        assert any(line.startswith(phase) for line in out.splitlines()), phase
    assert f"tensorboard --logdir {run / 'tb'}" in out
    png = (run / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and str(run / "curves.png") in out
    page = (run / "report.html").read_text()
    assert '<table class="metrics">' in page and "<th>rsum</th>" in page and str(run / "report.html") in out
    metrics = json.loads((run / "test_metrics.json").read_text())
    # the demo's table is what `crossmatch evaluate` reports for its best checkpoint on the test split
    again = run / "again.json"
    assert main(["evaluate", str(run), "--split", "test", "--json", str(again)]) == 0
    assert metrics == json.loads(again.read_text()) and "twin_acc" in metrics
    assert (run / "gallery.png").stat().st_size > 0 and (run / "checkpoints" / "best.pt").is_file()
