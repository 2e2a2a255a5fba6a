"""The Trainer's own contract: its config is the run's `train` section, the non-finite guard runs once per
optimizer step, and the train loader is driven through `ResumableLoader` only."""

from __future__ import annotations

import math
import multiprocessing
import os
import socket
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from crossmatch.config import LossConfig, RunConfig
from crossmatch.data.hard_batches import HardBatchSampler
from crossmatch.data.loaders import build_train_loader
from crossmatch.engine import trainer as trainer_mod
from crossmatch.engine.checkpoint import Checkpointer, load_checkpoint
from crossmatch.engine.distributed import DistInfo
from crossmatch.engine.logging import MetricLogger
from crossmatch.engine.optim import create_optimizer, create_scheduler
from crossmatch.engine.trainer import NonFiniteLossError, RunLoaders, RunSinks, Trainer
from crossmatch.losses.triplet import TripletLoss
from crossmatch.models import create_model
from crossmatch.models.protocols import ResumableLoader
from crossmatch.tasks import build_task

VOCAB = 20


def make_batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(n, 3, 32, 32, generator=g),
        "input_ids": torch.randint(5, VOCAB, (n, 4), generator=g),
        "attention_mask": torch.ones(n, 4, dtype=torch.bool),
        "image_idx": torch.arange(n),
    }


def make_trainer(tmp_path, cfg: RunConfig, loader=None) -> Trainer:
    torch.manual_seed(0)
    task = build_task(create_model("tiny_vse", vocab_size=VOCAB, image_size=32), LossConfig())
    opt = create_optimizer(task, cfg.train)
    sinks = RunSinks(Checkpointer(tmp_path, 1, enabled=False), MetricLogger(tmp_path, enabled=False))
    loader = loader if loader is not None else DataLoader(list(range(32)), batch_size=8)
    return Trainer(task, opt, create_scheduler(opt, cfg.train, 4), RunLoaders(loader), None, sinks, cfg, DistInfo())


def test_the_trainer_config_is_the_run_train_section_with_its_defaults(tmp_path):
    cfg = RunConfig()
    trainer = make_trainer(tmp_path, cfg)
    assert trainer.cfg is cfg.train and cfg.train.grad_clip == 2.0  # what every CLI run uses
    assert "grad_norm" in trainer.train_step([make_batch(8, 0)])  # clipping is on by default
    cfg.train.grad_clip = 0.0
    assert "grad_norm" not in make_trainer(tmp_path, cfg).train_step([make_batch(8, 0)])


# ---- the non-finite guard: once per optimizer step, before the weights change ------------------------------


class Pairs(Dataset):
    """n pairs of 32 px images and 4-token captions; item key (index, item seed) as the train samplers yield."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: tuple[int, int]) -> dict:
        i, _ = key
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(5, VOCAB, (4,), generator=g).tolist()
        return {"image": torch.randn(3, 32, 32, generator=g), "input_ids": ids, "image_idx": i, "text_idx": i}


def nan_loss_at(call: int, when: bool = True):
    """TripletLoss.forward that returns NaN at its `call`-th call (1-based) when `when`."""
    real, calls = TripletLoss.forward, []

    def forward(self, *args, **kwargs):
        calls.append(1)
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if when and len(calls) == call else loss

    return forward


@pytest.mark.parametrize("exact", [True, False], ids=["grad_cache", "per_micro_batch"])
def test_the_guard_syncs_once_per_optimizer_step_and_leaves_the_weights(tmp_path, monkeypatch, exact):
    cfg = RunConfig()
    cfg.train.accum_steps = 2
    trainer = make_trainer(tmp_path, cfg)
    monkeypatch.setattr(type(trainer.task), "exact_accumulation", property(lambda self: exact))
    reduces = []
    real_reduce = trainer_mod.all_reduce_max
    monkeypatch.setattr(trainer_mod, "all_reduce_max", lambda x: reduces.append(1) or real_reduce(x))
    trainer.train_step([make_batch(8, 0), make_batch(8, 1)])
    assert len(reduces) == 1  # one sync for two micro-batches
    before = {k: v.detach().clone() for k, v in trainer.task.named_parameters()}
    monkeypatch.setattr(TripletLoss, "forward", nan_loss_at(1))  # step 2: its first micro-batch, or its one loss
    trainer.state.step_in_epoch = 1
    with pytest.raises(NonFiniteLossError, match=r"^non-finite loss at epoch 1 step 2 \(triplet_loss=nan\); stopping"):
        trainer.train_step([make_batch(8, 2), make_batch(8, 3)])
    assert len(reduces) == 2
    after = dict(trainer.task.named_parameters())
    assert all(torch.equal(before[k], after[k]) for k in before)  # optimizer.step() never ran


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nan_on_rank_1(rank: int, world: int, folder: Path, port: int) -> None:
    """One gloo rank of a 4-step epoch that checkpoints every step; rank 1's loss is NaN at step 3."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        TripletLoss.forward = nan_loss_at(3, when=rank == 1)
        cfg = RunConfig()
        cfg.train.epochs, cfg.train.batch_size, cfg.checkpoint.every_steps = 1, 8, 1
        torch.manual_seed(0)
        task = build_task(create_model("tiny_vse", vocab_size=VOCAB, image_size=32), LossConfig())
        opt = create_optimizer(task, cfg.train)
        loader = build_train_loader(Pairs(64), 8, 0, rank=rank, world_size=world)  # 4 steps per rank
        sinks = RunSinks(Checkpointer(folder, 0, enabled=rank == 0), MetricLogger(folder, enabled=False))
        dist = DistInfo(rank=rank, local_rank=rank, world_size=world)
        trainer = Trainer(task, opt, create_scheduler(opt, cfg.train, 4), RunLoaders(loader), None, sinks, cfg, dist)
        try:
            trainer.fit()
        except NonFiniteLossError as err:
            (folder / f"rank{rank}.txt").write_text(str(err))
    finally:
        torch.distributed.destroy_process_group()


def test_a_nan_on_one_rank_stops_both_with_one_message_and_no_bad_checkpoint(tmp_path):
    ctx, port = multiprocessing.get_context("spawn"), _free_port()
    procs = [ctx.Process(target=_nan_on_rank_1, args=(r, 2, tmp_path, port)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    for p in procs:
        if p.is_alive():  # a rank left waiting in a collective: the guard failed
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    errors = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert errors[0] == errors[1] and "\n" not in errors[0]
    assert errors[0].startswith("non-finite loss at epoch 1 step 3 on rank 1 of 2 (triplet_loss=nan);")
    files = sorted((tmp_path / "checkpoints").iterdir())
    assert [f.name for f in files] == ["last.pt"]
    last = load_checkpoint(files[0])  # refuses NaN or infinite weights
    assert last["trainer"]["global_step"] == 2  # the last good step
    assert all(math.isfinite(v) for v in last["model"]["image_proj.weight"].flatten().tolist())


# ---- the train loader: a ResumableLoader, driven through that protocol only ------------------------------------


def test_the_indexed_and_hard_batch_loaders_are_resumable_loaders_with_whole_epoch_steps():
    groups, subs, images = [i % 4 for i in range(30)], list(range(30)), [i // 2 for i in range(30)]
    plain = build_train_loader(Pairs(30), 4, seed=0, rank=1, world_size=2)  # 15 items on rank 1: 3 batches
    hard = build_train_loader(Pairs(30), 4, 0, sampler=HardBatchSampler(groups, subs, images, 4, 0, 1, 2))
    for loader in (plain, hard):
        assert isinstance(loader, ResumableLoader)
        assert loader.steps == 3 and len(loader) == 3
        loader.set_epoch(2, start=8)  # a resumed epoch: 2 batches left, the epoch still has 3
        assert loader.steps == 3 and len(loader) == 1 and len(list(loader)) == 1
        assert loader.state_dict() == {}  # the position is the Trainer's step


def test_a_run_resumed_mid_epoch_reads_the_rest_of_it_then_whole_epochs(tmp_path, monkeypatch):
    cfg = RunConfig()
    cfg.train.epochs, cfg.train.batch_size = 2, 8
    seen = []
    monkeypatch.setattr(Trainer, "train_step", lambda self, b: seen.append(b[0]["image_idx"].tolist()) or {})
    full = make_trainer(tmp_path, cfg, build_train_loader(Pairs(64), 8, seed=0))
    full.fit()
    assert len(seen) == 16  # 2 epochs of 64 // 8
    want, seen[:] = list(seen), []
    resumed = make_trainer(tmp_path, cfg, build_train_loader(Pairs(64), 8, seed=0))
    resumed.state.step_in_epoch = resumed.state.global_step = 3  # as load_state_dict leaves it
    resumed.fit()
    assert seen == want[3:]  # the same batches from step 4 on, and epoch 2 whole (8 steps, not 5)
    assert resumed.state.global_step == 16


def test_progress_bars_are_drawn_by_the_main_rank_on_a_terminal_only(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, RunConfig())
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert trainer.show_progress
    trainer.dist = DistInfo(rank=1, world_size=2)
    assert not trainer.show_progress
    trainer.dist = DistInfo()
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert not trainer.show_progress


def test_a_finite_loss_with_infinite_gradients_stops_before_the_weights_change(tmp_path):
    """fp32 with clipping: an inf gradient would turn every clipped gradient into NaN (inf * 0) and the step
    would write NaN weights; the guard sees the gradient norm and stops first."""
    trainer = make_trainer(tmp_path, RunConfig())
    before = {k: v.detach().clone() for k, v in trainer.task.named_parameters()}
    first = next(p for p in trainer.task.parameters() if p.requires_grad)
    hook = first.register_hook(lambda g: g * float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"^non-finite gradients at epoch 1 step 1 \(.*grad_norm=(inf|nan)"):
        trainer.train_step([make_batch(8, 0)])
    hook.remove()
    after = dict(trainer.task.named_parameters())
    assert all(torch.equal(before[k], after[k]) for k in before)  # optimizer.step() never ran
    trainer.train_step([make_batch(8, 0)])  # the same batch without the hook is a normal step
    assert all(torch.isfinite(p).all() for p in trainer.task.parameters())
