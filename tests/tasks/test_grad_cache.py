"""Gradient accumulation that equals the big batch (GradCache): accum 4 x 8 == batch 32 through the Trainer,
for the hinge, InfoNCE and SigLIP dual-encoder losses and ALBEF's objective; dropout replayed exactly."""

import contextlib

import pytest
import torch
from torch.utils.data import DataLoader

from crossmatch.config import LossConfig, RunConfig
from crossmatch.engine.checkpoint import Checkpointer
from crossmatch.engine.distributed import DistInfo
from crossmatch.engine.logging import MetricLogger
from crossmatch.engine.optim import create_optimizer, create_scheduler
from crossmatch.engine.trainer import RunLoaders, RunSinks, Trainer
from crossmatch.models import create_model
from crossmatch.tasks import build_task
from crossmatch.tasks import grad_cache as gc

VOCAB = 30


def make_batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    """n pairs of 16 px images and captions of 2-6 words (0-padded), from n * 2 // 3 images (some repeat)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 7, (n,), generator=g)
    mask = torch.arange(6)[None, :] < lengths[:, None]  # (n, 6)
    ids = torch.randint(5, VOCAB, (n, 6), generator=g).masked_fill(~mask, 0)
    return {
        "image": torch.randn(n, 3, 32, 32, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
        "image_idx": torch.randint(0, n * 2 // 3, (n,), generator=g),
    }


def split(batch: dict, k: int) -> list[dict]:
    """k micro-batches, each cut to its own longest caption (as collate would pad it)."""
    n = len(batch["image_idx"]) // k
    out = []
    for i in range(k):
        mb = {key: v[i * n : (i + 1) * n] for key, v in batch.items()}
        width = int(mb["attention_mask"].sum(1).max())
        mb["input_ids"], mb["attention_mask"] = mb["input_ids"][:, :width], mb["attention_mask"][:, :width]
        out.append(mb)
    return out


MODELS = {
    "hinge": ("tiny_vse", {"batch_norm": False}, LossConfig(max_violation=True)),
    "infonce": ("tiny_vse", {"batch_norm": False}, LossConfig(name="infonce")),
    "siglip": ("tiny_vse", {"batch_norm": False}, LossConfig(name="siglip")),
    # ITC + ITM with hard negatives sampled from the whole step's similarities + MLM: no dropout, no momentum
    "albef": ("tiny_albef", {"dropout": 0.0, "momentum": False, "mlm": True}, LossConfig()),
}


def make_trainer(kind: str, accum: int, tmp_path) -> Trainer:
    name, overrides, loss = MODELS[kind]
    torch.manual_seed(0)
    task = build_task(create_model(name, vocab_size=VOCAB, image_size=32, **overrides), loss)
    cfg = RunConfig()
    cfg.train.accum_steps, cfg.train.optimizer, cfg.train.lr, cfg.train.grad_clip = accum, "sgd", 0.05, 0.0
    opt = create_optimizer(task, cfg.train)
    loader = DataLoader(list(range(96)), batch_size=32 // accum)
    sinks = RunSinks(Checkpointer(tmp_path, 1, enabled=False), MetricLogger(tmp_path, enabled=False))
    return Trainer(task, opt, create_scheduler(opt, cfg.train, 3), RunLoaders(loader), None, sinks, cfg, DistInfo())


@pytest.mark.parametrize("kind", list(MODELS))
def test_accumulating_4_x_8_equals_one_batch_of_32(kind, tmp_path):
    big, acc = make_trainer(kind, 1, tmp_path / "big"), make_trainer(kind, 4, tmp_path / "acc")
    assert acc.task.exact_accumulation
    for step in range(3):
        batch = make_batch(32, seed=step)
        torch.manual_seed(100 + step)  # ITM/MLM draws: the same RNG state for both
        logs_big = big.train_step([batch])
        torch.manual_seed(100 + step)
        logs_acc = acc.train_step(split(batch, 4))
        assert float(logs_acc["loss"]) == pytest.approx(float(logs_big["loss"]), rel=1e-5)
    a, b = big.task.state_dict(), acc.task.state_dict()
    moved = max(float((a[k] - make_trainer(kind, 1, tmp_path / "init").task.state_dict()[k]).abs().max()) for k in a)
    assert moved > 1e-3  # the steps did change the weights
    for k in a:  # float32, only the summation order differs
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)


def test_plain_accumulation_is_not_the_big_batch(tmp_path, monkeypatch):
    """The control: with per-micro-batch negatives (the old loop) the weights differ, so the test above can fail."""
    big, acc = make_trainer("infonce", 1, tmp_path / "big"), make_trainer("infonce", 4, tmp_path / "acc")
    monkeypatch.setattr(type(acc.task), "exact_accumulation", property(lambda self: False))
    batch = make_batch(32, seed=0)
    big.train_step([batch])
    acc.train_step(split(batch, 4))
    a, b = big.task.state_dict(), acc.task.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-3


def naive_step(task, batches):
    """The definition GradCache must meet: encode each micro-batch with a graph, one loss on the concatenation."""
    feats = [task.encode(b) for b in batches]
    cat = {g: {k: gc.cat_padded([f[g][k] for f in feats]) for k in feats[0][g]} for g in feats[0]}
    losses, _ = task.objective(cat, gc.merge_batches(batches))
    sum(losses.values()).backward()


def grads_of(task):
    return {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}


def test_dropout_is_replayed_exactly(monkeypatch):
    torch.manual_seed(0)
    model = create_model("tiny_albef", vocab_size=VOCAB, image_size=32, dropout=0.3, momentum=False)
    task = build_task(model, LossConfig()).train()
    batches = split(make_batch(16, seed=5), 4)
    torch.manual_seed(1)
    naive_step(task, batches)
    want = grads_of(task)
    task.zero_grad()
    torch.manual_seed(1)
    task.accumulated_step(batches)
    got = grads_of(task)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)
    # Without replaying the RNG state, the second pass draws other dropout masks: the gradient is wrong.
    monkeypatch.setattr(gc, "replay_rng", lambda state, device: contextlib.nullcontext())
    task.zero_grad()
    torch.manual_seed(1)
    task.accumulated_step(batches)
    assert max(float((grads_of(task)[k] - want[k]).abs().max()) for k in want) > 1e-3


def test_buffers_are_updated_once_per_micro_batch():
    """BatchNorm running statistics after GradCache equal those of the plain per-micro-batch loop."""
    torch.manual_seed(0)
    task = build_task(create_model("tiny_vse", vocab_size=VOCAB, image_size=32), LossConfig(name="infonce"))
    batches = split(make_batch(16, seed=2), 4)
    plain = {k: v.clone() for k, v in task.state_dict().items()}
    for b in batches:
        task.encode(b)
    want = {k: v.clone() for k, v in task.state_dict().items() if "running" in k}
    task.load_state_dict(plain)
    task.accumulated_step(batches)
    assert want and all(torch.equal(task.state_dict()[k], v) for k, v in want.items())


@pytest.mark.slow
def test_two_gloo_processes_accumulating_equal_one_process_on_the_global_batch(shapes_root, tmp_path):
    """torchrun, 2 ranks x accum 2 x 4 pairs == 1 process x 16 pairs: GradCache under DDP (the objective's
    temperature reduced once, on the last micro-batch) with the gathered InfoNCE loss."""
    import sys

    from tests.helpers import TORCHRUN, assert_same_last_checkpoint, ddp_args, run_in_root

    steps = ["train.max_steps_per_epoch=3", "train.grad_clip=0", "loss.name=infonce"]
    one = run_in_root(
        [
            sys.executable,
            "-m",
            "crossmatch",
            *ddp_args(shapes_root, tmp_path / "one", "train.batch_size=16", *steps),
        ]
    )
    assert one.returncode == 0, one.stderr[-2000:]
    acc = ["train.batch_size=4", "train.accum_steps=2", *steps]
    two = run_in_root([*TORCHRUN, "-m", "crossmatch", *ddp_args(shapes_root, tmp_path / "two", *acc)])
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = assert_same_last_checkpoint(tmp_path / "one", tmp_path / "two", steps=3)
    torch.testing.assert_close(a["loss"]["logit_scale"], b["loss"]["logit_scale"], rtol=1e-5, atol=1e-6)
