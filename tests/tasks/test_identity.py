"""The person-search tasks (tasks/identity.py): SDM / CMPM on dual encoders, IRRA's ID loss on dual encoders and
TIPCB, the train identities as classes (before the first step, refused without them), and the classifier as
training-only state: in last.pt's loss state and restored on resume, never in the model's weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from crossmatch.cli.main import main
from crossmatch.config import IdentityLossConfig, LossConfig, load_config
from crossmatch.engine.checkpoint import load_checkpoint
from crossmatch.errors import CheckpointError
from crossmatch.losses.identity import CmpmLoss, SdmLoss
from crossmatch.models import create_model
from crossmatch.tasks import build_task
from crossmatch.tasks.identity import DualIdentityTask, TipcbTask
from tests.helpers import ROOT, error_line, tiny_batch, train_args

PIDS = [4, 4, 9, 2]  # the identities of tiny_batch's four pairs; classes 2, 4, 9 -> 0, 1, 2
LABELS = [1, 1, 2, 0]


def person_batch() -> dict[str, torch.Tensor]:
    return {**tiny_batch(), "pid": torch.tensor(PIDS)}


def loss_cfg(name: str = "sdm", id_weight: float = 0.0) -> LossConfig:
    return LossConfig(name=name, identity=IdentityLossConfig(temperature=0.5, id_weight=id_weight))


@pytest.mark.parametrize("name", ["sdm", "cmpm"])
def test_sdm_and_cmpm_on_a_dual_encoder_are_the_loss_modules_on_its_embeddings(name):
    torch.manual_seed(0)
    model = create_model("tiny_vse", vocab_size=50)
    task = build_task(model, loss_cfg(name)).eval()
    assert type(task) is DualIdentityTask
    ref = SdmLoss(0.5) if name == "sdm" else CmpmLoss()
    batch = person_batch()
    with torch.no_grad():
        losses, _ = task.training_step(batch)
        img, txt = model.encode_image_features(batch)["embed"], model.encode_text_features(batch)["embed"]
        assert list(losses) == [f"{name}_loss"]
        assert losses[f"{name}_loss"].item() == pytest.approx(ref(img, txt, torch.tensor(PIDS)).item(), rel=1e-6)
        # without pids the images' own indices are the identities: image_idx [0, 1, 1, 2]
        plain, _ = task.training_step(tiny_batch())
        assert plain[f"{name}_loss"].item() == pytest.approx(ref(img, txt, torch.tensor([0, 1, 1, 2])).item(), rel=1e-6)
        assert plain[f"{name}_loss"].item() != pytest.approx(losses[f"{name}_loss"].item(), rel=1e-3)


def by_hand_id_loss(task, img: torch.Tensor, txt: torch.Tensor) -> float:
    """(CE(W img + b) + CE(W txt + b)) / 2 at the classes LABELS."""
    w, b, y = task.id_loss.classifier.weight, task.id_loss.classifier.bias, torch.tensor(LABELS)
    return ((F.cross_entropy(img @ w.t() + b, y) + F.cross_entropy(txt @ w.t() + b, y)) / 2).item()


def scramble(task) -> None:
    """Classifier weights large enough that a wrong input or class shows in the loss."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        task.id_loss.classifier.weight.copy_(torch.randn(task.id_loss.classifier.weight.shape, generator=g))
        task.id_loss.classifier.bias.copy_(torch.randn(task.id_loss.classifier.bias.shape, generator=g))


def test_a_dual_encoder_s_id_loss_classifies_its_embeddings_times_id_weight():
    torch.manual_seed(0)
    model = create_model("tiny_vse", vocab_size=50)
    task = build_task(model, loss_cfg("sdm", id_weight=0.5))
    task.use_identities([9, 2, 4, 4, 2])
    assert task.id_loss.classes.tolist() == [2, 4, 9] and task.id_loss.classifier.weight.shape == (3, 16)
    scramble(task)
    task.eval()
    batch = person_batch()
    with torch.no_grad():
        losses, _ = task.training_step(batch)
        img, txt = model.encode_image_features(batch)["embed"], model.encode_text_features(batch)["embed"]
    assert list(losses) == ["sdm_loss", "id_loss"]
    assert losses["id_loss"].item() == pytest.approx(0.5 * by_hand_id_loss(task, img, txt), rel=1e-5)
    assert losses["sdm_loss"].item() == pytest.approx(SdmLoss(0.5)(img, txt, torch.tensor(PIDS)).item(), rel=1e-6)


def test_tipcb_s_id_loss_reads_the_raw_global_features_and_trains_the_classifier_outside_the_model():
    torch.manual_seed(0)
    model = create_model("tiny_tipcb", vocab_size=50)
    task = build_task(model, loss_cfg("hinge", id_weight=2.0))
    assert type(task) is TipcbTask
    task.use_identities(PIDS)
    scramble(task)
    batch = person_batch()
    losses, _ = task.training_step(batch)
    with torch.no_grad():
        img_g, txt_g = model.image_features(batch)[0], model.text_features(batch)[0]  # (B, E) raw
    assert losses["id_loss"].item() == pytest.approx(2.0 * by_hand_id_loss(task, img_g, txt_g), rel=1e-5)
    sum(losses.values()).backward()
    assert task.id_loss.classifier.weight.grad.abs().sum() > 0
    state = task.loss_state_dict()
    assert sorted(state) == ["id_loss.classes", "id_loss.classifier.bias", "id_loss.classifier.weight"]
    assert not [k for k in model.state_dict() if "classifier" in k or "id_loss" in k]


def test_without_id_weight_there_is_no_classifier_and_no_id_loss():
    task = build_task(create_model("tiny_tipcb", vocab_size=50), loss_cfg("hinge"))
    task.use_identities(PIDS)
    losses, _ = task.training_step(person_batch())
    assert task.id_loss is None and list(losses) == ["sdm_loss"] and task.loss_state_dict() == {}


def test_a_checkpoint_s_classifier_for_other_identities_is_refused_on_resume():
    def task(pids):
        t = build_task(create_model("tiny_vse", vocab_size=50), loss_cfg("sdm", id_weight=1.0))
        t.use_identities(pids)
        return t

    saved = task([1, 2, 3]).loss_state_dict()
    other = task([1, 2, 4])
    with pytest.raises(CheckpointError, match="knows 3 identities, not the 3 of this train split"):
        other.load_loss_state_dict(saved)
    same = task([3, 2, 1])
    same.load_loss_state_dict(saved)
    assert torch.equal(same.id_loss.classifier.weight, saved["id_loss.classifier.weight"])


def test_id_weight_without_person_identities_is_refused_in_one_line_before_the_run(shapes_root, tmp_path, capsys):
    run = tmp_path / "run"
    argv = train_args(shapes_root, run, "loss.name=sdm", "loss.identity.id_weight=0.5")
    assert main(argv) != 0
    line = error_line(capsys)
    assert "loss.identity.id_weight=0.5" in line and "data.format=karpathy" in line
    assert not (run / "checkpoints").exists()
    assert main(train_args(shapes_root, run, "loss.name=infonce", "loss.identity.id_weight=0.5")) != 0
    assert "the ContrastiveTask objective has no ID loss" in error_line(capsys)


def test_mlm_weight_without_irra_s_masked_prediction_is_refused_in_one_line(people_root, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", str(ROOT / "configs" / "people_tipcb.yaml"), "--run-dir", str(run), f"data.root={people_root}"]
    assert main([*args, "model.name=tiny_tipcb", "loss.identity.mlm_weight=0.5"]) != 0
    line = error_line(capsys)
    assert "loss.identity.mlm_weight=0.5" in line and "TipcbTask" in line and "irra" in line
    assert not (run / "checkpoints").exists()


# ---- end to end on a tiny people set ---------------------------------------------------------------------


TINY_PEOPLE = ("data.num_workers=0", "train.batch_size=8", "train.warmup_steps=0", "eval.batch_size=16")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["people_tipcb", "people_vse_pretrained"])
def test_each_people_recipe_loads_and_trains_a_step_with_the_id_loss(recipe, people_root, tmp_path):
    cfg = load_config(ROOT / "configs" / f"{recipe}.yaml")
    assert cfg.data.format == "cuhk_pedes" and cfg.loss.identity.id_weight > 0
    run = tmp_path / "run"
    extra = [*TINY_PEOPLE, "train.epochs=1", "train.max_steps_per_epoch=1", "train.log_every=1"]
    if recipe == "people_tipcb":
        extra.append("data.image_size=[96,32]")
    assert main(["train", str(ROOT / "configs" / f"{recipe}.yaml"), "--run-dir", str(run),
                 f"data.root={people_root}", *extra]) == 0  # fmt: skip
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("split") == "train" and "id_loss" in r]
    assert train and train[0]["id_loss"] > 0 and "sdm_loss" in train[0]


@pytest.mark.slow
def test_the_classifier_is_in_last_pt_restored_on_resume_and_absent_from_the_model_weights(
    people_root, tmp_path, monkeypatch
):
    import crossmatch
    from crossmatch.engine import trainer as trainer_mod

    run = tmp_path / "run"
    extra = [*TINY_PEOPLE, "model.name=tiny_tipcb", "train.max_steps_per_epoch=2", "data.image_size=[96,32]"]
    args = ["train", str(ROOT / "configs" / "people_tipcb.yaml"), "--run-dir", str(run), f"data.root={people_root}"]
    assert main([*args, *extra, "train.epochs=1"]) == 0
    last, best = load_checkpoint(run / "checkpoints" / "last.pt"), load_checkpoint(run / "checkpoints" / "best.pt")
    assert last["loss"]["id_loss.classes"].tolist() == [1, 2, 3, 4, 5, 6]
    assert last["loss"]["id_loss.classifier.weight"].shape == (6, 256)  # the recipe's embed_dim
    assert set(best["model"]) == set(last["model"])
    assert not [k for k in best["model"] if "classifier" in k or "id_loss" in k]
    folder = crossmatch.load(run / "checkpoints" / "best.pt").save_pretrained(tmp_path / "hf")
    from safetensors.torch import load_file

    assert set(load_file(folder / "model.safetensors")) == set(best["model"])

    seen = []
    real_step = trainer_mod.Trainer.train_step

    def step(self, batches):
        if not seen:
            seen.append(self.task.id_loss.classifier.weight.detach().clone())
        return real_step(self, batches)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", step)
    assert main([*args, *extra, "train.epochs=2", "--resume"]) == 0
    assert torch.equal(seen[0], last["loss"]["id_loss.classifier.weight"])
    resumed = load_checkpoint(run / "checkpoints" / "last.pt")["loss"]["id_loss.classifier.weight"]
    assert not torch.equal(resumed, seen[0])  # and trained on


def test_accumulating_sdm_and_the_id_loss_over_4_micro_batches_equals_one_batch(tmp_path):
    from torch.utils.data import DataLoader

    from crossmatch.config import RunConfig
    from crossmatch.engine.checkpoint import Checkpointer
    from crossmatch.engine.distributed import DistInfo
    from crossmatch.engine.logging import MetricLogger
    from crossmatch.engine.optim import create_optimizer, create_scheduler
    from crossmatch.engine.trainer import RunLoaders, RunSinks, Trainer

    def trainer(accum: int, folder: Path) -> Trainer:
        torch.manual_seed(0)
        task = build_task(create_model("tiny_vse", vocab_size=30, batch_norm=False), loss_cfg("sdm", id_weight=1.0))
        task.use_identities(range(8))
        cfg = RunConfig()
        cfg.train.accum_steps, cfg.train.optimizer, cfg.train.lr, cfg.train.grad_clip = accum, "sgd", 0.5, 0.0
        opt = create_optimizer(task, cfg.train)
        sinks = RunSinks(Checkpointer(folder, 1, enabled=False), MetricLogger(folder, enabled=False))
        loader = RunLoaders(DataLoader(list(range(64)), batch_size=16 // accum))
        return Trainer(task, opt, create_scheduler(opt, cfg.train, 2), loader, None, sinks, cfg, DistInfo())

    g = torch.Generator().manual_seed(0)
    mask = torch.arange(5)[None, :] < torch.randint(2, 6, (16,), generator=g)[:, None]  # (16, 5)
    batch = {
        "image": torch.randn(16, 3, 32, 32, generator=g),
        "input_ids": torch.randint(5, 30, (16, 5), generator=g).masked_fill(~mask, 0),
        "attention_mask": mask,
        "image_idx": torch.arange(16),
        "pid": torch.arange(16) % 8,  # two pairs of each identity, in different micro-batches
    }
    micro = [{k: v[i * 4 : (i + 1) * 4] for k, v in batch.items()} for i in range(4)]
    big, acc = trainer(1, tmp_path / "big"), trainer(4, tmp_path / "acc")
    assert acc.task.exact_accumulation
    before = big.task.id_loss.classifier.weight.detach().clone()
    for _ in range(2):
        logs_big, logs_acc = big.train_step([batch]), acc.train_step(micro)
        assert float(logs_acc["id_loss"]) == pytest.approx(float(logs_big["id_loss"]), rel=1e-5)
    assert float((big.task.id_loss.classifier.weight.detach() - before).abs().max()) > 1e-4  # the classifier trained
    a, b = big.task.state_dict(), acc.task.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
