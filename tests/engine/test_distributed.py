"""Engine promises that need real processes: torchrun DDP on CPU (gloo) matches one process on the same
global batch, a dead rank ends the job, and a SIGKILLed run resumes to bitwise-identical weights."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from crossmatch.engine.checkpoint import load_checkpoint
from tests.helpers import ROOT, SUBPROCESS_ENV, TORCHRUN, assert_same_last_checkpoint, ddp_args, run_in_root


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_on_the_same_global_batch(shapes_root, tmp_path):
    steps = ["train.max_steps_per_epoch=3", "train.grad_clip=0"]
    one = run_in_root(
        [
            sys.executable,
            "-m",
            "crossmatch",
            *ddp_args(shapes_root, tmp_path / "one", "train.batch_size=16", *steps),
        ]
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_in_root(
        [*TORCHRUN, "-m", "crossmatch", *ddp_args(shapes_root, tmp_path / "two", "train.batch_size=8", *steps)]
    )
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = assert_same_last_checkpoint(tmp_path / "one", tmp_path / "two", steps=3)
    ma, mb = a["trainer"]["history"][0], b["trainer"]["history"][0]
    assert ma.keys() == mb.keys() and all(abs(ma[k] - mb[k]) < 1e-6 for k in ma if not k.endswith("loss"))
    # the validation loss sums the same global batch in another order: float32 rounding of a sum of ~10
    assert {k: mb[k] for k in mb if k.endswith("loss")} == pytest.approx(
        {k: ma[k] for k in ma if k.endswith("loss")}, rel=1e-5
    )
    assert not (tmp_path / "two" / "checkpoints" / "last.pt.tmp").exists()


DIE = """
import os, sys
from crossmatch.engine import trainer
real = trainer.Trainer.train_step
def dying_step(self, batches):
    if self.dist.rank == 1 and self.state.global_step == 2:
        os._exit(3)
    return real(self, batches)
trainer.Trainer.train_step = dying_step
from crossmatch.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_dead_rank_ends_the_job_instead_of_hanging(shapes_root, tmp_path):
    script = tmp_path / "die.py"
    script.write_text(DIE)
    t0 = time.monotonic()
    out = run_in_root(
        [
            *TORCHRUN,
            str(script),
            *ddp_args(shapes_root, tmp_path / "run", "train.batch_size=8", "train.max_steps_per_epoch=6"),
        ],
        timeout=200,
    )
    assert out.returncode != 0
    assert time.monotonic() - t0 < 180
    assert "exitcode" in out.stderr and "3" in out.stderr  # torchrun names the failed rank and its exit code


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(shapes_root, tmp_path):
    cfg = [
        "train.batch_size=8",
        "train.epochs=2",
        "train.max_steps_per_epoch=20",
        "train.log_every=1",
        "checkpoint.every_steps=1",
    ]
    full = run_in_root([sys.executable, "-m", "crossmatch", *ddp_args(shapes_root, tmp_path / "full", *cfg)])
    assert full.returncode == 0, full.stderr[-2000:]
    proc = subprocess.Popen(
        [sys.executable, "-m", "crossmatch", *ddp_args(shapes_root, tmp_path / "cut", *cfg)],
        env=SUBPROCESS_ENV,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = tmp_path / "cut" / "train.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (log.is_file() and "epoch 1 step 3/20" in log.read_text()):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up: any moment, a save included
    proc.wait()
    cut = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["trainer"]
    assert cut["epoch"] == 0 and 3 <= cut["step_in_epoch"] < 20, cut  # killed in the middle of epoch 1
    resumed = run_in_root(
        [sys.executable, "-m", "crossmatch", *ddp_args(shapes_root, tmp_path / "cut", *cfg), "--resume"]
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["trainer"]["history"] == b["trainer"]["history"]
    assert all(
        torch.equal(x, y)
        for x, y in zip(a["optimizer"]["state"][0].values(), b["optimizer"]["state"][0].values(), strict=True)
    )
