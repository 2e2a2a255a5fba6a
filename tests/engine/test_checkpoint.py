import os
import pickle

import pytest
import torch

from crossmatch.engine.checkpoint import (
    Checkpointer,
    NewerCheckpointError,
    atomic_save,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from crossmatch.errors import CheckpointError
from crossmatch.runs import train as run_train
from tests import helpers


def test_atomic_save_round_trip_and_rng(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "rng": rng_state(), "note": "x"}
    atomic_save(state, tmp_path / "a.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temp file left behind
    back = load_checkpoint(tmp_path / "a.pt")
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["note"] == "x"
    expected = torch.rand(3)
    set_rng_state(back["rng"])
    assert torch.equal(torch.rand(3), expected)


def test_truncated_checkpoint_is_reported_and_older_one_used(tmp_path, caplog):
    ck = Checkpointer(tmp_path, keep_last=2)  # per-epoch files are opt-in: the fallback when last.pt is damaged
    ck.save({"model": {"w": torch.ones(2)}}, epoch_tag=1)
    ck.save({"model": {"w": torch.full((2,), 2.0)}}, epoch_tag=2)
    last = tmp_path / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:100])  # a crash that truncated the newest file
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(last)
    ckpt, path = ck.load_latest()
    assert path.name == "epoch_0002.pt" and ckpt["model"]["w"].tolist() == [2.0, 2.0]
    assert "truncated or corrupt" in caplog.text


def test_keep_last_prunes_epoch_files(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2, safetensors=True)
    for e in range(1, 5):
        ck.save({"model": {}}, epoch_tag=e, is_best=e == 2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best.pt", "best.safetensors", "epoch_0003.pt", "epoch_0004.pt", "last.pt", "last.safetensors"]


def test_by_default_a_run_keeps_last_pt_and_a_weights_only_best_pt(tmp_path):
    ck = Checkpointer(tmp_path)
    full = {"model": {"w": torch.ones(2)}, "optimizer": {"state": {0: torch.zeros(2)}}, "rng": {"x": 1}}
    full |= {"trainer": {"epoch": 1}, "config": {"a": 1}, "tokenizer": "t", "loss": {}, "scheduler": {}}
    for e in (1, 2):
        ck.save(full, epoch_tag=e, is_best=e == 1)
    assert sorted(p.name for p in ck.dir.iterdir()) == ["best.pt", "last.pt"]
    assert sorted(load_checkpoint(ck.dir / "best.pt")) == ["config", "loss", "model", "tokenizer", "trainer"]
    assert "optimizer" in load_checkpoint(ck.dir / "last.pt")  # the full state, for --resume


class Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Boom()}, path)  # pickles os.system
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()
    path.write_bytes(pickle.dumps({"model": Boom()}))  # a plain pickle, not even a torch zip
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


# ---- format versions -------------------------------------------------------------------------------------


def test_every_saved_checkpoint_carries_format_version_2(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=1)
    ck.save({"model": {"w": torch.ones(2)}, "trainer": {"epoch": 1}}, epoch_tag=1, is_best=True)
    for name in ("last.pt", "best.pt", "epoch_0001.pt"):
        raw = torch.load(ck.dir / name, weights_only=True)
        assert raw["format_version"] == 2, name
        assert "format_version" not in load_checkpoint(ck.dir / name)  # the loaded dict is the payload alone


def test_a_checkpoint_without_format_version_is_version_1_and_loads(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"model": {"w": torch.arange(3.0)}, "config": {"model": {"name": "tiny_vse"}}}, path)  # no number
    back = load_checkpoint(path)
    assert sorted(back) == ["config", "model"] and torch.equal(back["model"]["w"], torch.arange(3.0))


def test_a_newer_format_is_refused_in_one_line_naming_the_file_and_both_versions(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"model": {"w": torch.ones(1)}, "format_version": 3}, path)
    with pytest.raises(NewerCheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == (
        f"checkpoint {path} is format_version 3, newer than this crossmatch reads (format_version 2): "
        "upgrade crossmatch to load it"
    )
    assert isinstance(err.value, CheckpointError)  # the CLI's one-line checkpoint errors cover it
    torch.save({"model": {"w": torch.ones(1)}, "format_version": "2"}, path)
    with pytest.raises(CheckpointError, match=r"format_version '2' is not a format version"):
        load_checkpoint(path)


def test_a_resume_stops_at_a_newer_last_pt_rather_than_fall_back(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=1)
    ck.save({"model": {"w": torch.ones(2)}}, epoch_tag=1)
    torch.save({"model": {"w": torch.full((2,), 2.0)}, "format_version": 3}, ck.dir / "last.pt")  # a newer crossmatch
    with pytest.raises(NewerCheckpointError, match="last.pt is format_version 3"):
        ck.load_latest()  # epoch_0001.pt is readable, but resuming from it would overwrite the newer run's progress


@pytest.mark.slow
def test_resume_after_an_epoch_gives_identical_weights(shapes_root, tmp_path):
    run_train(helpers.resume_cfg(shapes_root, "train.epochs=2"), tmp_path / "full")
    run_train(helpers.resume_cfg(shapes_root, "train.epochs=1"), tmp_path / "split")
    state = run_train(helpers.resume_cfg(shapes_root, "train.epochs=2"), tmp_path / "split", resume=True)
    assert state.epoch == 2 and state.global_step == 8 and len(state.history) == 2
    a, b = helpers.last_weights(tmp_path / "full"), helpers.last_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    full_hist = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["trainer"]["history"]
    assert full_hist == state.history


@pytest.mark.slow
def test_resume_mid_epoch_gives_identical_weights(shapes_root, tmp_path, monkeypatch):
    run_train(helpers.resume_cfg(shapes_root, "train.epochs=1"), tmp_path / "full")
    cut = helpers.resume_cfg(shapes_root, "train.epochs=1", "checkpoint.every_steps=1")
    helpers.train_interrupted(monkeypatch, lambda: run_train(cut, tmp_path / "cut"), after=3)  # a kill after step 3
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["trainer"]["step_in_epoch"] == 3
    run_train(
        helpers.resume_cfg(shapes_root, "train.epochs=1", "checkpoint.every_steps=1"), tmp_path / "cut", resume=True
    )
    a, b = helpers.last_weights(tmp_path / "full"), helpers.last_weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_config_diff_names_real_changes_only():
    from crossmatch.runs.lifecycle import _diff

    saved = {"train": {"epochs": 36}, "model": {"vocab_size": 74, "embed_dim": 1024}, "data": {"image_mean": [0.5]}}
    # the new run leaves the build-time keys unset: they are no change; a key it sets differently is one
    new = {"train": {"epochs": 46}, "model": {"vocab_size": None, "embed_dim": 512}, "data": {"image_mean": []}}
    assert _diff(saved, new) == ["model.embed_dim: 1024 -> 512", "train.epochs: 36 -> 46"]
    assert _diff(saved, saved) == []
