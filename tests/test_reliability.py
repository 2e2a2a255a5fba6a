"""Nothing lost, nothing crashes: interruptions at the worst moment (SIGKILL, SIGINT, a full disk
while a checkpoint is written), two trainers on one run dir, damaged checkpoints, and hostile inputs, each
of which must end in one line `crossmatch: error: ...` (exit 2) with every saved file intact."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crossmatch.cli.main import main
from crossmatch.engine.checkpoint import (
    Checkpointer,
    atomic_save,
    export_safetensors,
    load_checkpoint,
    read_safetensors,
)
from crossmatch.errors import CheckpointError, ConfigError, CrossmatchError, DataError
from tests.helpers import ENTRIES, ROOT, SUBPROCESS_ENV, error_line, png_header_bomb, train_args, write_karpathy


def fake_state(epoch: int, best_epoch: int, step: int = 0, w: float = 0.0) -> dict:
    """A checkpoint dict as the Trainer writes it, small: `epoch` finished epochs, `step` into the next."""
    trainer = {"epoch": epoch, "step_in_epoch": step, "best_epoch": best_epoch, "best_metric": float(best_epoch)}
    return {
        "model": {"w": torch.full((4, 3), w), "n": torch.arange(5)},
        "trainer": trainer,
        "config": {},
        "tokenizer": "t",
    }


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return png_header_bomb(tmp_path_factory.mktemp("bomb") / "bomb.png")


# ---- 1. best.pt is never lost or stale ------------------------------------------------------------------

KILL_IN_BEST = """
import os, signal, sys
from crossmatch.engine import checkpoint

real = checkpoint.atomic_write

class Dying:  # the file torch.save writes to: SIGKILL once part of best.pt is on disk
    def __init__(self, f):
        self.f, self.n = f, 0
    def write(self, b):
        self.n += len(b)
        if self.n > 400:
            self.f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return self.f.write(b)
    def flush(self):
        self.f.flush()

def atomic_write(path, write):
    if path.name == "best.pt":
        return real(path, lambda f: write(Dying(f)))
    return real(path, write)

checkpoint.atomic_write = atomic_write
from crossmatch.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_while_best_pt_is_written_then_resume_and_evaluate(shapes_root, tmp_path, capsys):
    script = tmp_path / "kill.py"
    script.write_text(KILL_IN_BEST)
    run = tmp_path / "run"
    args = train_args(shapes_root, run, "train.epochs=1", "checkpoint.every_steps=1", "checkpoint.safetensors=true")
    killed = subprocess.run(
        [sys.executable, str(script), *args], env=SUBPROCESS_ENV, cwd=ROOT, capture_output=True, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpts = run / "checkpoints"
    assert [p.name for p in ckpts.glob(".best.pt.tmp*")], "the kill must come while best.pt is half written"
    # best first: last.pt still holds the mid-epoch state, so the epoch is redone and best.pt written after all
    assert load_checkpoint(ckpts / "last.pt")["trainer"]["epoch"] == 0
    assert main([*args, "--resume"]) == 0
    assert not list(ckpts.glob(".*.tmp*"))  # the orphan of the killed write is cleaned at start
    best = load_checkpoint(ckpts / "best.pt")["trainer"]
    assert best["epoch"] == best["best_epoch"] == 1
    assert read_safetensors(ckpts / "best.safetensors")["config"]["model"]["name"] == "tiny_vse"
    capsys.readouterr()
    assert main(["evaluate", str(ckpts / "best.pt"), "--split", "test"]) == 0


def test_resume_repairs_a_missing_or_stale_best(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=3, safetensors=True)
    ck.save(fake_state(1, 1, w=1.0), epoch_tag=1, is_best=True)
    # what the old write order left after a kill: last.pt says epoch 2 is best, best.* still hold epoch 1
    ck.save(fake_state(2, 2, w=2.0), epoch_tag=2)
    latest, _ = ck.load_latest()
    assert {p.name for p in ck.repair_best(latest)} == {"best.pt", "best.safetensors"}
    assert load_checkpoint(ck.dir / "best.pt")["model"]["w"].unique().tolist() == [2.0]
    assert read_safetensors(ck.dir / "best.safetensors")["model"]["w"].unique().tolist() == [2.0]
    assert ck.repair_best(latest) == []  # consistent now: nothing to do
    ck.save(fake_state(2, 2, step=1, w=3.0))  # a mid-epoch last.pt of epoch 3: epoch_0002.pt has the best
    (ck.dir / "best.pt").unlink()
    (ck.dir / "best.safetensors").write_bytes(b"garbage")
    assert {p.name for p in ck.repair_best(ck.load_latest()[0])} == {"best.pt", "best.safetensors"}
    assert load_checkpoint(ck.dir / "best.pt")["model"]["w"].unique().tolist() == [2.0]
    assert read_safetensors(ck.dir / "best.safetensors")["model"]["w"].unique().tolist() == [2.0]


def test_best_files_are_written_before_last(tmp_path, monkeypatch):
    from crossmatch.engine import checkpoint

    order, real = [], checkpoint.atomic_write
    monkeypatch.setattr(checkpoint, "atomic_write", lambda path, write: order.append(path.name) or real(path, write))
    Checkpointer(tmp_path, keep_last=1, safetensors=True).save(fake_state(1, 1), epoch_tag=1, is_best=True)
    assert order == ["best.pt", "best.safetensors", "last.pt", "epoch_0001.pt", "last.safetensors"]


# ---- 2. the whole config is validated before any work ------------------------------------------------------


@pytest.mark.parametrize(
    "override, culprit",
    [
        ("eval.metric=rsun", "eval.metric='rsun'"),
        ("eval.metric=i2t_medr", "lower is better"),
        ("eval.metric=t2i_mAP", "not reported by retrieval evaluation"),  # a person-search metric, shapes data
        ("eval.every_epochs=0", "eval.every_epochs=0"),
        ("eval.chunk_size=0", "eval.chunk_size=0"),
        ("train.epochs=0", "train.epochs=0"),
        ("train.epochs=-1", "train.epochs=-1"),
        ("train.batch_size=0", "train.batch_size=0"),
        ("data.image_size=0", "data.image_size=0"),
        ("train.log_every=0", "train.log_every=0"),
        ("data.num_workers=-1", "data.num_workers=-1"),
        ("train.lr=0", "train.lr=0.0"),
        ("train.lr=-1e-3", "train.lr=-0.001"),
        ("train.lr=1e38", "train.lr=1e+38"),  # Adam's first step, 10 lr, is not a float32 number
        ("loss.vilt.negatives=hardest", "loss.vilt.negatives='hardest': choose random or hard"),
        ("model.embed_dim=abc", "model.embed_dim='abc': expected int"),
    ],
)
def test_config_is_validated_before_any_work(shapes_root, tmp_path, capsys, override, culprit):
    run = tmp_path / "run"
    assert main(train_args(shapes_root, run, override)) == 2
    assert culprit in error_line(capsys)
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()  # no epoch was trained


def test_a_yaml_that_is_not_a_mapping_is_one_line(tmp_path, capsys):
    path = tmp_path / "list.yaml"
    path.write_text("- data\n- model\n")
    assert main(["train", str(path)]) == 2
    assert "must be a mapping" in error_line(capsys)


def test_selectable_metrics_are_what_evaluation_reports():
    from crossmatch.config import selectable_metrics
    from crossmatch.retrieval.evaluate import split_metrics
    from crossmatch.retrieval.person import person_metrics

    scores = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.8, 0.7]])  # (2 images, 3 captions)
    t2i = torch.tensor([0, 1, 1])
    assert set(selectable_metrics(False, True)) <= set(split_metrics(scores, scores, t2i, [(0, 1)]))
    assert set(selectable_metrics(False, False)) <= set(split_metrics(scores, scores, t2i))
    pids = torch.tensor([0, 1])  # image identities
    assert set(selectable_metrics(True, False)) == set(person_metrics(scores, t2i, pids))
    assert set(selectable_metrics(True, True)) == set(person_metrics(scores, t2i, pids, twin_pids=[(0, 1)]))


@pytest.mark.slow
def test_evaluate_validates_its_config_too(run, capsys):
    assert main(["evaluate", str(run / "checkpoints" / "best.pt"), "eval.chunk_size=0"]) == 2
    assert "eval.chunk_size=0" in error_line(capsys)


@pytest.mark.slow
def test_an_overflowing_lr_below_the_bound_is_caught_by_the_nan_guard(shapes_root, tmp_path, capsys):
    assert main(train_args(shapes_root, tmp_path / "run", "train.epochs=1", "train.lr=1e37")) == 2
    assert "non-finite loss at epoch 1 step 2" in error_line(capsys)


# ---- 3. resume falls back from every kind of damaged last.pt ------------------------------------------------


@pytest.mark.parametrize("damage", [b"", b"hello world", b"not a checkpoint", b"PK\x03\x04 half a zip"])
def test_resume_falls_back_from_an_empty_or_text_last_pt(tmp_path, caplog, damage):
    ck = Checkpointer(tmp_path, keep_last=1)
    ck.save(fake_state(1, 1, w=1.0), epoch_tag=1)
    (ck.dir / "last.pt").write_bytes(damage)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ck.dir / "last.pt")
    assert "\n" not in str(err.value) and "last.pt" in str(err.value)
    ckpt, path = ck.load_latest()
    assert path.name == "epoch_0001.pt" and ckpt["model"]["w"].unique().tolist() == [1.0]
    assert "trying an older checkpoint" in caplog.text


class Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_an_unsafe_last_pt_stops_the_resume_instead_of_being_skipped(tmp_path, monkeypatch):
    from crossmatch.errors import UnsafeCheckpointError

    monkeypatch.chdir(tmp_path)
    ck = Checkpointer(tmp_path)
    ck.save(fake_state(1, 1), epoch_tag=1)
    torch.save({"model": {}, "payload": Boom()}, ck.dir / "last.pt")
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        ck.load_latest()
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_resume_with_another_model_family_is_one_line(shapes_root, run_copy, capsys):
    assert main(train_args(shapes_root, run_copy, "train.epochs=2", "model.name=tiny_scan", "--resume")) == 2
    line = error_line(capsys)
    assert "tiny_vse" in line and "tiny_scan" in line and "last.pt" in line


# ---- 4. one trainer per run dir -----------------------------------------------------------------------


def test_a_second_trainer_is_refused_naming_the_holders_pid(shapes_root, tmp_path, capsys):
    from crossmatch.engine.rundir import RunLock

    run = tmp_path / "run"
    with RunLock(run):
        assert main(train_args(shapes_root, run)) == 2
        line = error_line(capsys)
    assert f"pid {os.getpid()}" in line and str(run) in line
    assert not (run / "checkpoints").exists()


HOLD_LOCK = """
import sys, time
from crossmatch.engine.rundir import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_the_run_lock_dies_with_its_process(tmp_path):
    from crossmatch.engine.rundir import RunDirLockedError, RunLock

    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], env=SUBPROCESS_ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunDirLockedError, match=f"pid {proc.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        proc.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
        proc.wait()
    RunLock(tmp_path).acquire().release()


# ---- 5. checkpoint integrity ------------------------------------------------------------------------------


def test_byte_flips_in_a_checkpoint_never_load_silently(tmp_path):
    """Every single-bit flip either loads the very same tensors and values, or fails with a one-line
    CheckpointError (zip CRCs and the stored sha256 are checked). Before: half the flips loaded silently."""
    state = fake_state(3, 2, w=0.5)
    state["model"]["big"] = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    atomic_save(state, tmp_path / "a.pt")
    raw, bad = (tmp_path / "a.pt").read_bytes(), tmp_path / "b.pt"
    rng = random.Random(0)
    outcomes = {"same": 0, "refused": 0}
    for pos in rng.sample(range(len(raw)), 300):
        flipped = bytearray(raw)
        flipped[pos] ^= 1 << rng.randrange(8)
        bad.write_bytes(bytes(flipped))
        try:
            got = load_checkpoint(bad)
        except CheckpointError as err:
            assert "\n" not in str(err) and str(bad) in str(err)
            outcomes["refused"] += 1
            continue
        assert got.keys() == state.keys(), pos
        assert all(torch.equal(got["model"][k], v) for k, v in state["model"].items()), pos
        assert all(got[k] == state[k] for k in ("trainer", "config", "tokenizer")), pos
        outcomes["same"] += 1
    assert outcomes["refused"] > 100  # most bytes matter: the check is not vacuous


def test_byte_flips_in_a_safetensors_export_never_load_silently(tmp_path):
    good = tmp_path / "a.safetensors"
    export_safetensors({**fake_state(1, 1, w=0.25), "config": {"model": {"name": "tiny_vse"}}}, good)
    raw, bad, want = good.read_bytes(), tmp_path / "b.safetensors", read_safetensors(good)
    rng = random.Random(1)
    refused = 0
    for pos in range(len(raw)):
        flipped = bytearray(raw)
        flipped[pos] ^= 1 << rng.randrange(8)
        bad.write_bytes(bytes(flipped))
        try:
            got = read_safetensors(bad)
        except CheckpointError as err:
            assert "\n" not in str(err)
            refused += 1
            continue
        assert got.keys() == want.keys() and got["config"] == want["config"], pos
        assert all(torch.equal(got["model"][k], v) for k, v in want["model"].items()), pos
    assert refused > len(raw) // 2


def test_a_digest_that_does_not_match_is_corrupt_and_skipped_on_resume(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=1)
    ck.save(fake_state(1, 1, w=1.0), epoch_tag=1)
    forged = {**fake_state(1, 1, w=9.0), "sha256": "0" * 64}  # an intact zip whose digest does not match
    torch.save(forged, ck.dir / "last.pt")
    with pytest.raises(CheckpointError, match="do not match their stored sha256"):
        load_checkpoint(ck.dir / "last.pt")
    assert ck.load_latest()[1].name == "epoch_0001.pt"


def test_checkpoints_without_a_checksum_still_load(tmp_path):
    from safetensors.torch import save_file

    state = fake_state(1, 1, w=3.0)
    torch.save(state, tmp_path / "old.pt")  # as written before the sha256 existed
    assert torch.equal(load_checkpoint(tmp_path / "old.pt")["model"]["w"], state["model"]["w"])
    meta = {"format": "crossmatch", "config": "{}", "tokenizer": "t"}
    save_file(state["model"], str(tmp_path / "old.safetensors"), metadata=meta)
    assert torch.equal(read_safetensors(tmp_path / "old.safetensors")["model"]["n"], torch.arange(5))


# ---- 6. decompression bombs -------------------------------------------------------------------------------


def test_a_decompression_bomb_is_an_unreadable_image_naming_the_file(bomb):
    from crossmatch.data.transforms import load_image

    assert bomb.stat().st_size < 200_000
    with pytest.raises(DataError, match="bomb.png is 30000 x 30000 pixels, more than data.max_image_pixels"):
        load_image(bomb)


def test_the_pixel_limit_is_configurable(tmp_path):
    from crossmatch.data.transforms import load_image
    from crossmatch.search.index import _ImageFiles

    root = write_karpathy(tmp_path, ENTRIES, size=40)  # 1600 pixels
    img = root / "images" / "000.png"
    assert load_image(img).shape == (3, 40, 40)
    with pytest.raises(DataError, match="more than data.max_image_pixels=1000"):
        load_image(img, max_pixels=1000)
    assert _ImageFiles([img], 16, max_pixels=1000)[0]["skipped"][0] == 0  # index build: skipped, listed
    from crossmatch.config import load_config
    from crossmatch.data.formats import open_split

    ds = open_split(load_config(None, [f"data.root={root}", "data.max_image_pixels=1000"]).data, "train")
    with pytest.raises(DataError, match="000.png"):
        ds.image_view(lambda x: x)[0]


def test_validate_reports_a_bomb_as_unreadable(tmp_path, bomb, capsys):
    root = write_karpathy(tmp_path, ENTRIES)
    shutil.copy(bomb, root / "images" / "001.png")
    assert main(["data", "validate", str(root)]) == 2
    assert "unreadable image" in error_line(capsys)


@pytest.mark.slow
def test_evaluate_and_search_with_a_bomb_image_are_one_line(run, shapes_copy, bomb, capsys):
    best = str(run / "checkpoints" / "best.pt")
    assert main(["search", best, "--image", str(bomb)]) == 2
    assert "bomb.png" in error_line(capsys)
    images = json.loads((shapes_copy / "dataset.json").read_text())["images"]
    victim = next(i["filename"] for i in images if i["split"] == "test")
    shutil.copy(bomb, shapes_copy / "images" / victim)
    assert main(["evaluate", best, "--split", "test", f"data.root={shapes_copy}"]) == 2
    assert f"{victim} is 30000 x 30000 pixels" in error_line(capsys)


@pytest.mark.slow
def test_max_bad_samples_counts_images_per_epoch(shapes_copy, tmp_path, bomb, capsys):
    train = [
        i["filename"] for i in json.loads((shapes_copy / "dataset.json").read_text())["images"] if i["split"] == "train"
    ]
    (shapes_copy / "images" / train[0]).write_bytes(b"not a png")
    shutil.copy(bomb, shapes_copy / "images" / train[1])
    full = ["train.max_steps_per_epoch=0", "train.batch_size=8", "eval.batch_size=32"]  # 200 captions: 25 steps
    assert main(train_args(shapes_copy, tmp_path / "ok", *full, "data.max_bad_samples=2")) == 0
    state = load_checkpoint(tmp_path / "ok" / "checkpoints" / "last.pt")["trainer"]
    assert state["epoch"] == 2 and state["skipped_samples"] == 2 * 2 * 5  # 2 epochs x 2 images x 5 captions
    capsys.readouterr()
    assert main(train_args(shapes_copy, tmp_path / "strict", *full, "data.max_bad_samples=1")) == 2
    assert "2 unreadable training images in epoch 1, more than data.max_bad_samples=1" in error_line(capsys)


# ---- 7. full disk and Ctrl-C while a checkpoint is written ---------------------------------------------------


def _dev_full_for(monkeypatch, name: str) -> None:
    """Make atomic_write's temporary file for `name` be /dev/full: every write gets a real ENOSPC."""
    from crossmatch import files

    real_open = open

    def fake_open(path, mode="r", *args, **kwargs):
        if Path(path).name.startswith(f".{name}{files.TMP_MARK}"):
            return real_open("/dev/full", mode)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(files, "open", fake_open, raising=False)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("numel", [4, 1 << 20])  # ENOSPC at the final flush, and inside torch's C++ writer
def test_a_full_disk_during_torch_save_keeps_the_previous_file(tmp_path, monkeypatch, numel):
    from crossmatch.files import DiskFullError

    path = tmp_path / "last.pt"
    atomic_save(fake_state(1, 1, w=1.0), path)
    before = path.read_bytes()
    _dev_full_for(monkeypatch, "last.pt")
    with pytest.raises(DiskFullError) as err:
        atomic_save({"model": {"w": torch.zeros(numel)}}, path)
    assert str(err.value) == f"cannot write {path}: the disk is full (the previous file is intact)"
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_at_an_epoch_end_is_one_line_and_resumes(shapes_root, run_copy, monkeypatch, capsys):
    last = run_copy / "checkpoints" / "last.pt"
    before = last.read_bytes()
    _dev_full_for(monkeypatch, "last.pt")
    assert main(train_args(shapes_root, run_copy, "train.epochs=2", "--resume")) == 2
    assert error_line(capsys).endswith(f"cannot write {last}: the disk is full (the previous file is intact)")
    assert last.read_bytes() == before and not list(last.parent.glob(".*"))
    monkeypatch.undo()
    assert main(train_args(shapes_root, run_copy, "train.epochs=2", "--resume")) == 0
    state = load_checkpoint(last)["trainer"]
    assert state["epoch"] == 2 and load_checkpoint(last.parent / "best.pt")["trainer"]["epoch"] == state["best_epoch"]


@pytest.mark.slow
def test_sigint_inside_torch_save_is_one_line_and_keeps_the_previous_file(shapes_root, run_copy, monkeypatch, capsys):
    from crossmatch.engine import checkpoint

    last = run_copy / "checkpoints" / "last.pt"
    before, real = last.read_bytes(), checkpoint.atomic_write

    class CtrlC:  # the file torch.save writes to: a real SIGINT arrives half-way through last.pt
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 400:
                os.kill(os.getpid(), signal.SIGINT)
            return self.f.write(b)

        def flush(self):
            self.f.flush()

    def atomic_write(path, write):
        return real(path, (lambda f: write(CtrlC(f))) if path.name == "last.pt" else write)

    monkeypatch.setattr(checkpoint, "atomic_write", atomic_write)
    # A shell starts background jobs (`make test &`, some CI runners) with SIGINT ignored, and Python then keeps
    # ignoring it: give this process Python's own Ctrl-C handler, as an interactive terminal does.
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(train_args(shapes_root, run_copy, "train.epochs=2", "--resume")) == 130
    finally:
        signal.signal(signal.SIGINT, handler)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"crossmatch: interrupted: interrupted while writing {last} (the previous file is intact)"
    assert last.read_bytes() == before and not list(last.parent.glob(".*"))


def test_pt_and_safetensors_files_get_the_same_mode(tmp_path):
    from crossmatch.config import RunConfig, save_config

    old = os.umask(0o027)
    try:
        Checkpointer(tmp_path, safetensors=True).save(fake_state(1, 1), epoch_tag=1, is_best=True)
        save_config(RunConfig(), tmp_path / "config.yaml")
    finally:
        os.umask(old)
    files = [*(tmp_path / "checkpoints").iterdir(), tmp_path / "config.yaml"]
    assert {p.suffix for p in files} == {".pt", ".safetensors", ".yaml"}
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o640}


# ---- inputs that must be one line, exit 2 -------------------------------------------------------------------


def _karpathy(root: Path, edit) -> Path:
    """The two-image dataset of ENTRIES with its JSON edited by `edit(data)`."""
    write_karpathy(root, ENTRIES)
    data = json.loads((root / "dataset.json").read_text())
    edit(data)
    (root / "dataset.json").write_text(json.dumps(data))
    return root


def _set(key, value, image=0):
    return lambda d: d["images"][image].update({key: value})


def _latin1_caption(root: Path) -> None:
    _karpathy(root, lambda d: None)
    raw = (root / "dataset.json").read_bytes()
    (root / "dataset.json").write_bytes(raw.replace(b"a red shape", b"a r\xe9d shape"))  # Latin-1, not UTF-8


def _nested(root: Path) -> None:
    root.mkdir()
    (root / "dataset.json").write_bytes(b"[" * 200_000 + b"]" * 200_000)


HOSTILE_DATASETS = {
    "sentences an int": (lambda root: _karpathy(root, _set("sentences", 3)), "'sentences' must be a list"),
    "filename an int": (lambda root: _karpathy(root, _set("filename", 7)), "'filename' must be a string"),
    "non-UTF-8 caption": (_latin1_caption, "is not UTF-8 text (byte 0xe9"),
    "dataset.json a folder": (lambda root: (root / "dataset.json").mkdir(parents=True), "Is a directory"),
    "nested 200k deep": (_nested, "nested too deeply"),
    "image outside the folder": (lambda root: _karpathy(root, _set("filename", "../../x.png")), "leaves the image"),
}


@pytest.mark.parametrize("name", HOSTILE_DATASETS)
def test_hostile_dataset_files_are_one_line_for_train_and_validate(tmp_path, capsys, name):
    make, culprit = HOSTILE_DATASETS[name]
    root = tmp_path / "data"
    make(root)
    assert main(train_args(root, tmp_path / "run")) == 2
    assert culprit in error_line(capsys)
    assert main(["data", "validate", str(root), "--json-name", "dataset.json"]) == 2
    line = error_line(capsys)
    assert culprit in line or "image outside the image folder" in line


def test_non_utf8_jsonl_is_one_line(tmp_path, capsys):
    (tmp_path / "dataset.jsonl").write_bytes(b'{"image": "a.png", "captions": ["\xe9t\xe9"], "split": "train"}\n')
    assert main(["data", "validate", str(tmp_path / "dataset.jsonl")]) == 2
    assert "is not UTF-8 text" in error_line(capsys)


def test_person_search_captions_that_are_not_a_list_are_one_line(tmp_path, capsys):
    (tmp_path / "reid_raw.json").write_text(json.dumps([{"file_path": "a.png", "id": 1, "captions": 3}]))
    assert main(["data", "validate", str(tmp_path / "reid_raw.json")]) == 2
    assert "'captions' must be a list of strings" in error_line(capsys)


def test_images_outside_the_folder_need_allow_outside_root(tmp_path, capsys):
    from crossmatch.config import load_config
    from crossmatch.data.formats import open_split

    root = write_karpathy(tmp_path / "data", ENTRIES)
    shutil.copy(root / "images" / "000.png", tmp_path / "outside.png")
    _karpathy(root, _set("filename", "../../outside.png"))
    assert main(["data", "validate", str(root), "--allow-outside-root"]) == 0
    capsys.readouterr()
    with pytest.raises(DataError, match="data.allow_outside_root=true"):
        open_split(load_config(None, [f"data.root={root}"]).data, "train")
    ds = open_split(load_config(None, [f"data.root={root}", "data.allow_outside_root=true"]).data, "train")
    assert ds.images[0].path.resolve() == (tmp_path / "outside.png").resolve()


def test_validate_reports_no_images_and_duplicate_files(tmp_path, capsys):
    empty = _karpathy(tmp_path / "empty", lambda d: d.update(images=[]))
    assert main(["data", "validate", str(empty)]) == 2
    assert "no images" in error_line(capsys)
    dup = _karpathy(tmp_path / "dup", _set("filename", "001.png"))  # image ids 0 and 1 are both 001.png
    assert main(["data", "validate", str(dup)]) == 2
    assert "duplicate image file: 001.png (ids 0 and 1)" in error_line(capsys)


def _write_bad_checkpoints(tmp: Path, best: Path) -> dict[str, Path]:
    from safetensors.torch import save_file

    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "text.pt").write_text("hello world")
    ckpt = load_checkpoint(best)
    atomic_save({**ckpt, "tokenizer": "{broken"}, tmp / "tokenizer.pt")
    save_file({"w": torch.zeros(2)}, str(tmp / "noconfig.safetensors"), metadata={"format": "crossmatch"})
    bad_cfg = {"format": "crossmatch", "config": "{x", "tokenizer": ckpt["tokenizer"]}
    save_file({"w": torch.zeros(2)}, str(tmp / "badconfig.safetensors"), metadata=bad_cfg)
    return {p.stem: p for p in tmp.iterdir()}


@pytest.mark.slow
def test_broken_checkpoints_of_every_kind_are_one_line(run, shapes_root, tmp_path, capsys):
    bad = _write_bad_checkpoints(tmp_path, run / "checkpoints" / "best.pt")
    for name, culprit in [
        ("empty", "is empty"),
        ("text", "truncated or corrupt"),
        ("tokenizer", "unreadable tokenizer JSON"),
        ("noconfig", "no readable config JSON"),
        ("badconfig", "no readable config JSON"),
    ]:
        assert main(["evaluate", str(bad[name])]) == 2, name
        line = error_line(capsys)
        assert culprit in line and bad[name].name in line, line
    assert main(train_args(shapes_root, tmp_path / "ft", "--init-from", str(bad["text"]))) == 2
    assert "text.pt" in error_line(capsys)
    assert not (tmp_path / "ft" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, culprit",
    [
        (["--query", "a red circle", "--top-k", "-3"], "--top-k -3"),
        (["--query", "a red circle", "--top-k", "0"], "--top-k 0"),
        (["--query", ""], "the query is empty"),
        (["--query", "   "], "the query is empty"),
        (["--query", "zzqx qqqv"], "no word of the query 'zzqx qqqv'"),
        (["--query", "a red circle", "--out", "{file}/g.png"], "cannot write --out"),
        (["--query", "a red circle", "--out", "{dir}"], "is a folder"),
    ],
)
def test_search_refuses_bad_options_in_one_line(run, tmp_path, capsys, extra, culprit):
    (tmp_path / "file").write_text("x")
    extra = [e.format(file=tmp_path / "file", dir=tmp_path) for e in extra]
    assert main(["search", str(run / "checkpoints" / "best.pt"), *extra]) == 2
    assert culprit in error_line(capsys)


@pytest.mark.slow
def test_unwritable_outputs_fail_before_the_work(run, shapes_root, tmp_path, capsys):
    best = str(run / "checkpoints" / "best.pt")
    (tmp_path / "file").write_text("x")
    assert main(["evaluate", best, "--json", str(tmp_path / "file" / "m.json")]) == 2
    assert "cannot write --json" in error_line(capsys)
    assert main(["evaluate", best, "--json", str(tmp_path)]) == 2
    assert "is a folder" in error_line(capsys)
    assert main(["index", "build", best, str(shapes_root / "images"), "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not an index folder" in error_line(capsys)


def test_check_writable_and_atomic_write_name_the_file(tmp_path):
    from crossmatch.files import check_writable, write_text

    (tmp_path / "file").write_text("x")
    with pytest.raises(CrossmatchError, match="cannot write --out .*file/x.png"):
        check_writable(tmp_path / "file" / "x.png", "--out")
    with pytest.raises(CrossmatchError, match="cannot write .*file/y.json"):
        write_text(tmp_path / "file" / "y.json", "{}")
    assert check_writable(tmp_path / "new" / "x.png", "--out").parent.is_dir()
    assert list((tmp_path / "new").iterdir()) == []  # the probe is gone


def test_model_override_types_are_checked():
    from crossmatch.errors import ModelError
    from crossmatch.models import create_model

    with pytest.raises(ModelError, match="model.embed_dim='abc': expected int, got str"):
        create_model("tiny_vse", vocab_size=50, embed_dim="abc")
    with pytest.raises(ModelError, match="model.batch_norm=1: expected bool"):
        create_model("tiny_vse", vocab_size=50, batch_norm=1)
    assert create_model("tiny_vse", vocab_size=50, embed_dim=12).config.embed_dim == 12


def test_validate_config_is_a_library_function():
    from crossmatch.config import load_config, validate_config

    cfg = load_config(None, ["train.epochs=0", "eval.chunk_size=0"])
    with pytest.raises(ConfigError, match="eval.chunk_size=0"):
        validate_config(cfg, training=False)  # evaluation: the train section is not its business
    with pytest.raises(ConfigError, match="train.epochs=0"):
        validate_config(load_config(None, ["train.epochs=0"]))
    assert validate_config(load_config(None, [])) is not None
