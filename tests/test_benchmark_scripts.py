"""The benchmark scripts run against the current library (they are not timed here: only that each one runs
end to end on tiny inputs and prints its figures). A refactor of the Trainer once broke
benchmarks/train_throughput.py without any test noticing."""

import os
import subprocess
import sys
from pathlib import Path

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
