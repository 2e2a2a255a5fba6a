"""What a run reads off a model, asked through the protocols of crossmatch.models.protocols: its own image
preprocessing, its config dataclass, re-ranking (PairScorer) and boxes."""

from __future__ import annotations

import dataclasses

from torch import nn

from crossmatch.config import load_config
from crossmatch.models import create_model
from crossmatch.models.protocols import config_of, preprocess_of
from crossmatch.runs import first_stage_only, needs_boxes, resolve_preprocess, resolved_model_section


class Bare(nn.Module):
    """No preprocess, no config, no score_pairs, no boxes."""


class Declares(nn.Module):
    def __init__(self, preprocess):
        super().__init__()
        self.preprocess = preprocess


def test_preprocess_of_reads_the_declared_dict_and_nothing_else():
    pp = {"mean": [0.5, 0.5, 0.5], "size": 48}
    assert preprocess_of(Declares(pp)) == pp
    assert preprocess_of(Declares(None)) == {}  # a family configured without pretrained statistics
    assert preprocess_of(Bare()) == {}


def test_resolve_preprocess_fills_only_the_empty_fields_from_the_model():
    cfg = load_config(None, ["model.name=tiny_vse", "data.image_std=[0.2,0.2,0.2]"])
    pp = {"mean": [0.1, 0.2, 0.3], "std": [9.0, 9.0, 9.0], "resize": "shortest", "size": 48}
    d = resolve_preprocess(cfg, Declares(pp)).data
    assert (d.image_mean, d.image_std, d.resize, d.image_size) == ([0.1, 0.2, 0.3], [0.2, 0.2, 0.2], "shortest", 48)
    d = resolve_preprocess(cfg, Bare()).data  # DEFAULT_PREPROCESS: ImageNet statistics, squash, bilinear
    assert (d.image_mean, d.resize, d.interpolation, d.image_size) == ([0.485, 0.456, 0.406], "squash", "bilinear", 64)


def test_the_model_section_holds_every_field_of_the_config_dataclass():
    model = create_model("tiny_vse", vocab_size=20)
    assert dataclasses.is_dataclass(config_of(model)) and config_of(Bare()) is None
    section = resolved_model_section("tiny_vse", model)
    assert section["name"] == "tiny_vse" and section["vocab_size"] == 20
    assert set(section) == {"name", *(f.name for f in dataclasses.fields(model.config))}
    assert resolved_model_section("bare", Bare()) == {"name": "bare"}


def test_only_a_pair_scorer_re_ranks_a_first_stage_and_only_box_models_read_boxes():
    cfg = load_config(None, ["model.name=tiny_vse", "eval.first_stage=a.pt", "eval.rerank_k=5"])
    assert not first_stage_only(cfg, create_model("tiny_albef", vocab_size=20))  # ALBEF re-ranks with its ITM head
    assert first_stage_only(cfg, create_model("tiny_vse", vocab_size=20))
    assert not first_stage_only(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, first_stage="")), Bare())
    assert needs_boxes(create_model("tiny_scan", vocab_size=20, regions="boxes")) == 8
    assert needs_boxes(create_model("tiny_scan", vocab_size=20)) == 0 and needs_boxes(Bare()) == 0
