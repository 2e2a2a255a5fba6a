"""InfoNCE and SigLIP: hand-checked values, naive per-row loops, 2 gloo ranks == 1 rank, and the task."""

import math

import pytest
import torch
import torch.multiprocessing as mp

from crossmatch.config import LossConfig, TrainConfig
from crossmatch.engine.optim import create_optimizer
from crossmatch.errors import ConfigError
from crossmatch.losses.contrastive import InfoNCELoss, SigLipLoss
from crossmatch.models import create_model
from crossmatch.tasks import build_task
from crossmatch.tasks.contrastive import ContrastiveTask


def test_hand_example():
    # x = y = [e1, e2], scale 1: logits [[1, 0], [0, 1]].
    x = torch.eye(2)
    ids = torch.tensor([0, 1])
    # InfoNCE: every row -log(e / (e + 1)) = log(1 + 1/e) = 0.313262, both directions the same.
    assert InfoNCELoss()(x, x, ids, torch.tensor(1.0)).item() == pytest.approx(math.log(1 + math.exp(-1)))
    # SigLIP, b = 0: positives -log sigmoid(1) = 0.313262 (x2), negatives -log sigmoid(0) = log 2 (x2); / B = 2.
    expected = (2 * math.log(1 + math.exp(-1)) + 2 * math.log(2)) / 2
    assert SigLipLoss()(x, x, ids, torch.tensor(1.0), torch.tensor(0.0)).item() == pytest.approx(expected)
    # Pairs 0 and 1 showing the same image: each row has targets (1/2, 1/2) and logits (1, 0):
    # -(log(e / (e + 1)) + log(1 / (e + 1))) / 2 = log(e + 1) - 1/2.
    same = torch.tensor([3, 3])
    assert InfoNCELoss()(x, x, same, torch.tensor(1.0)).item() == pytest.approx(math.log(math.e + 1) - 0.5)


def naive_infonce(x, y, ids, s):
    total = 0.0
    B = len(ids)
    for rows, cols in ((x, y), (y, x)):  # i2t then t2i
        for i in range(B):
            logits = [s * sum(a * b for a, b in zip(rows[i], cols[j], strict=True)) for j in range(B)]
            m = max(logits)
            log_z = m + math.log(sum(math.exp(v - m) for v in logits))
            pos = [j for j in range(B) if ids[j] == ids[i]]
            total += -sum(logits[j] - log_z for j in pos) / len(pos) / B
    return total / 2


def naive_siglip(x, y, ids, s, b):
    B = len(ids)
    total = 0.0
    for i in range(B):
        for j in range(B):
            z = 1.0 if ids[i] == ids[j] else -1.0
            logit = s * sum(p * q for p, q in zip(x[i], y[j], strict=True)) + b
            total += math.log(1 + math.exp(-z * logit))  # -log sigmoid(z * logit)
    return total / B


def random_features(n=7, e=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, e, generator=g, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(torch.randn(n, e, generator=g, dtype=torch.float64), dim=1)
    return x, y, torch.tensor([0, 1, 1, 2, 3, 3, 3])[:n]


def test_infonce_matches_a_per_row_loop():
    x, y, ids = random_features()
    got = InfoNCELoss()(x, y, ids, torch.tensor(4.0, dtype=torch.float64)).item()
    assert got == pytest.approx(naive_infonce(x.tolist(), y.tolist(), ids.tolist(), 4.0), rel=1e-12)


def test_siglip_matches_a_per_pair_loop():
    x, y, ids = random_features()
    s, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    got = SigLipLoss()(x, y, ids, s, b).item()
    assert got == pytest.approx(naive_siglip(x.tolist(), y.tolist(), ids.tolist(), 10.0, -3.0), rel=1e-12)


# ---- 2 gloo ranks == 1 rank on the global batch --------------------------------------------------------


def _loss(name, rank, world_size, local):
    return (InfoNCELoss if name == "infonce" else SigLipLoss)(rank, world_size, local)


def _global_batch():
    x, y, _ = random_features(8, 4, seed=3)
    return x, y, torch.tensor([0, 1, 1, 2, 2, 5, 6, 7])  # pairs 1, 2 share an image; so do 3, 4 (on two ranks)


def _run(name, local, x, y, ids, rank=0, world_size=1):
    """Loss and gradients (features, scale, bias) of this rank's rows."""
    n = len(ids) // world_size
    rows = slice(rank * n, (rank + 1) * n)
    xr, yr = x[rows].clone().requires_grad_(True), y[rows].clone().requires_grad_(True)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    args = (s, b) if name == "siglip" else (s,)
    loss = _loss(name, rank, world_size, local)(xr, yr, ids[rows], *args)
    loss.backward()
    return loss.detach(), xr.grad, yr.grad, s.grad, b.grad if name == "siglip" else torch.zeros(())


CASES = [(name, local) for name in ("infonce", "siglip") for local in (False, True)]


def _worker(rank, init_file, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        x, y, ids = _global_batch()
        torch.save({case: _run(*case, x, y, ids, rank, 2) for case in CASES}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Each case's results on both ranks of one 2-process gloo group (spawned once: it costs seconds)."""
    tmp = tmp_path_factory.mktemp("gloo")
    init_file = tmp / "init"
    mp.spawn(_worker, args=(str(init_file), str(tmp / "r")), nprocs=2, join=True)
    return [torch.load(tmp / f"r.{r}") for r in range(2)]


@pytest.mark.slow  # spawning the two processes takes seconds
@pytest.mark.parametrize("name, local", CASES)
def test_two_gloo_ranks_equal_one_rank_on_the_global_batch(two_ranks, name, local):
    x, y, ids = _global_batch()
    loss, gx, gy, gs, gb = _run(name, local, x, y, ids)
    parts = [r[name, local] for r in two_ranks]
    # DDP averages gradients over ranks; the all-gather's backward summed each row's gradient over ranks.
    # So rank r's feature gradient / world_size is d loss / d its rows, and the mean of the scalar gradients
    # is d loss / d scale. float64 throughout: only summation order differs.
    torch.testing.assert_close(torch.cat([p[1] for p in parts]) / 2, gx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([p[2] for p in parts]) / 2, gy, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close((parts[0][3] + parts[1][3]) / 2, gs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close((parts[0][4] + parts[1][4]) / 2, gb, rtol=1e-10, atol=1e-12)
    rank_losses = torch.stack([p[0] for p in parts])
    # full: every rank computes the global loss; local: the mean over ranks is the global loss
    torch.testing.assert_close(rank_losses.mean(), loss, rtol=1e-12, atol=0)
    if not local:
        torch.testing.assert_close(rank_losses, loss.expand(2), rtol=1e-12, atol=0)
    else:  # a local rank sees only its rows: its loss is not the global one (the test can tell the modes apart)
        assert not torch.allclose(rank_losses, loss.expand(2))


# ---- the task --------------------------------------------------------------------------------------------


def test_build_task_picks_the_loss_by_name_for_dual_encoders():
    model = create_model("tiny_vse", vocab_size=30)
    assert type(build_task(model, LossConfig())).__name__ == "TripletTask"
    task = build_task(model, LossConfig(name="infonce"))
    assert isinstance(task, ContrastiveTask) and task.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    sig = build_task(model, LossConfig(name="siglip"))
    assert sig.logit_scale.item() == pytest.approx(math.log(10)) and sig.logit_bias.item() == -10
    with pytest.raises(ConfigError, match="unknown loss.name 'nce'"):
        build_task(model, LossConfig(name="nce"))
    with pytest.raises(ConfigError, match="needs a dual encoder"):
        build_task(create_model("tiny_albef", vocab_size=30), LossConfig(name="infonce"))


def test_temperature_is_clamped_learned_and_saved_outside_the_model():
    model = create_model("tiny_vse", vocab_size=30, batch_norm=False)
    task = build_task(model, LossConfig(name="siglip", init_logit_scale=7.0))
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(6, 3, 32, 32, generator=g),
        "input_ids": torch.randint(5, 30, (6, 4), generator=g),
        "attention_mask": torch.ones(6, 4, dtype=torch.bool),
        "image_idx": torch.tensor([0, 0, 1, 2, 3, 4]),
    }
    losses, logs = task.training_step(batch)
    assert task.logit_scale.item() == pytest.approx(math.log(100))  # 7.0 clamped to log(100) before use
    assert logs["logit_scale"] == pytest.approx(100) and logs["logit_bias"] == -10
    losses["siglip_loss"].backward()
    assert task.logit_scale.grad is not None and task.logit_bias.grad is not None
    assert set(task.loss_state_dict()) == {"logit_scale", "logit_bias"}
    other = build_task(create_model("tiny_vse", vocab_size=30), LossConfig(name="siglip"))
    other.load_loss_state_dict(task.loss_state_dict())
    assert other.logit_bias.item() == -10 and other.logit_scale.item() == pytest.approx(math.log(100))
    groups = create_optimizer(task, TrainConfig(weight_decay=0.1)).param_groups
    decay_free = {id(p) for grp in groups if grp["weight_decay"] == 0 for p in grp["params"]}
    assert id(task.logit_scale) in decay_free and id(task.logit_bias) in decay_free
