"""Shared fixtures: a tiny shapes dataset and a tiny people dataset generated once per session, and CPU-only,
single-thread torch (the CI machine has 2 cores; tiny models run faster without thread hand-offs). Shared helpers
that are not fixtures live in tests/helpers.py.

`CROSSMATCH_TEST_THREADS=2 make test` runs the suite with another thread count: every float comparison of
values computed through different batch shapes or threads must hold either way."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("CROSSMATCH_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """40 train / 12 val / 12 test images at 32 px, 5 captions each."""
    from crossmatch.data.shapes import generate_shapes

    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, n_train=40, n_val=12, n_test=12, seed=1, size=32, workers=1)
    return root


@pytest.fixture(scope="session")
def people_root(tmp_path_factory) -> Path:
    """`crossmatch data people` at 96 x 32: train identities 1..6, val 7, 8, test 9, 10 (each split's first two
    identities are a twin pair), 4 images each, 2 captions per image, written through the command line.
    Read-only: copy it to damage it."""
    from crossmatch.cli.main import main

    root = tmp_path_factory.mktemp("people")
    argv = ["data", "people", "--out", str(root), "--train", "6", "--val", "2", "--test", "2", "--size", "96", "32"]
    assert main(argv) == 0
    return root


@pytest.fixture
def shapes_copy(shapes_root, tmp_path) -> Path:
    """A private copy that a test may damage."""
    dst = tmp_path / "shapes"
    shutil.copytree(shapes_root, dst)
    return dst


@pytest.fixture(scope="module")
def run(shapes_root, tmp_path_factory) -> Path:
    """A finished one-epoch tiny_vse run (3 steps), once per test module (a module may damage it)."""
    from crossmatch.cli.main import main
    from tests.helpers import train_args

    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(train_args(shapes_root, run, "train.epochs=1")) == 0
    return run


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    """A private copy of `run` that a test may damage."""
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst
