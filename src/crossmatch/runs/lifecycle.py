"""The run folder's lifecycle: `train` checks the folder, builds and resumes everything before it writes there,
then opens the run (train.log, config.yaml, tokenizer.json, the run header), trains, and on a failed start
leaves the folder as it was (a run set aside by `--overwrite` comes back)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from crossmatch.config import RunConfig, config_from_dict, config_to_dict, save_config, validate_config
from crossmatch.data.datasets import PairView
from crossmatch.data.tokenizer import CaptionTokenizer
from crossmatch.data.transforms import describe_transform
from crossmatch.engine.checkpoint import Checkpointer, partial_load, read_weights
from crossmatch.engine.distributed import DistInfo, init_distributed
from crossmatch.engine.logging import close_run_log, hold_run_log, setup_logging
from crossmatch.engine.rundir import RunLock, SetAside
from crossmatch.engine.trainer import Trainer, TrainState
from crossmatch.errors import CheckpointError, ConfigError, DataError
from crossmatch.files import remove_orphans
from crossmatch.models.frozen_cache import warm_up
from crossmatch.runs.build import open_split
from crossmatch.runs.training import build_trainer

log = logging.getLogger(__name__)


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts, as 'key: old -> new'. A key the new
    config leaves unset (None, [] or "": resolved when the model is built, e.g. data.image_mean from the model,
    model.vocab_size from the tokenizer) is no change: the checkpoint stores its resolved value."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b and b not in (None, [], ""):
            out.append(f"{prefix}{k}: {a} -> {b}")
    return out


# What --overwrite removes.
RUN_FILES = ("checkpoints", "tb", "wandb", "metrics.jsonl", "train.log", "config.yaml", "tokenizer.json", "curves.png")


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a `--run-dir` that is a file, or a folder that holds another run's checkpoints unless told what
    to do with them: `resume` continues that run, `overwrite` replaces it (see SetAside). Reads only."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir} is a file, not a folder; choose another --run-dir")
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()) and not (resume or overwrite):
        raise ConfigError(
            f"{run_dir} already holds a run's checkpoints: add --resume to continue it, --overwrite to start "
            "it again, or choose another --run-dir"
        )


def log_run_header(trainer: Trainer, cfg: RunConfig, dist: DistInfo, run_dir: Path) -> None:
    """What a run is about to do: device, threads, parameters, data, preprocessing, schedule."""
    params = list(trainer.task.parameters())
    total, trainable = sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
    log.info("device %s (world size %d), %d CPU threads", dist.device, dist.world_size, torch.get_num_threads())
    log.info("model %s: %s parameters, %s trainable", cfg.model["name"], f"{total:,}", f"{trainable:,}")
    sizes = []
    for name in dict.fromkeys((cfg.data.train_split, cfg.data.val_split, cfg.data.test_split)):
        try:
            ds = open_split(cfg, name)
            sizes.append(f"{name} {len(ds.images)} images / {len(ds.captions)} captions")
        except DataError:
            sizes.append(f"{name} -")
    log.info("data %s (%s): %s", cfg.data.root, cfg.data.format, ", ".join(sizes))
    log.info("preprocessing: %s", describe_transform(cfg.data))
    log.info(
        "training %s: %d epochs x %d steps of %d pairs, run dir %s",
        cfg.model["name"],
        cfg.train.epochs,
        trainer.steps_per_epoch,
        cfg.train.batch_size * dist.world_size * trainer.micro_batches,
        run_dir,
    )


def train(
    cfg: RunConfig, run_dir: str | Path, resume: bool = False, init_from: str | None = None, overwrite: bool = False
) -> TrainState:
    """Train `cfg` in `run_dir`; with `resume`, continue from the newest readable checkpoint there, with
    `overwrite`, replace the run that is there. `init_from` (fine-tuning) loads the weights of another run
    whose names and shapes match.

    Lifecycle: data, model, task, optimizer, evaluator and resume state are built and every setting checked
    before the run folder is touched; a start that fails leaves it as it was (no new folder, no rewritten
    config.yaml). `overwrite` sets the old run aside and deletes it only once the new run has written its
    first checkpoint; a new run that fails before that gets the old one back."""
    validate_config(cfg)
    run_dir = Path(run_dir)
    check_run_dir(run_dir, resume, overwrite)
    dist = init_distributed(cfg.train.device)
    created = not run_dir.exists()
    lock = RunLock(run_dir).acquire() if dist.is_main else None  # one trainer per run dir
    aside = SetAside(run_dir, RUN_FILES)
    try:
        if dist.is_main:
            aside.recover()  # a folder left by a killed --overwrite
        check_run_dir(run_dir, resume, overwrite)
        try:
            trainer, cfg, latest = _build(cfg, run_dir, dist, resume, init_from)  # writes nothing in run_dir
            if overwrite and dist.is_main and (run_dir / "checkpoints").is_dir():
                aside.move()
                trainer.sinks.checkpointer.on_first_save = aside.discard
            _open_run(trainer, cfg, run_dir, dist, latest)
        except BaseException:
            _undo_start(run_dir, aside, created and dist.is_main)
            raise
        try:
            return trainer.fit()
        except BaseException:
            if trainer.sinks.checkpointer.on_first_save is not None:  # no checkpoint yet: the old run comes back
                trainer.close()
                _undo_start(run_dir, aside, False)
            raise
        finally:
            trainer.close()
    finally:
        close_run_log(run_dir)
        if lock is not None:
            lock.release()


def _undo_start(run_dir: Path, aside: SetAside, remove: bool) -> None:
    """After a failed start: release train.log, put a run set aside back, remove a folder this start made."""
    close_run_log(run_dir)
    aside.restore()
    if remove:
        shutil.rmtree(run_dir, ignore_errors=True)


def _build(
    cfg: RunConfig, run_dir: Path, dist: DistInfo, resume: bool, init_from: str | None
) -> tuple[Trainer, RunConfig, tuple[dict, Path] | None]:
    """The Trainer with its resumed or initial weights, its resolved config and the checkpoint it resumed
    from: everything that can refuse a start, with nothing written in `run_dir`."""
    hold_run_log(dist.is_main)  # console now, train.log (these lines first) once the start is accepted
    latest = _resume_point(cfg, run_dir) if resume else None
    init_weights = read_weights(init_from)["model"] if init_from and latest is None else None  # fail early
    tokenizer = None
    if latest is not None:
        try:
            tokenizer = CaptionTokenizer.from_str(latest[0]["tokenizer"], cfg.data.max_words)
        except (KeyError, DataError) as err:
            raise CheckpointError(f"cannot resume from {latest[1]}: {err}") from err
    trainer, cfg = build_trainer(cfg, run_dir, dist, tokenizer)
    if init_weights is not None:
        report = partial_load(trainer.model, init_weights)
        log.info("initialised %d tensors from %s", len(report["loaded"]), init_from)
        for kind in ("missing", "mismatched", "unexpected"):
            if report[kind]:
                n, names = len(report[kind]), ", ".join(report[kind])
                log.warning("--init-from %s: %d %s tensor(s) not loaded: %s", init_from, n, kind, names)
    if latest is not None:
        _load_resume_state(trainer, *latest)
    return trainer, cfg, latest


def _open_run(trainer: Trainer, cfg: RunConfig, run_dir: Path, dist: DistInfo, latest: tuple | None) -> None:
    """The accepted start: train.log, config.yaml and tokenizer.json, best files repaired, the run header."""
    setup_logging(run_dir, dist.is_main)
    if dist.is_main:
        for orphan in remove_orphans(run_dir / "checkpoints") + remove_orphans(run_dir):
            log.info("removed %s, left by an interrupted run", orphan)
        save_config(cfg, run_dir / "config.yaml")
        CaptionTokenizer.from_str(trainer.sinks.extra_state["tokenizer"]).save(run_dir / "tokenizer.json")
    if latest is not None:
        ckpt, path = latest
        trainer.sinks.checkpointer.repair_best(ckpt)
        log.info("resumed from %s at epoch %d, step %d", path, trainer.state.epoch + 1, trainer.state.step_in_epoch)
    log_run_header(trainer, cfg, dist, run_dir)
    pairs, steps = getattr(trainer.train_loader, "dataset", None), cfg.train.max_steps_per_epoch
    if isinstance(pairs, PairView) and (steps <= 0 or steps >= len(trainer.train_loader)):  # epochs see every image
        warm_up(trainer.model, pairs, cfg.train.batch_size, cfg.data.num_workers)  # the weights are final


def _resume_point(cfg: RunConfig, run_dir: Path) -> tuple[dict, Path] | None:
    """The checkpoint to resume from (None: start from scratch), checked against this run's model."""
    latest = Checkpointer(run_dir).load_latest()
    if latest is None:
        log.info("no checkpoint in %s: starting from scratch", run_dir / "checkpoints")
        return None
    ckpt, path = latest
    if "config" not in ckpt or "tokenizer" not in ckpt:
        raise CheckpointError(f"cannot resume from {path}: it has no config or tokenizer (not from crossmatch train)")
    old = ckpt["config"].get("model", {}).get("name")
    if old != cfg.model["name"]:
        raise CheckpointError(
            f"cannot resume from {path}: it holds a {old} model and the config asks for {cfg.model['name']} "
            "(resume with the same model.name, or train into another --run-dir)"
        )
    changed = _diff(config_to_dict(config_from_dict(ckpt["config"])), config_to_dict(cfg))
    if changed:
        log.warning("resuming with a config that differs from %s: %s", path, "; ".join(changed))
    return latest


def _load_resume_state(trainer: Trainer, ckpt: dict, path: Path) -> None:
    """Restore the trainer from `ckpt` (best.pt / best.safetensors are repaired once the start is accepted)."""
    try:
        trainer.load_state_dict(ckpt)
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        lines = str(err).strip().splitlines() or [type(err).__name__]
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise CheckpointError(f"cannot resume from {path}: it does not fit this run ({detail[:160]})") from err
