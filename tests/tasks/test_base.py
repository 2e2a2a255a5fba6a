"""The task registry: objectives register by (model family, loss.name) in their own modules, and `build_task`
is a lookup that names the family and the loss when nothing matches."""

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from crossmatch.config import LossConfig
from crossmatch.errors import ConfigError
from crossmatch.models import create_model
from crossmatch.tasks import base
from crossmatch.tasks.albef import AlbefTask
from crossmatch.tasks.contrastive import ContrastiveTask
from crossmatch.tasks.identity import TipcbTask
from crossmatch.tasks.triplet import TripletTask
from crossmatch.tasks.vilt import ViltTask
from tests.helpers import ROOT

SRC = ROOT / "src" / "crossmatch"


class Plain(nn.Module):
    """A model that declares no family: one embedding per side, dot-product scores."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2)

    def encode_image_features(self, batch):
        return {"embed": self.proj(batch["image"])}  # (B, 2)

    def encode_text_features(self, batch):
        return {"embed": self.proj(batch["text"])}  # (B, 2)

    def similarity(self, img, txt):
        return img["embed"] @ txt["embed"].T  # (N_img, N_txt)


class Toy(Plain):
    """A model of a family no module of the package knows."""

    family = "toy"


class ToyTask(TripletTask):
    pass


@pytest.fixture
def scratch_tasks(monkeypatch):
    monkeypatch.setattr(base, "_TASKS", dict(base._TASKS))


@pytest.mark.parametrize(
    "name,loss,task",
    [
        ("tiny_vse", "hinge", TripletTask),
        ("tiny_vse", "infonce", ContrastiveTask),
        ("tiny_vse", "siglip", ContrastiveTask),
        ("tiny_scan", "hinge", TripletTask),
        ("tiny_albef", "hinge", AlbefTask),
        ("tiny_vilt", "hinge", ViltTask),
        ("tiny_tipcb", "hinge", TipcbTask),
    ],
)
def test_each_family_and_loss_finds_its_task(name, loss, task):
    assert type(base.build_task(create_model(name, vocab_size=30), LossConfig(name=loss))) is task


def test_no_task_for_the_family_and_loss_is_one_line_naming_both():
    with pytest.raises(ConfigError) as err:
        base.build_task(create_model("tiny_vilt", vocab_size=30), LossConfig(name="infonce"))
    assert str(err.value) == (
        "loss.name=infonce needs a dual encoder (l2-normalised embeddings), family 'dual_encoder'; "
        "ViLT (family 'vilt') trains with loss.name=hinge (ViltTask)"
    )


def test_a_new_family_registers_in_its_own_module_and_nothing_else_changes(scratch_tasks):
    assert type(base.build_task(Toy(), LossConfig())) is TripletTask  # no task of its own: the hinge
    with pytest.raises(ConfigError, match=r"Toy \(family 'toy'\) trains with loss.name=hinge \(TripletTask\)$"):
        base.build_task(Toy(), LossConfig(name="siglip"))
    base.register_task(Toy.family)(ToyTask)
    task = base.build_task(Toy(), LossConfig())
    assert type(task) is ToyTask
    batch = {"image": torch.eye(3), "text": torch.eye(3), "image_idx": torch.arange(3)}
    losses, _ = task.training_step(batch)
    assert set(losses) == {"triplet_loss"} and losses["triplet_loss"].requires_grad
    with pytest.raises(ValueError, match="family 'toy' with loss.name=hinge already trains with ToyTask"):
        base.register_task(Toy.family)(TripletTask)


def test_a_model_that_declares_no_family_trains_with_the_hinge():
    assert base.task_class(Plain()) is TripletTask and type(base.build_task(Plain(), LossConfig())) is TripletTask


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }


def test_the_base_module_imports_no_module_that_imports_it():
    # The task modules import base to subclass Task and register; base finds them through the registry only.
    ours = {m for m in imports_of(SRC / "tasks" / "base.py") if m.startswith("crossmatch.tasks")}
    assert ours == {"crossmatch.tasks.grad_cache"}  # the accumulation helper, which imports no task module
    for module in ours:
        assert not {m for m in imports_of(SRC / "tasks" / f"{module.rsplit('.', 1)[1]}.py") if "crossmatch.tasks" in m}
    assert "crossmatch.tasks.base" in imports_of(SRC / "tasks" / "albef.py")  # the walk sees task modules' imports
