"""Helpers shared by the test modules (fixtures are in tests/conftest.py): the tiny run's settings and
arguments, hand-made datasets, tiny batches, fixed-score models, checkpoints written without training, and the
subprocess and error-line helpers of the end-to-end tests. No test module imports another: what two of them
share lives here."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest
import torch

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


# ---- subprocesses: `python -m crossmatch` and torchrun ------------------------------------------------------

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def ddp_args(root, run_dir, *extra: str) -> list[str]:
    """The tiny run without batch norm (its statistics are per rank), one whole epoch unless cut shorter."""
    return train_args(root, run_dir, "model.batch_norm=false", "train.epochs=1", "train.max_steps_per_epoch=0", *extra)


def run_in_root(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """`cmd` in the repository root with one OpenMP thread, its output captured as text."""
    return subprocess.run(cmd, capture_output=True, text=True, env=SUBPROCESS_ENV, cwd=ROOT, timeout=timeout)


# ---- the resume tests' run and its weights --------------------------------------------------------------


def resume_cfg(root, *extra: str):
    """The tiny run with 4 steps an epoch, a log line every 2 and one evaluation batch (the resume tests' run)."""
    return tiny_cfg(root, "train.max_steps_per_epoch=4", "train.log_every=2", "eval.batch_size=32", *extra)


def last_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from crossmatch.engine.checkpoint import load_checkpoint

    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


# ---- one-line errors and hostile images -----------------------------------------------------------------

# A two-image dataset for write_karpathy: one train image, one test image, two captions each.
ENTRIES = [{"split": s, "captions": [f"a {c} shape", f"the {c} one"]} for s, c in [("train", "red"), ("test", "blue")]]


def error_line(capsys) -> str:
    """The one error line of a failed command (log lines may precede it; a traceback may not)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-2000:]
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("crossmatch: error:"), err[-2000:]
    assert sum(ln.startswith("crossmatch: error") for ln in lines) == 1
    return lines[-1]


def png_header_bomb(path: Path, side: int = 30000) -> Path:
    """A valid 1-bit PNG of side x side pixels, all black: about 110 KB that decode to 900 M pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


# ---- hand-made person-search datasets --------------------------------------------------------------------


def png(path: Path, colour: tuple[int, int, int] = (200, 40, 40), size: int = 8) -> None:
    """A flat-colour PNG, its folders made."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


def write_pedes(root: Path, fmt: str, records: list[tuple[str, int, list[str], str]]) -> Path:
    """A person-search dataset of format `fmt`: records are (image path, person id, captions, split)."""
    from crossmatch.data.pedes import PEDES

    spec = PEDES[fmt]
    rows = []
    for k, (path, pid, caps, split) in enumerate(records):
        png(root / "imgs" / path, (30 * k % 255, 90, 20 * pid % 255))
        rows.append({spec.path_key: path, "id": pid, "captions": caps, "split": split, "processed_tokens": []})
    (root / spec.file).write_text(json.dumps(rows))
    return root


# ---- tiny batches ----------------------------------------------------------------------------------------


def tiny_batch(B=4, L=6, size=32, vocab=50):
    """A collate-style batch of every key a tiny_* model may read: B images (B <= 4), captions of lengths
    [L, 3, 1, 5][:B], two boxes an image (the second masked out)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (B, L), generator=g)
    mask = torch.arange(L)[None] < torch.tensor([L, 3, 1, 5][:B])[:, None]
    return {
        "image": torch.randn(B, 3, size, size, generator=g),
        "input_ids": ids * mask,
        "attention_mask": mask,
        "image_idx": torch.tensor([0, 1, 1, 2][:B]),
        "text_idx": torch.arange(B),
        "boxes": torch.tensor([[2.0, 2, 14, 14], [16, 16, 30, 30]]).expand(B, 2, 4).clone(),
        "box_mask": torch.tensor([True, False]).expand(B, 2).clone(),
    }


VOCAB = 40  # the vocabulary of make_batch's captions (the fusion models' tests build their models with it)


def make_batch(image_idx: list[int], L: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """A collate-style batch with ragged captions (row b has L - b % 3 real words)."""
    g = torch.Generator().manual_seed(seed)
    B = len(image_idx)
    lengths = torch.tensor([L - b % 3 for b in range(B)])
    mask = torch.arange(L)[None, :] < lengths[:, None]  # (B, L)
    ids = torch.randint(5, VOCAB, (B, L), generator=g).masked_fill(~mask, 0)
    return {
        "image": torch.randn(B, 3, 32, 32, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
        "image_idx": torch.tensor(image_idx),
        "text_idx": torch.arange(B),
    }


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    """A tar (a WebDataset shard) at `path` holding `members` {name: bytes}, in that order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def assert_same_last_checkpoint(one: Path, two: Path, steps: int) -> tuple[dict, dict]:
    """Two runs' last.pt hold the same step count and the same weights (float32 rounding of another batch
    split: rtol 1e-4, atol 1e-5); returns both checkpoints for further checks."""
    from crossmatch.engine.checkpoint import load_checkpoint

    a = load_checkpoint(one / "checkpoints" / "last.pt")
    b = load_checkpoint(two / "checkpoints" / "last.pt")
    assert a["trainer"]["global_step"] == b["trainer"]["global_step"] == steps
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)
    return a, b


def load_script(name: str):
    """The module of `scripts/{name}.py` (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
