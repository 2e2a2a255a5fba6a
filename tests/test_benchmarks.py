"""The benchmark scripts run against the current library (they are not timed here: only that each one runs
end to end on tiny inputs and prints its figures). A refactor of the Trainer once broke
benchmarks/train_throughput.py without any test noticing."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module, to test its functions directly."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args: str, timeout: int = 300) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
def test_train_throughput_runs_every_section_on_a_tiny_recipe(shapes_root):
    out = run_script(
        "benchmarks/train_throughput.py",
        "--recipes",
        "tiny_vse",
        "--steps",
        "1",
        "--repeats",
        "1",
        "--workers",
        "0",
        "--validation",
        "--data",
        str(shapes_root),
        "--threads",
        "1",
    )
    assert "Trainer / bare =" in out
    assert "0 workers:" in out and "waiting for data" in out
    assert "validation" in out and "% of a" in out


@pytest.mark.slow
def test_scan_scoring_runs_on_small_inputs():
    out = run_script("benchmarks/scan_scoring.py", "--n-img", "4", "--n-txt", "10", "--batch", "8", "--repeats", "1")
    assert "scan_similarity t2i" in out and "x GEMM" in out


def test_binding_probe_scores_own_conjunctions_against_the_twins_only():
    import torch

    probe = load_benchmark("frozen_binding_probe")
    images = [  # a twin pair with swapped colours, and a second pair with the same conjunctions (left out)
        {"objects": [{"color": "red", "shape": "disc"}, {"color": "blue", "shape": "star"}]},
        {"objects": [{"color": "blue", "shape": "disc"}, {"color": "red", "shape": "star"}]},
        {"objects": [{"color": "red", "shape": "disc"}]},
        {"objects": [{"color": "red", "shape": "disc"}]},
    ]
    y, col = probe.conjunctions(images)
    assert y.shape == (4, 4) and y[0, col[("red", "disc")]] == y[0, col[("blue", "star")]] == 1 and y[0].sum() == 2
    scores = torch.zeros(4, 4)
    scores[0, col[("red", "disc")]], scores[0, col[("blue", "star")]] = 2.0, 0.0  # own mean 1.0
    scores[0, col[("blue", "disc")]], scores[0, col[("red", "star")]] = 0.5, 1.0  # twin's mean 0.75: a win
    scores[1, col[("blue", "disc")]] = 1.0  # image 1's own mean 0.5 < its twin's (image 0's) 1.0: a loss
    scores[1, col[("red", "disc")]], scores[1, col[("blue", "star")]] = 1.0, 1.0
    assert probe.binding_accuracy(scores, y, [(0, 1), (1, 0), (2, 3)]) == (0.5, 2)


def test_binding_probe_cell_readout_localises_and_orders_objects():
    import torch

    probe = load_benchmark("frozen_binding_probe")
    a, b = {"color": "red", "shape": "disc"}, {"color": "blue", "shape": "star"}
    top_left, bottom_right = [0, 0, 16, 16], [40, 40, 56, 56]  # centres (8, 8) and (48, 48) on a 64 px canvas
    images = [
        {"objects": [a, b], "boxes": [top_left, bottom_right]},
        {"objects": [a, b], "boxes": [bottom_right, top_left]},
    ]
    _, col = probe.conjunctions(images)
    xy, mask = probe.centres(images, col, 64.0)
    ra, rb = col[("red", "disc")], col[("blue", "star")]  # of 2 colours x 2 shapes = 4 columns, 2 present
    assert xy[0, ra].tolist() == [0.125, 0.125] and xy[0, rb].tolist() == [0.75, 0.75] and mask.sum() == 4
    y = probe.cell_targets(xy, mask, 2, 2)  # (2 images, 4 cells, 2 conjunctions), cells row-major
    assert y[0, 0, ra] == y[0, 3, rb] == y[1, 3, ra] == y[1, 0, rb] == 1 and y.sum() == 4
    # the soft centre of a conjunction scored far higher in one cell is that cell's centre
    assert torch.allclose(probe.soft_centres(100.0 * y, 2, 2)[0, [ra, rb]], torch.tensor([[0.25, 0.25], [0.75, 0.75]]))
    scores = y.clone()
    scores[1] = y[0]  # image 1 read as image 0: both of its objects in the wrong cell
    assert probe.localisation_accuracy(scores, y) == (0.5, 4)
    # per image: red left of / above blue, blue right of / below red (4 relations); image 1 the other way round
    assert probe.relation_accuracy(xy, images, col, 64.0) == (1.0, 8)
    assert probe.relation_accuracy(xy[[0, 0]], images, col, 64.0) == (0.5, 8)
    assert probe.position_twin_accuracy(xy, xy, mask, [(0, 1)]) == (1.0, 2)  # each image nearer its own centres
    assert probe.position_twin_accuracy(xy[[1, 0]], xy, mask, [(0, 1)]) == (0.0, 2)


@pytest.mark.slow
def test_frozen_binding_probe_runs_on_the_tiny_split(shapes_root):
    out = run_script("benchmarks/frozen_binding_probe.py", "--data", str(shapes_root), "--sizes", "64")
    assert "twin pairs; load" in out
    assert "size 64 fmap (1280, 2, 2) mean: binding accuracy" in out and "grid: binding accuracy" in out
    assert "cell: localisation accuracy" in out and "relation accuracy" in out and "position-twin accuracy" in out


def test_rerank_scores_are_the_hand_computed_combinations():
    import math

    import torch

    bench = load_benchmark("rerank_scores")
    logits, cos = torch.tensor([[0.0, 1.0], [2.0, 0.0]]), torch.tensor([0.5, -0.25])
    got = bench.stage2_scores(logits, cos, temp=0.25)
    assert got["itm"].tolist() == [1.0, 0.0] and got["itm+cos"].tolist() == [1.5, -0.25]
    logp = [1 - math.log(1 + math.e), -math.log(1 + math.e**2)]  # log p(match) of each row
    assert torch.allclose(got["logp+cos/t"], torch.tensor([logp[0] + 2.0, logp[1] - 1.0]))
    assert got["diff+cos/t"].tolist() == [3.0, -3.0]


@pytest.mark.slow
def test_rerank_scores_itc_and_itm_rows_are_the_evaluators_stages(shapes_root, tmp_path):
    """The script's own merge gives exactly what `crossmatch evaluate` reports with eval.rerank_k 0 and K (the
    same chunks and pair batches, so the same floats), and the script prints those rows."""
    import dataclasses

    import torch

    from crossmatch.runs import load_run, make_evaluator
    from tests.conftest import save_tiny_checkpoint

    bench = load_benchmark("rerank_scores")
    ckpt = save_tiny_checkpoint(tmp_path / "albef.pt", "tiny_albef")
    model, cfg, tok = load_run(str(ckpt), [f"data.root={shapes_root}"])
    evaluators = {
        name: make_evaluator(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, rerank_k=k)), "test", tok,
                             model, torch.device("cpu"))
        for name, k in (("itc", 0), ("itm", 4))
    }  # fmt: skip
    n_pairs, rows = bench.score_rows(model, evaluators["itc"].data, 4, cfg.eval.chunk_size, cfg.eval.rerank_batch)
    assert list(rows) == ["itc", "itm", "itm+cos", "logp+cos/t", "diff+cos/t"]
    for name, evaluator in evaluators.items():
        assert rows[name] == evaluator(model)
    assert rows["itm"] != rows["itc"]  # the tiny ITM head re-orders some candidates: the comparison can fail

    out = run_script("benchmarks/rerank_scores.py", str(ckpt), "--k", "4", "--threads", "1", f"data.root={shapes_root}")
    assert out.splitlines()[0].startswith(f"{n_pairs} pairs of the ITC top-4")
    assert [line.split()[0] for line in out.splitlines()[1:]] == list(rows)


def test_text_negative_cosine_is_per_type_and_keeps_the_first_triples():
    import torch

    from crossmatch.retrieval.compositional import Triple

    bench = load_benchmark("text_negative_cosine")
    vec = {"cap": [1.0, 0.0], "neg a": [0.6, 0.8], "neg b": [0.0, 1.0], "neg c": [1.0, 0.0], "neg d": [-1.0, 0.0]}

    class Model:  # encode_text of whatever the tokenizer returns: here the texts themselves
        def encode_text(self, texts, normalize=False):
            return torch.tensor([vec[t] for t in texts])

    def triple(neg, kind, line):
        return Triple("x.png", Path("x.png"), "cap", neg, kind, line)

    triples = [triple("neg a", "swap", 1), triple("neg b", "flip", 2), triple("neg c", "swap", 3)]
    triples.append(triple("neg d", "swap", 4))  # the third of its type: past --per-type 2
    cos = bench.cosine_by_type(Model(), lambda texts: texts, triples, per_type=2, batch=1)
    assert sorted(cos) == ["flip", "swap"]
    assert cos["swap"].tolist() == pytest.approx([0.6, 1.0]) and cos["flip"].tolist() == [0.0]


@pytest.fixture(scope="module")
def tiny_vse_run(tmp_path_factory, shapes_root) -> Path:
    """A VSE++ run of 2 steps on the tiny shapes split: a real checkpoint for the scripts' smoke runs."""
    from crossmatch.cli.main import main

    run = tmp_path_factory.mktemp("vse") / "run"
    args = ["train", "configs/vse_shapes.yaml", "--run-dir", str(run), f"data.root={shapes_root}"]
    assert main([*args, "train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=8"]) == 0
    return run


@pytest.mark.slow
def test_text_negative_cosine_runs_on_a_trained_dual_encoder(tiny_vse_run, shapes_root):
    out = run_script(
        "benchmarks/text_negative_cosine.py",
        str(tiny_vse_run / "checkpoints" / "best.pt"),
        "--negatives",
        str(shapes_root / "test_negatives.jsonl"),
        "--per-type",
        "3",
    )
    assert out.splitlines()[0].split() == ["type", "triples", "mean", "p5", "min"]
    assert "swap_attributes" in out and "load average" in out


def test_twin_kinds_splits_twin_accuracy_by_what_the_twins_swap():
    import torch

    bench = load_benchmark("twin_kinds")
    red_disc, blue_star = {"color": "red", "size": "small"}, {"color": "blue", "size": "large"}
    assert (
        bench.kind_of([red_disc, blue_star], [{**red_disc, "color": "blue"}, {**blue_star, "color": "red"}]) == "colour"
    )
    assert (
        bench.kind_of([red_disc, blue_star], [{**red_disc, "size": "large"}, {**blue_star, "size": "small"}]) == "size"
    )
    assert bench.kind_of([red_disc, blue_star], [red_disc, blue_star]) == "position"  # only the boxes differ
    # 4 images, one caption each; twins (0, 1) swap colours, (2, 3) positions
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0],  # image 0: own caption 0.9 > twin's 0.1: a win
            [0.8, 0.2, 0.0, 0.0],  # image 1: own 0.2 < twin's 0.8: a loss
            [0.0, 0.0, 0.7, 0.6],  # image 2: a win
            [0.0, 0.0, 0.3, 0.5],  # image 3: a win
        ]
    )
    t2i = torch.arange(4)
    got = bench.accuracy_by_kind(scores, t2i, [(0, 1), (2, 3)], ["colour", "position"])
    assert got == {"colour": (1, 1, 2), "position": (1, 2, 2), "all": (2, 3, 4)}
    img = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])  # image 3 has 2 captions
    cos = bench.twin_cosines(img, txt, torch.tensor([0, 1, 2, 3, 3]), [(0, 1), (2, 3)])
    assert cos.flatten().tolist() == pytest.approx([0.6, 1.0, 1.0, 0.5])  # last: caption cos, mean of (1, 0)


@pytest.mark.slow
def test_twin_kinds_runs_on_a_trained_dual_encoder(tiny_vse_run):
    out = run_script("benchmarks/twin_kinds.py", str(tiny_vse_run / "checkpoints" / "best.pt"), "--threads", "1")
    lines = out.splitlines()
    assert lines[0].split() == ["twins", "swap", "pairs", "cases", "twin_acc", "image", "cos", "caption", "cos"]
    assert any(line.startswith("all ") for line in lines) and "random image pairs" in out
