"""The benchmark scripts run against the current library (they are not timed here: only that each one runs
end to end on tiny inputs and prints its figures). A refactor of the Trainer once broke
benchmarks/train_throughput.py without any test noticing."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


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


KEPT = [
    "accumulation.py", "checkpoint_integrity.py", "demo.py", "gpu_check.sh", "index_search.py", "scan_scoring.py",
    "serve_load.py", "shard_loader.py", "train_throughput.py",
]  # fmt: skip


def test_benchmarks_are_the_kept_scripts_each_printing_load_and_threads_without_machine_paths():
    assert sorted(p.name for p in (ROOT / "benchmarks").iterdir() if p.name != "__pycache__") == KEPT
    for name in KEPT:
        text = (ROOT / "benchmarks" / name).read_text()
        assert "getloadavg" in text or "/proc/loadavg" in text, name
        assert "get_num_threads" in text or "nproc" in text or "--threads" in text, name
        assert re.search(r"(^|[\s'\"=(])/(work|tmp|home)/", text) is None, name


@pytest.mark.slow
def test_checkpoint_integrity_prints_both_ratios_with_threads_and_load():
    out = run_script("benchmarks/checkpoint_integrity.py", "--mb", "1", "--repeats", "1")
    assert re.search(r"^state 1 MB, best of 1, 1 torch thread, \d+ CPUs, load average [\d.]+$", out, re.M), out
    assert re.search(r"^save: .*atomic_save [\d.]+ s \([\d.]+x the durable write\)$", out, re.M), out
    assert re.search(r"^load: torch.load [\d.]+ s, load_checkpoint [\d.]+ s \([\d.]+x\)$", out, re.M), out


@pytest.mark.slow
def test_index_search_runs_on_a_small_index(tmp_path):
    args = ["--rows", "3000", "--dim", "16", "--queries", "1", "--repeats", "1", "--threads", "1"]
    out = run_script("benchmarks/index_search.py", *args, "--dir", str(tmp_path))
    assert "1 thread(s), k=10" in out and re.search(r"Q=1 \(best of 1, load [\d.]+\)", out), out
    assert "x baseline" in out and "recall@10 of the float16 index" in out


@pytest.mark.slow
def test_accumulation_times_both_settings_through_the_trainer():
    """The script builds a Trainer itself: a change of the Trainer's signature once broke it silently."""
    out = run_script("benchmarks/accumulation.py", "--batch", "2", "--accum", "2", "--repeats", "1", "--threads", "1")
    assert "clip_shapes architecture, cpu, 1 threads" in out
    assert re.search(r"^load average [\d.]+ -> [\d.]+$", out, re.M)
    assert re.search(r"^batch 4 +[\d.]+s +\d+ MB$", out, re.M)
    assert re.search(r"^accum 2 x 2 +[\d.]+s +\d+ MB$", out, re.M)
    assert re.search(r"^ratio accum / batch: time [\d.]+x, peak memory [\d.]+x$", out, re.M), out


@pytest.mark.slow
def test_index_search_measures_approximate_keys_on_rows_like_a_real_index(tmp_path):
    pytest.importorskip("faiss")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import index_search
    finally:
        sys.path.pop(0)
    real = index_search.write_index(tmp_path / "real", 500, 12, "float32", clusters=5)
    mean, factor = index_search.gaussian_like(str(real), 8)  # the top 8 of 12 principal axes
    assert mean.shape == (8,) and factor.shape == (8, 8)
    std = np.diag(factor)
    assert np.all(std[:-1] >= std[1:]) and np.count_nonzero(factor - np.diag(std)) == 0  # decaying, diagonal
    args = ["--rows", "2000", "--dim", "8", "--like", str(real), "--ann-only", "--ann-queries", "20"]
    args += ["--train-rows", "2000", "--ann", "HNSW8|efSearch=16;efSearch=64"]
    out = run_script("benchmarks/index_search.py", *args, "--dir", str(tmp_path))
    rows = re.findall(r"^  HNSW8 +efSearch=(\d+) .* ([\d.]+) +([\d.]+) +([\d.]+)$", out, re.M)
    assert [r[0] for r in rows] == ["16", "64"], out  # two search settings measured on one build
    assert float(rows[1][1]) >= 0.9, out  # image-like queries on 2000 rows of 8 dims: efSearch=64 is near exact
