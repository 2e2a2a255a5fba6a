"""WebDataset shards (`data.format: webdataset`): conversion and validation, the deterministic sharded
stream and its exact resume, one-line errors naming shard and key, and a SIGKILLed run through the CLI
resuming to bitwise-identical weights."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("webdataset")

from crossmatch.cli.main import main  # noqa: E402
from crossmatch.config import DataConfig  # noqa: E402
from crossmatch.data.formats import open_split  # noqa: E402
from crossmatch.data.shard_stream import build_shard_loader  # noqa: E402
from crossmatch.data.tokenizer import CaptionTokenizer  # noqa: E402
from crossmatch.data.transforms import build_image_transform  # noqa: E402
from crossmatch.engine.checkpoint import load_checkpoint  # noqa: E402
from crossmatch.errors import ConfigError, DataError  # noqa: E402
from crossmatch.models.protocols import ResumableLoader  # noqa: E402
from tests.helpers import ROOT, write_tar  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT / "src")}


@pytest.fixture(scope="module")
def shards(shapes_root, tmp_path_factory) -> Path:
    """The shapes data as shards of 4 samples: 10 train, 3 val, 3 test."""
    out = tmp_path_factory.mktemp("wds") / "shards"
    assert main(["data", "convert", str(shapes_root), str(out), "--to", "webdataset", "--shard-size", "4"]) == 0
    return out


def test_convert_writes_shards_that_validate_reads(shards, shapes_root, capsys):
    names = sorted(p.name for p in shards.glob("*.tar"))
    assert names[:3] == ["test-000000.tar", "test-000001.tar", "test-000002.tar"] and len(names) == 16
    with tarfile.open(shards / "train-000000.tar") as tar:
        members = tar.getnames()
        meta = json.loads(tar.extractfile(members[0]).read())
    assert members[:2] == ["00000000.json", "00000000.png"] and len(members) == 8  # 4 samples, image + json each
    source = json.loads((shapes_root / "dataset.json").read_text())["images"][0]
    assert meta["captions"] == [s["raw"] for s in source["sentences"]] and meta["split"] == "train"
    capsys.readouterr()
    assert main(["data", "validate", str(shards)]) == 0
    out = capsys.readouterr().out
    assert "format webdataset" in out and "no problems found" in out
    table = {ln.split()[0]: ln.split()[1:3] for ln in out.splitlines()[2:5]}
    assert table == {"train": ["40", "200"], "val": ["12", "60"], "test": ["12", "60"]}
    assert main(["data", "convert", str(shapes_root), str(shards), "--to", "webdataset"]) == 2  # never overwrites


def test_indexed_splits_from_shards_equal_the_json_ones(shards, shapes_root):
    from crossmatch.data.transforms import load_image

    ref = open_split(DataConfig(root=str(shapes_root)), "val")
    got = open_split(DataConfig(root=str(shards), format="webdataset"), "val")
    assert got.captions == ref.captions and got.txt_to_img == ref.txt_to_img and got.twins == ref.twins
    view = got.image_view(build_image_transform(32, train=False))
    assert torch.equal(view[3]["image"], build_image_transform(32, train=False)(load_image(ref.images[3].path)))
    train = open_split(DataConfig(root=str(shards), format="webdataset"), "train")
    assert train.num_pairs == 200 and train.num_images == 40 and len(train.shards) == 10
    assert sorted(train.captions) == sorted(open_split(DataConfig(root=str(shapes_root)), "train").captions)
    with pytest.raises(DataError, match="streamed for training"):
        train.images  # noqa: B018


def loader_for(shards: Path, workers: int, rank: int = 0, world: int = 1, batch: int = 8):
    data = open_split(DataConfig(root=str(shards), format="webdataset"), "train")
    tok = CaptionTokenizer.train(data.captions)
    transform = build_image_transform(32, train=True)
    kw = dict(batch_size=batch, seed=3, rank=rank, world_size=world, num_workers=workers, buffer_size=16)
    return build_shard_loader(data, tok, transform, **kw)


def take(loader, epoch: int, start: int, n: int) -> list[dict]:
    loader.set_epoch(epoch, start)
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_is_deterministic_and_resumes_exactly(shards, workers):
    a = loader_for(shards, workers)
    assert isinstance(a, ResumableLoader) and len(a) == 200 // 8 * 8 and a.steps == 200 // 8
    full = take(a, 1, 0, 25)
    again = take(loader_for(shards, workers), 1, 0, 25)
    assert all(
        torch.equal(x["image"], y["image"]) and torch.equal(x["text_idx"], y["text_idx"])
        for x, y in zip(full, again, strict=True)
    )
    seen = Counter(t for b in full for t in b["text_idx"].tolist())
    assert len(seen) > 150 and max(seen.values()) <= 2  # a shuffled epoch; wrap-around repeats are rare
    other = take(loader_for(shards, workers), 2, 0, 25)
    assert [b["text_idx"].tolist() for b in other] != [b["text_idx"].tolist() for b in full]  # epochs differ

    cut = loader_for(shards, workers)
    take(cut, 1, 0, 11)  # 11 batches consumed, then "killed"
    state = cut.state_dict()
    assert state["consumed"] == 11 and len(state["states"]) == max(1, workers)
    for saved in (state, None):  # stored position, and replay from the epoch start
        resumed = loader_for(shards, workers)
        if saved is not None:
            resumed.load_state_dict(json.loads(json.dumps(saved)))  # plain data, as a checkpoint keeps it
        rest = take(resumed, 1, 11 * 8, 14)
        for x, y in zip(full[11:], rest, strict=True):
            assert torch.equal(x["text_idx"], y["text_idx"]) and torch.equal(x["image"], y["image"])
            assert torch.equal(x["input_ids"], y["input_ids"])


def test_ranks_and_workers_read_disjoint_shards(shards):
    per_rank = [take(loader_for(shards, 2, rank, 2), 0, 0, 12) for rank in (0, 1)]  # 200 // (2 * 8) batches
    images = [{i for b in batches for i in b["image_idx"].tolist()} for batches in per_rank]
    assert not images[0] & images[1]  # each image (sample) lives in one shard, read by one rank
    with pytest.raises(ConfigError, match="10 shard.* 3 rank.* 4 loader worker"):
        loader_for(shards, 4, 0, 3)


def png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def test_bad_shards_are_one_line_errors_naming_shard_and_key(tmp_path, capsys):
    def error(*argv: str) -> str:
        capsys.readouterr()
        assert main(list(argv)) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("crossmatch: error: ")
        return lines[0]

    run = ["train", str(ROOT / "configs/vse_shapes.yaml"), "--run-dir", str(tmp_path / "run"), "data.format=webdataset"]
    good = {"a.png": png(), "a.txt": b"a red square", "b.png": png(), "b.txt": b"another red square"}
    nocap = tmp_path / "nocap"
    nocap.mkdir()
    write_tar(nocap / "s-0.tar", {**good, "c.png": png()})
    msg = error(*run, f"data.root={nocap}")
    assert f"shard {nocap / 's-0.tar'} key c" in msg and "without caption" in msg
    msg = error("data", "validate", str(nocap))
    assert "1 problem(s)" in msg and "key c" in msg

    broken = tmp_path / "broken"
    broken.mkdir()
    data = write_tar(tmp_path / "full.tar", {**good, "c.png": png() * 20, "c.txt": b"x"}).read_bytes()
    (broken / "s-0.tar").write_bytes(data[: len(data) - 2048 - 700])  # cut inside c.png's data
    msg = error(*run, f"data.root={broken}")
    assert f"shard {broken / 's-0.tar'} key c" in msg and "corrupt tar member" in msg

    msg = error(*run, f"data.root={tmp_path}/none-{{000..003}}.tar")
    assert "none-000.tar not found" in msg
    (tmp_path / "empty").mkdir()
    assert "no .tar shard matches" in error(*run, f"data.root={tmp_path / 'empty'}")


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    members = {}
    for i in range(16):
        members[f"{i:03d}.png"] = b"garbage" if i == 5 else png()
        members[f"{i:03d}.txt"] = f"caption {i}".encode()
    folder = tmp_path / "s"
    folder.mkdir()
    write_tar(folder / "a.tar", members)
    data = open_split(DataConfig(root=str(folder), format="webdataset"), "train")
    tok = CaptionTokenizer.train(data.captions)
    transform = build_image_transform(8, train=False)
    loader = build_shard_loader(data, tok, transform, batch_size=4, seed=0, buffer_size=1, skip_bad=True)
    batches = take(loader, 0, 0, 4)
    skipped = [s for b in batches for s in b.get("skipped", [])]
    assert skipped == [f"cannot decode image shard {folder / 'a.tar'} key 005: not an image"]  # load_image's words
    assert sum(len(b["image_idx"]) for b in batches) == 15


@pytest.mark.slow
def test_sigkill_mid_epoch_on_shards_then_resume_is_bitwise_identical(shards, tmp_path):
    cfg = [
        "train",
        str(ROOT / "configs/vse_shapes.yaml"),
        f"data.root={shards}",
        "data.format=webdataset",
        "data.num_workers=2",
        "data.shuffle_buffer=32",
        "data.image_size=32",
        "model.name=tiny_vse",
        "model.batch_norm=false",
        "eval.batch_size=16",
        "train.batch_size=8",
        "train.epochs=2",
        "train.max_steps_per_epoch=20",
        "train.log_every=1",
        "checkpoint.every_steps=1",
    ]

    def cmd(run_dir: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "crossmatch", *cfg, "--run-dir", str(run_dir), *extra]

    full = subprocess.run(cmd(tmp_path / "full"), capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    proc = subprocess.Popen(
        cmd(tmp_path / "cut"), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    log = tmp_path / "cut" / "train.log"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (log.is_file() and "epoch 1 step 7/20" in log.read_text()):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cut = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert cut["trainer"]["epoch"] == 0 and 7 <= cut["trainer"]["step_in_epoch"] < 20
    assert cut["loader"][0]["consumed"] == cut["trainer"]["step_in_epoch"]  # the stream position is stored
    resumed = subprocess.run(
        cmd(tmp_path / "cut", "--resume"), capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "replaying" not in (tmp_path / "cut" / "train.log").read_text()  # resumed from the stored position
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["trainer"]["history"] == b["trainer"]["history"]


@pytest.mark.slow
def test_two_rank_training_on_shards_stores_every_ranks_position(shards, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "crossmatch"]
    cmd = [*torchrun, "train", str(ROOT / "configs/vse_shapes.yaml"), "--run-dir", str(tmp_path / "run")]
    cmd += [f"data.root={shards}", "data.format=webdataset", "data.shuffle_buffer=16", "data.image_size=32"]
    cmd += ["model.name=tiny_vse", "model.batch_norm=false", "train.batch_size=4", "train.epochs=1"]
    cmd += ["train.max_steps_per_epoch=6", "checkpoint.every_steps=5", "eval.batch_size=16"]
    cmd += ["checkpoint.keep_last=1"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "epoch_0001.pt")
    assert len(ckpt["loader"]) == 2  # one position per rank, gathered into rank 0's checkpoint
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["trainer"]["epoch"] == 1 and all(p["epoch"] == 0 and p["consumed"] == 6 for p in last["loader"])
    assert ckpt["loader"][0]["states"] != ckpt["loader"][1]["states"]  # ranks read different shards
