"""Nothing lost, nothing wrong, one line instead of a traceback: the life of a run (a start that fails touches
nothing, `--overwrite` keeps the old run until the new one has a checkpoint, a refused `--resume` rewrites
nothing), indexes that refuse a model that did not build them, settings that would make a useless run, images
shared by train and test, the ONNX opset, and config values outside the ranges declared beside their fields.

Each test's docstring states the promise it keeps."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch

from crossmatch.cli.main import main
from crossmatch.engine.checkpoint import atomic_save, load_checkpoint
from crossmatch.errors import CheckpointError, ConfigError
from tests.helpers import error_line, save_tiny_checkpoint, tiny_cfg, train_args, train_interrupted, write_karpathy

RUN_FILES = ("config.yaml", "tokenizer.json", "metrics.jsonl", "train.log", "checkpoints/last.pt")


def snapshot(run: Path) -> dict[str, bytes]:
    """The bytes of a run's files (what must survive a refused start)."""
    return {name: (run / name).read_bytes() for name in RUN_FILES}


# ---- 1-3. a start that fails touches nothing ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, culprit",
    [
        ("data.root={missing}", "dataset file not found"),
        ("eval.folds=5", "eval.folds=5"),  # 12 val images
        ("eval.first_stage={missing}/best.pt", "eval.first_stage="),
        ("train.accum_steps=50", "train.accum_steps=50"),
        ("model.embed_dim=0", "model.embed_dim=0"),
    ],
)
def test_overwrite_with_a_bad_setting_keeps_the_old_run(shapes_root, run_copy, tmp_path, capsys, override, culprit):
    """`train --overwrite` that is refused (any setting: data, eval protocol, schedule, model) leaves the old
    run's checkpoints, config, tokenizer and logs exactly as they were."""
    before = snapshot(run_copy)
    override = override.format(missing=tmp_path / "missing")
    assert main(train_args(shapes_root, run_copy, "--overwrite", override)) == 2
    assert culprit in error_line(capsys)
    assert snapshot(run_copy) == before
    assert not (run_copy / ".replaced").exists()


@pytest.mark.slow
def test_overwrite_gets_the_old_run_back_until_the_new_one_writes_a_checkpoint(shapes_root, run_copy, monkeypatch):
    """`--overwrite` deletes the old run only once the new run's first checkpoint is written: a new run that
    dies before that gets the old run back; one that dies after it keeps its own checkpoint."""
    from crossmatch.runs import train

    before = snapshot(run_copy)
    cfg = tiny_cfg(shapes_root, "checkpoint.every_steps=1")
    train_interrupted(monkeypatch, lambda: train(cfg, run_copy, overwrite=True), after=0)  # killed before step 1
    assert snapshot(run_copy) == before and not (run_copy / ".replaced").exists()
    train_interrupted(monkeypatch, lambda: train(cfg, run_copy, overwrite=True), after=1)  # after last.pt of step 1
    assert not (run_copy / ".replaced").exists() and not (run_copy / "checkpoints" / "epoch_0001.pt").exists()
    assert load_checkpoint(run_copy / "checkpoints" / "last.pt")["trainer"]["global_step"] == 1


def test_a_killed_overwrite_is_finished_at_the_next_start(tmp_path):
    """A `.replaced` folder left by a killed `--overwrite` is put back at the next start when the new run wrote
    no checkpoint, and deleted when it did."""
    from crossmatch.engine.rundir import SetAside
    from crossmatch.runs import RUN_FILES as NAMES

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_text("old")
    (run / "config.yaml").write_text("old")
    SetAside(run, NAMES).move()
    (run / "train.log").write_text("new, killed before a checkpoint")
    SetAside(run, NAMES).recover()
    assert (run / "checkpoints" / "last.pt").read_text() == "old" and (run / "config.yaml").read_text() == "old"
    assert not (run / "train.log").exists() and not (run / ".replaced").exists()
    SetAside(run, NAMES).move()
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_text("new")
    SetAside(run, NAMES).recover()
    assert (run / "checkpoints" / "last.pt").read_text() == "new" and not (run / ".replaced").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, culprit",
    [
        ("model.name=tiny_scan", "holds a tiny_vse model"),
        ("model.embed_dim=24", "does not fit this run"),
    ],
)
def test_a_refused_resume_rewrites_nothing(shapes_root, run_copy, capsys, override, culprit):
    """A `--resume` refused because the config does not match the checkpoint leaves config.yaml, tokenizer.json,
    train.log and the checkpoints as they were."""
    before = snapshot(run_copy)
    assert main(train_args(shapes_root, run_copy, "--resume", "train.epochs=2", override)) == 2
    assert culprit in error_line(capsys)
    assert snapshot(run_copy) == before


@pytest.mark.parametrize(
    "override, culprit",
    [
        ("eval.folds=5", "divide the number of images (12)"),
        ("eval.first_stage={tmp}/nothing.pt", "no such checkpoint"),
        ("eval.first_stage={first}", "validation would measure only the first stage"),
    ],
)
def test_eval_settings_are_refused_before_the_first_step(shapes_root, tmp_path, capsys, override, culprit):
    """Every eval setting that depends on the data or the model (folds that divide the split, a first stage that
    exists and is re-ranked) is refused before the first training step: no run folder is left."""
    first = save_tiny_checkpoint(tmp_path / "first.pt", "tiny_vse")
    override = override.format(tmp=tmp_path, first=first)
    run = tmp_path / "run"
    assert main(train_args(shapes_root, run, override)) == 2
    assert culprit in error_line(capsys)
    assert not run.exists()


def test_a_run_dir_that_is_a_file_is_one_line(shapes_root, tmp_path, capsys):
    """`--run-dir` naming a file is refused in one line, and the file is untouched."""
    (tmp_path / "file").write_text("mine")
    assert main(train_args(shapes_root, tmp_path / "file")) == 2
    assert "is a file, not a folder" in error_line(capsys)
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.slow
def test_a_stray_epoch_file_is_neither_read_nor_pruned(shapes_root, run_copy, capsys):
    """A file in checkpoints/ named like an epoch checkpoint but without a number (epoch_best.pt) does not break
    `--resume`, and the pruning of old epoch files leaves it alone."""
    (run_copy / "checkpoints" / "epoch_best.pt").write_text("a user's file")
    assert main(train_args(shapes_root, run_copy, "--resume", "train.epochs=2", "checkpoint.keep_last=1")) == 0
    names = sorted(p.name for p in (run_copy / "checkpoints").glob("epoch_*.pt"))
    assert names == ["epoch_0002.pt", "epoch_best.pt"]


# ---- 4. an index answers only to the model that built it --------------------------------------------------


def _edit(src: Path, dst: Path, edit) -> Path:
    ckpt = load_checkpoint(src)
    edit(ckpt)
    atomic_save(ckpt, dst)
    return dst


def _bump(prefix: str):
    def edit(ckpt):
        w = ckpt["model"][f"{prefix}.weight"]
        ckpt["model"][f"{prefix}.weight"] = w + 0.01

    return edit


@pytest.fixture(scope="module")
def indexed(shapes_root, tmp_path_factory) -> dict[str, Path]:
    """A tiny_vse checkpoint `a` (random weights), its index over 6 images, and checkpoints that differ from it:
    `image` (image projection changed), `text` (text projection changed), `copy` (a copy elsewhere)."""
    tmp = tmp_path_factory.mktemp("indexed")
    images = tmp / "images"
    images.mkdir()
    for f in sorted((shapes_root / "images").iterdir())[:6]:
        shutil.copy(f, images / f.name)
    a = save_tiny_checkpoint(tmp / "a.pt", "tiny_vse")
    out = {"a": a, "images": images, "index": tmp / "index"}
    out["image"] = _edit(a, tmp / "image.pt", _bump("image_proj"))
    out["text"] = _edit(a, tmp / "text.pt", _bump("text_proj"))
    (tmp / "moved").mkdir()
    out["copy"] = Path(shutil.copy(a, tmp / "moved" / "a.pt"))
    assert main(["index", "build", str(a), str(images), "--out", str(out["index"])]) == 0
    return out


def test_an_index_refuses_a_model_whose_image_side_did_not_build_it(indexed, capsys):
    """`index query --checkpoint` with other image-side weights is refused in one line; a moved copy of the same
    checkpoint, or one whose text side alone differs (a text tower tuned against frozen image rows), is
    searched."""
    query = ["index", "query", str(indexed["index"]), "--query", "a red circle"]
    assert main([*query, "--checkpoint", str(indexed["image"])]) == 2
    line = error_line(capsys)
    assert "was not built by the image weights and preprocessing of" in line and "image.pt" in line
    for ok in ("copy", "text"):
        assert main([*query, "--checkpoint", str(indexed[ok])]) == 0, ok
        assert len(capsys.readouterr().out.strip().splitlines()) == 6
    assert "weights_sha256" in json.loads((indexed["index"] / "meta.json").read_text())


def test_an_index_whose_checkpoint_was_retrained_is_refused(indexed, tmp_path, capsys):
    """After the index's own checkpoint file is replaced by other weights (a run retrained with --overwrite),
    `index query` without --checkpoint is refused in one line."""
    index = tmp_path / "index"
    shutil.copytree(indexed["index"], index)
    ckpt = Path(shutil.copy(indexed["a"], tmp_path / "a.pt"))
    meta = json.loads((index / "meta.json").read_text())
    (index / "meta.json").write_text(json.dumps({**meta, "checkpoint": str(ckpt)}))
    assert main(["index", "query", str(index), "--query", "a red circle"]) == 0
    capsys.readouterr()
    _edit(indexed["image"], ckpt, lambda c: None)  # retrained in place
    assert main(["index", "query", str(index), "--query", "a red circle"]) == 2
    assert "was not built by the image weights" in error_line(capsys)


def test_a_scan_checkpoint_is_refused_by_index_query(indexed, tmp_path, capsys):
    """A model that does not embed images as single vectors (SCAN) given to `index query` is one line."""
    scan = save_tiny_checkpoint(tmp_path / "scan.pt", "tiny_scan")
    assert main(["index", "query", str(indexed["index"]), "--query", "a red circle", "--checkpoint", str(scan)]) == 2
    assert "cannot be indexed" in error_line(capsys)


def _truncate(index: Path) -> None:
    data = (index / "embeddings.npy").read_bytes()
    (index / "embeddings.npy").write_bytes(data[: len(data) // 2])


def _meta_without_embed_dim(index: Path) -> None:
    meta = json.loads((index / "meta.json").read_text())
    del meta["embed_dim"]
    (index / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "damage, culprit",
    [
        (_truncate, "embeddings.npy is missing or damaged"),
        (lambda i: (i / "embeddings.npy").unlink(), "embeddings.npy is missing or damaged"),
        (lambda i: (i / "paths.json").unlink(), "paths.json is missing or damaged"),
        (lambda i: (i / "paths.json").write_text("[1, 2"), "paths.json is missing or damaged"),
        (lambda i: (i / "paths.json").write_text('{"a": 1}'), "paths.json is not a list of image paths"),
        (lambda i: (i / "paths.json").write_text('["x.png"]'), "does not match 1 paths"),
        (_meta_without_embed_dim, "meta.json has no valid embed_dim"),
    ],
)
def test_damaged_index_folders_are_one_line(indexed, tmp_path, capsys, damage, culprit):
    """A damaged index folder (truncated or missing embeddings.npy, missing or broken paths.json, meta.json
    without embed_dim) is one line naming the file, not a traceback."""
    index = tmp_path / "index"
    shutil.copytree(indexed["index"], index)
    damage(index)
    assert main(["index", "query", str(index), "--query", "a red circle"]) == 2
    assert culprit in error_line(capsys)


def test_evaluate_with_a_first_stage_alone_says_whose_metrics_they_are(indexed, shapes_root, tmp_path, capsys):
    """`evaluate R eval.first_stage=R2` without re-ranking prints R2's metrics under R2's name (the first stage
    alone), never under R's."""
    r, r2 = str(indexed["image"]), str(indexed["a"])
    data = f"data.root={shapes_root}"
    assert main(["evaluate", r2, data, "--json", str(tmp_path / "r2.json")]) == 0
    capsys.readouterr()
    assert main(["evaluate", r, data, f"eval.first_stage={r2}", "--json", str(tmp_path / "r.json")]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith(f"first stage {r2} alone (not re-ranked by tiny_vse)"), header
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads((tmp_path / "r2.json").read_text())


# ---- 5. settings that would make a useless run ---------------------------------------------------------


@pytest.mark.parametrize(
    "override, culprit",
    [
        ("model.embed_dim=0", "model.embed_dim=0: must be at least 1"),
        ("train.accum_steps=20", "train.accum_steps=20: an epoch has 12 batches of 16"),  # 200 captions
        ("data.min_word_freq=1000", "data.min_word_freq=1000: no word occurs that often in the 200 train captions"),
    ],
)
def test_settings_that_would_make_a_useless_run_are_refused(shapes_root, tmp_path, capsys, override, culprit):
    """Values that would train nothing (no embedding, no optimizer step in an epoch, a vocabulary of no word)
    are refused before the run folder is made."""
    assert main(train_args(shapes_root, tmp_path / "run", override)) == 2
    assert culprit in error_line(capsys)
    assert not (tmp_path / "run").exists()


# ---- 6. the same image in train and test -----------------------------------------------------------------


def _shared_dataset(root: Path, spelling: str) -> Path:
    """Train images 000-003 and test images 004-005, where test image 004 is train image 000 under `spelling`."""
    entries = [{"split": "train", "captions": [f"a shape number {i}", f"shape {i} again"]} for i in range(4)]
    entries += [{"split": s, "captions": [f"a {s} shape {i}"]} for s, i in (("test", 4), ("test", 5), ("val", 6))]
    write_karpathy(root, entries)
    doc = json.loads((root / "dataset.json").read_text())
    doc["images"][4]["filename"] = spelling
    (root / "dataset.json").write_text(json.dumps(doc))
    (root / "images" / "link.png").symlink_to(root / "images" / "000.png")
    return root


@pytest.mark.parametrize("spelling", ["000.png", "./000.png", "link.png"])
def test_an_image_in_train_and_test_is_refused_unless_allowed(tmp_path, capsys, caplog, monkeypatch, spelling):
    """The same image (the same resolved path: a second listing, another spelling, a symlink) in the train split
    and an evaluation split is refused in one line by train and evaluate; `data.allow_split_overlap=true`
    evaluates with a warning."""
    root = _shared_dataset(tmp_path / "data", spelling)
    ckpt = str(save_tiny_checkpoint(tmp_path / "c.pt", "tiny_vse"))
    assert main(train_args(root, tmp_path / "run", "train.batch_size=2", "data.image_size=16")) == 2
    assert "1 image(s) of the test split are also in the train split" in error_line(capsys)
    assert not (tmp_path / "run").exists()
    assert main(["evaluate", ckpt, f"data.root={root}"]) == 2
    assert "000.png): its metrics would be inflated" in error_line(capsys)
    monkeypatch.setattr(logging.getLogger("crossmatch"), "propagate", True)  # to caplog, whatever ran before
    assert main(["evaluate", ckpt, f"data.root={root}", "data.allow_split_overlap=true"]) == 0
    assert "also in the train split" in caplog.text and "(data.allow_split_overlap=true)" in caplog.text


def test_shard_samples_are_the_same_image_by_shard_and_key(tmp_path):
    """For webdataset shards "the same image" is the same shard file and key: equal keys in two shards are
    different images."""
    from crossmatch.data.shards import shard_key
    from crossmatch.runs import image_identities

    class Split:
        def __init__(self, keys):
            self.image_keys = keys

    train = Split([shard_key(str(tmp_path / "a.tar"), "000"), shard_key(str(tmp_path / "b.tar"), "001")])
    test = Split([shard_key(str(tmp_path / "b.tar"), "000"), shard_key(str(tmp_path / "a.tar"), "000")])
    assert image_identities(train) & image_identities(test) == {f"{tmp_path / 'a.tar'}/000"}


# ---- 9. export ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [11, 17])
def test_an_onnx_graph_is_of_the_opset_asked_for_or_refused(tmp_path, opset):
    """`export --opset N` writes graphs of opset N (the manifest records N once both are written), or is refused
    in one line, writing nothing, when torch's exporter cannot convert to N (it writes 18, then converts)."""
    onnx = pytest.importorskip("onnx")
    from crossmatch.search.export import _export_graph

    path = tmp_path / "g.onnx"
    names = {"inputs": ["image"], "outputs": ["embed"]}
    args = (torch.randn(2, 4),)
    if opset == 11:
        with pytest.raises(ConfigError, match="--opset 11: the exporter can only write opset 18; choose --opset 18"):
            _export_graph(torch.nn.Linear(4, 3), args, path, names, opset)
        assert not path.exists()
        return
    _export_graph(torch.nn.Linear(4, 3), args, path, names, opset)
    assert [o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")] == [17]


def test_an_output_that_is_a_symlink_has_its_target_written(tmp_path):
    """Every file crossmatch writes (checkpoints, configs, manifests, ONNX graphs: one `atomic_write`) through a
    symlink writes the link's target and leaves the link in place."""
    from crossmatch.files import write_text

    target, link = tmp_path / "elsewhere" / "manifest.json", tmp_path / "out" / "crossmatch_onnx.json"
    target.parent.mkdir()
    link.parent.mkdir()
    target.write_text("old")
    link.symlink_to(target)
    write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    dangling = tmp_path / "out" / "dangling.json"
    dangling.symlink_to(tmp_path / "elsewhere" / "created.json")
    write_text(dangling, "made")
    assert dangling.is_symlink() and (tmp_path / "elsewhere" / "created.json").read_text() == "made"


# ---- 10 and 14. config ranges, interpolations, damaged checkpoints ----------------------------------------


@pytest.mark.parametrize(
    "override, culprit",
    [
        ("train.seed=-1", "train.seed=-1: must be >= 0 and at most 4294967295"),
        ("train.seed=4294967296", "train.seed=4294967296"),
        ("data.image_mean=[0.5,0.5]", "data.image_mean=[0.5, 0.5]: must be [] or three numbers"),
        (
            "data.image_std=[0.5,0,0.5]",
            "data.image_std=[0.5, 0.0, 0.5]: must be [] or three numbers [R, G, B], each > 0",
        ),
        ("data.image_size=4", "model.image_size=4: the 3-stage CNN needs at least 8 px"),
        ("model.embed_dim=-8", "model.embed_dim=-8: must be at least 1"),
        ("model.word_dim=0", "model.word_dim=0: must be at least 1"),
        ("train.grad_clip=nan", "train.grad_clip=nan: must be a finite number"),
        ("train.layer_decay=2", "train.layer_decay=2.0: must be > 0 and at most 1"),
        ("train.epochs=${nope}", "Interpolation key 'nope' not found"),
        ("data.root=${oc.env:CROSSMATCH_NOT_SET}", "Environment variable 'CROSSMATCH_NOT_SET' not found"),
    ],
)
def test_config_values_outside_their_ranges_are_one_line(shapes_root, tmp_path, capsys, override, culprit):
    """Config values outside the ranges declared beside their fields (model configs included), image sizes too
    small for the model, and interpolations that do not resolve are one line, before the run folder is made."""
    assert main(train_args(shapes_root, tmp_path / "run", override)) == 2
    assert culprit in error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "model, override, culprit",
    [
        ("tiny_vilt", "data.image_size=4", "model.image_size=4: must be >= patch_size (8)"),
        ("tiny_albef", "data.image_size=6", "model.image_size=6: must be >= patch_size (8)"),
        ("tiny_scan", "data.image_size=4", "data.image_size=4: too small for model tiny_scan"),
        ("tiny_scan", "model.lambda_lse=0", "model.lambda_lse=0: must be > 0"),
    ],
)
def test_model_sizes_are_checked_against_their_declared_ranges(shapes_root, tmp_path, capsys, model, override, culprit):
    """Each model family's config is checked against its declared ranges, including a bound named by another
    field (image_size >= patch_size), and a size its image tower cannot take."""
    assert main(train_args(shapes_root, tmp_path / "run", f"model.name={model}", override)) == 2
    assert culprit in error_line(capsys)


def test_a_recursive_interpolation_is_one_line(tmp_path, capsys):
    """A config whose `${...}` interpolations refer to each other is one line, not a RecursionError."""
    (tmp_path / "loop.yaml").write_text("train:\n  epochs: ${train.batch_size}\n  batch_size: ${train.epochs}\n")
    assert main(["train", str(tmp_path / "loop.yaml"), "--run-dir", str(tmp_path / "run")]) == 2
    assert "Recursive interpolation" in error_line(capsys)


def _ranged_fields():
    """(section path, dataclass, field) of every field with declared rules, run config and model configs."""
    import crossmatch.models  # noqa: F401 - registers the families
    from crossmatch.config import RunConfig
    from crossmatch.models import registry

    roots = [("", RunConfig())]
    for name in ("tiny_vse", "tiny_scan", "tiny_albef", "tiny_vilt"):
        roots.append(("model", registry.model_config(name)))
    out = []
    while roots:
        prefix, obj = roots.pop()
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                roots.append((f"{prefix}.{f.name}".strip("."), value))
            elif f.metadata.get("rules"):
                out.append((prefix, obj, f))
    return out


def test_every_declared_bound_is_enforced():
    """Every field with a declared lower or upper bound refuses the value just outside it, naming `section.key`,
    and accepts the bound itself (the defaults keep every rule)."""
    from crossmatch.config import check_fields

    fields = _ranged_fields()
    assert len(fields) >= 60
    checked = 0
    for prefix, obj, f in fields:
        check_fields(obj, prefix)  # the defaults keep every rule
        rules = f.metadata["rules"]
        for bound, step in (("min", -1), ("above", 0), ("max", 1)):
            limit = rules.get(bound)
            if limit is None:
                continue
            limit = getattr(obj, limit) if isinstance(limit, str) else limit
            if isinstance(getattr(obj, f.name), int) and not isinstance(limit, float):
                outside = limit + step
            else:
                outside = limit + (step or -1) * max(1e-6, abs(limit) * 1e-6)
            with pytest.raises(ConfigError, match=rf"^{prefix}\.{f.name}="):
                check_fields(dataclasses.replace(obj, **{f.name: outside}), prefix)
            checked += 1
    assert checked >= 60


def test_a_large_seed_trains(shapes_root, tmp_path):
    """train.seed anywhere in its declared range (0 to 2**32 - 1) seeds a run; the per-item augmentation seeds
    derived from it do not overflow."""
    from crossmatch.config import MAX_SEED
    from crossmatch.data.datasets import PairView
    from crossmatch.data.loaders import EpochSampler
    from crossmatch.data.transforms import transform_from_config
    from crossmatch.runs import build_run_tokenizer, open_split, resolve_preprocess

    cfg = resolve_preprocess(tiny_cfg(shapes_root, f"train.seed={MAX_SEED}"), torch.nn.Module())
    ds = open_split(cfg, "train")
    pairs = PairView(ds, build_run_tokenizer(cfg, lambda: ds.captions), transform_from_config(cfg.data, train=True))
    sampler = EpochSampler(len(pairs), seed=MAX_SEED)
    sampler.set_epoch(3)
    first = next(iter(sampler))
    assert first[1] > 2**64  # the case that overflowed torch's generator
    assert pairs[first]["image"].shape == (3, 32, 32)


def _nan(ckpt):
    ckpt["model"]["image_proj.weight"][0, 0] = math.nan


@pytest.mark.parametrize(
    "edit, culprit",
    [
        (lambda c: c.update(model=[1, 2]), "its 'model' entry is a list, not a dict of named tensors"),
        (lambda c: c["model"].update(extra=3), "its 'model' entry holds 'extra', a int, not a tensor"),
        (lambda c: c.update(tokenizer=7), "its 'tokenizer' entry is a int, not a str"),
        (lambda c: c.update(config="x"), "its 'config' entry is a str, not a dict"),
        (_nan, "weight image_proj.weight holds NaN or infinite values"),
    ],
)
def test_checkpoints_with_wrong_entries_or_nan_weights_are_one_line(indexed, tmp_path, capsys, edit, culprit):
    """A checkpoint whose `model`, `config` or `tokenizer` entry has the wrong type, or whose weights hold NaN, is
    refused in one line naming the file (evaluate, index, search, resume alike: the loader checks it)."""
    bad = _edit(indexed["a"], tmp_path / "bad.pt", edit)
    assert main(["evaluate", str(bad)]) == 2
    line = error_line(capsys)
    assert culprit in line and "bad.pt" in line
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(bad)


def test_resume_falls_back_from_a_last_pt_with_nan_weights(tmp_path, caplog, monkeypatch):
    """On resume, a last.pt with NaN weights is skipped like a damaged one: the newest finite checkpoint wins."""
    from crossmatch.engine.checkpoint import Checkpointer

    monkeypatch.setattr(logging.getLogger("crossmatch"), "propagate", True)  # to caplog, whatever ran before
    ck = Checkpointer(tmp_path, keep_last=1)  # an epoch file to fall back on
    good = {"model": {"w": torch.ones(2)}, "trainer": {"epoch": 1}, "config": {}, "tokenizer": "t"}
    ck.save(good, epoch_tag=1)
    atomic_save({**good, "model": {"w": torch.tensor([1.0, float("nan")])}}, ck.dir / "last.pt")
    ckpt, path = ck.load_latest()
    assert path.name == "epoch_0001.pt" and torch.equal(ckpt["model"]["w"], torch.ones(2))
    assert "holds NaN" in caplog.text
