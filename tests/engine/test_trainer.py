"""Engine promises: safetensors export and crossmatch.load, --init-from partial loading with a report,
NaN stop with the last good checkpoint intact, unreadable-image skipping, precision and accumulation."""

import math
import warnings

import pytest
import torch

import crossmatch
from crossmatch.cli.main import main
from crossmatch.engine.checkpoint import load_checkpoint, partial_load
from crossmatch.models import create_model
from tests.helpers import train_args


def train(root, run_dir, *extra):
    # the tiny run, cut to one epoch of batch 8 with a log line every step
    small = ["train.epochs=1", "train.batch_size=8", "train.log_every=1", "eval.batch_size=16"]
    return main(train_args(root, run_dir, *small, *extra))


@pytest.mark.slow
def test_safetensors_export_rebuilds_the_same_model(shapes_root, tmp_path):
    assert train(shapes_root, tmp_path / "run", "checkpoint.safetensors=true") == 0
    ckpts = tmp_path / "run" / "checkpoints"
    from_pt, from_st = crossmatch.load(str(ckpts / "best.pt")), crossmatch.load(str(ckpts / "best.safetensors"))
    a, b = from_pt.state_dict(), from_st.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([from_st.tokenizer.encode("a small red circle")])
    emb = from_st.encode_text_features({"input_ids": ids, "attention_mask": ids != 0})["embed"]
    assert emb.shape == (1, 16) and from_st.run_config.model["name"] == "tiny_vse"


def test_partial_load_reports_everything_it_skips():
    src = create_model("tiny_vse", vocab_size=50, embed_dim=16)
    dst = create_model("tiny_vse", vocab_size=60, embed_dim=16)
    weights = {**src.state_dict(), "extra.weight": torch.ones(2)}
    del weights["text_proj.bias"]
    report = partial_load(dst, weights)
    assert report["unexpected"] == ["extra.weight"]
    assert report["missing"] == ["text_proj.bias"]
    assert report["mismatched"] == ["text_tower.embed.weight: (50, 8) -> (60, 8)"]
    assert torch.equal(dst.state_dict()["image_proj.weight"], src.state_dict()["image_proj.weight"])
    assert len(report["loaded"]) == len(src.state_dict()) - 2


@pytest.mark.slow
def test_init_from_logs_what_it_could_not_load(shapes_root, tmp_path):
    assert train(shapes_root, tmp_path / "a", "checkpoint.safetensors=true") == 0
    assert (
        train(
            shapes_root,
            tmp_path / "b",
            "model.embed_dim=12",
            "--init-from",
            str(tmp_path / "a" / "checkpoints" / "best.safetensors"),
        )
        == 0
    )
    log = (tmp_path / "b" / "train.log").read_text()
    assert "4 mismatched tensor(s) not loaded" in log and "image_proj.weight: (16, 128) -> (12, 128)" in log
    assert "initialised" in log


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(shapes_root, tmp_path, monkeypatch, capsys):
    from crossmatch.losses.triplet import TripletLoss

    real, calls = TripletLoss.forward, []

    def nan_at_third_step(self, scores, ids):
        calls.append(1)
        loss = real(self, scores, ids)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(TripletLoss, "forward", nan_at_third_step)
    assert train(shapes_root, tmp_path / "run", "checkpoint.every_steps=1") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "non-finite loss at epoch 1 step 3" in err and "triplet_loss=nan" in err
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["trainer"]["global_step"] == 2  # the state before the bad step
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_unreadable_images_fail_or_are_skipped_and_counted(shapes_copy, tmp_path, capsys):
    bad = sorted((shapes_copy / "images").iterdir())[0]  # imgid 0 is a train image
    bad.write_bytes(b"not a png")
    assert train(shapes_copy, tmp_path / "strict", "train.max_steps_per_epoch=0") == 2
    assert bad.name in capsys.readouterr().err
    assert train(shapes_copy, tmp_path / "lenient", "train.max_steps_per_epoch=0", "data.max_bad_samples=10") == 0
    log = (tmp_path / "lenient" / "train.log").read_text()
    assert "skipped 1 unreadable image(s)" in log
    state = load_checkpoint(tmp_path / "lenient" / "checkpoints" / "last.pt")["trainer"]
    assert state["skipped_samples"] == 5  # 5 captions of the broken image, each skipped once


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_saves_the_scaler(shapes_root, tmp_path, precision):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train(shapes_root, tmp_path / precision, f"train.precision={precision}", "eval.precision=same") == 0
    # fp16: the scaler skips the first steps (inf gradients at scale 2**16); the lr schedule must not run ahead
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    ckpt = load_checkpoint(tmp_path / precision / "checkpoints" / "last.pt")
    assert math.isfinite(ckpt["trainer"]["history"][0]["rsum"])
    assert bool(ckpt["scaler"]) == (precision == "fp16")


@pytest.mark.slow
def test_gradient_accumulation_consumes_micro_batches(shapes_root, tmp_path):
    assert train(shapes_root, tmp_path / "acc", "train.accum_steps=2", "train.max_steps_per_epoch=0") == 0
    state = load_checkpoint(tmp_path / "acc" / "checkpoints" / "last.pt")["trainer"]
    assert state["global_step"] == 200 // (8 * 2)  # 200 train captions, 16 per optimizer step


@pytest.mark.slow
def test_a_run_releases_its_train_log_when_it_ends(shapes_root, tmp_path):
    """Two runs in one process (and a failed start): each train.log holds its own run only, and what is logged
    after a run does not reach its file, nor fail once its folder is gone."""
    import logging
    import shutil

    from crossmatch import runs
    from crossmatch.errors import DataError
    from tests.helpers import tiny_cfg

    def file_handlers():
        return [h for h in logging.getLogger("crossmatch").handlers if isinstance(h, logging.FileHandler)]

    cfg = tiny_cfg(shapes_root, "train.epochs=1", "train.max_steps_per_epoch=1")
    runs.train(cfg, tmp_path / "a")
    assert file_handlers() == []
    runs.train(cfg, tmp_path / "b")
    first, second = (tmp_path / "a" / "train.log").read_text(), (tmp_path / "b" / "train.log").read_text()
    assert f"run dir {tmp_path / 'a'}" in first and f"run dir {tmp_path / 'b'}" not in first
    assert f"run dir {tmp_path / 'b'}" in second
    shutil.rmtree(tmp_path / "a")
    logging.getLogger("crossmatch.runs").warning("after the runs")  # no handler left pointing into a/
    assert "after the runs" not in second and not (tmp_path / "a").exists()
    with pytest.raises(DataError):  # a start that fails after its log is open: no dataset there
        runs.train(tiny_cfg(tmp_path / "no_data", "train.epochs=1"), tmp_path / "c")
    assert file_handlers() == [] and not (tmp_path / "c").exists()
