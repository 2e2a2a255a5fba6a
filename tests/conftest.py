"""Shared fixtures: a tiny shapes dataset generated once per session, and CPU-only, single-thread torch
(the CI machine has 2 cores; tiny models run faster without thread hand-offs).

`CROSSMATCH_TEST_THREADS=2 make test` runs the suite with another thread count: every float comparison of
values computed through different batch shapes or threads must hold either way."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("CROSSMATCH_TEST_THREADS", "1")))

ROOT = Path(__file__).resolve().parents[1]
# The tiny run every end-to-end test starts from: tiny_vse on 32 px shapes, 2 short epochs. Later
# overrides win, so a test states only what it changes.
TINY_RUN = (
    "data.image_size=32",
    "model.name=tiny_vse",
    "train.epochs=2",
    "train.batch_size=16",
    "train.max_steps_per_epoch=3",
    "eval.batch_size=16",
)


def tiny_overrides(root, *extra: str) -> list[str]:
    return [f"data.root={root}", *TINY_RUN, *extra]


def train_args(root, run_dir, *extra: str, config: str = "configs/vse_shapes.yaml") -> list[str]:
    """`crossmatch train` arguments of the tiny run (absolute paths: subprocesses may run elsewhere)."""
    return ["train", str(ROOT / config), "--run-dir", str(run_dir), *tiny_overrides(root, *extra)]


def train_interrupted(monkeypatch, train, after: int, check=None) -> None:
    """Run `train()` with the Trainer stopped by a KeyboardInterrupt before its step `after + 1` (a kill between
    two steps); `check(batches)` sees every step's micro-batches. The real step is put back afterwards."""
    from crossmatch.engine import trainer as trainer_mod

    real_step, calls = trainer_mod.Trainer.train_step, []

    def step(self, batches):
        if check is not None:
            check(batches)
        if len(calls) == after:
            raise KeyboardInterrupt
        calls.append(1)
        return real_step(self, batches)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", step)
    with pytest.raises(KeyboardInterrupt):
        train()
    monkeypatch.setattr(trainer_mod.Trainer, "train_step", real_step)


def tiny_cfg(root, *extra: str):
    """The tiny run as a RunConfig (for in-process `crossmatch.runs.train`)."""
    from crossmatch.config import load_config

    return load_config(None, tiny_overrides(root, *extra))


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """40 train / 12 val / 12 test images at 32 px, 5 captions each."""
    from crossmatch.data.shapes import generate_shapes

    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, n_train=40, n_val=12, n_test=12, seed=1, size=32, workers=1)
    return root


@pytest.fixture
def shapes_copy(shapes_root, tmp_path) -> Path:
    """A private copy that a test may damage."""
    dst = tmp_path / "shapes"
    shutil.copytree(shapes_root, dst)
    return dst


def write_karpathy(root: Path, entries: list[dict], size: int = 16) -> Path:
    """A hand-made Karpathy-split dataset: entries are {"split", "captions"} dicts; images are flat colours."""
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    images, sentid = [], 0
    for i, e in enumerate(entries):
        name = f"{i:03d}.png"
        Image.new("RGB", (size, size), (10 * i % 255, 80, 160)).save(root / "images" / name)
        sents = [{"raw": c, "tokens": c.split(), "imgid": i, "sentid": sentid + k} for k, c in enumerate(e["captions"])]
        sentid += len(sents)
        images.append(
            {
                "filename": name,
                "imgid": i,
                "split": e["split"],
                "sentences": sents,
                "sentids": [s["sentid"] for s in sents],
                **({"twin": e["twin"]} if "twin" in e else {}),
            }
        )
    (root / "dataset.json").write_text(json.dumps({"dataset": "hand", "images": images}))
    return root


class FixedScores(torch.nn.Module):
    """A 'model' whose features are item indices and whose similarity reads a fixed (N_img, N_txt) matrix."""

    def __init__(self, scores: torch.Tensor):
        super().__init__()
        self.scores = scores

    def encode_image_features(self, batch):
        return {"idx": batch["image_idx"]}

    def encode_text_features(self, batch):
        return {"idx": batch["text_idx"]}

    def similarity(self, img, txt):
        return self.scores[img["idx"]][:, txt["idx"]]


def save_tiny_checkpoint(path: Path, name: str, *overrides: str, captions: list[str] | None = None) -> Path:
    """A checkpoint in `crossmatch train`'s layout without training: config, word tokenizer, seeded random weights."""
    from crossmatch.config import config_to_dict, load_config
    from crossmatch.data.tokenizer import CaptionTokenizer
    from crossmatch.engine.checkpoint import atomic_save
    from crossmatch.runs import build_model, resolved_model_section

    cfg = load_config(None, [f"model.name={name}", "data.image_size=32", "data.max_words=8", *overrides])
    words = captions or ["a red circle left of a blue square", "two green triangles above a small star"]
    tok = CaptionTokenizer.train(words, max_words=cfg.data.max_words)
    torch.manual_seed(0)
    model, cfg = build_model(cfg, tok)
    cfg.model = resolved_model_section(name, model)
    atomic_save({"model": model.state_dict(), "config": config_to_dict(cfg), "tokenizer": tok.to_str()}, path)
    return path
