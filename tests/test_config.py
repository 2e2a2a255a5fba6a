from pathlib import Path

import pytest

from crossmatch.config import apply_overrides, config_from_dict, config_to_dict, load_config, validate_config
from crossmatch.errors import ConfigError


def test_defaults_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\nmodel:\n  name: tiny_vse\n  embed_dim: 8\n")
    cfg = load_config(path, ["train.lr=0.01", "model.bidirectional=true", "data.root=/x"])
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.01 and cfg.data.root == "/x"
    assert cfg.model == {"name": "tiny_vse", "embed_dim": 8, "bidirectional": True}
    assert cfg.train.batch_size == 128  # untouched default


@pytest.mark.parametrize(
    "override, culprit", [("train.lrr=1", "train.lrr"), ("trian.lr=1", "trian"), ("train.epochs=many", "train.epochs")]
)
def test_bad_keys_and_types_name_the_culprit(override, culprit):
    with pytest.raises(ConfigError, match=culprit):
        load_config(None, [override])


def test_text_negative_term_is_checked():
    validate_config(load_config(None, ["loss.text_negative_term=separate"]))
    with pytest.raises(ConfigError, match="loss.text_negative_term"):
        validate_config(load_config(None, ["loss.text_negative_term=both"]))


@pytest.mark.parametrize("bad", ["-0.5", "nan"])
def test_caption_anchor_weight_is_checked(bad):
    validate_config(load_config(None, ["loss.caption_anchor_weight=0.5"]))
    with pytest.raises(ConfigError, match="loss.caption_anchor_weight"):
        validate_config(load_config(None, [f"loss.caption_anchor_weight={bad}"]))


def test_override_without_equals_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_round_trip_through_a_plain_dict():
    cfg = load_config(None, ["train.epochs=7", "model.name=tiny_vse"])
    d = config_to_dict(cfg)
    assert isinstance(d, dict) and d["train"]["epochs"] == 7
    assert config_from_dict(d) == cfg
    assert apply_overrides(cfg, ["train.epochs=2"]).train.epochs == 2 and cfg.train.epochs == 7


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_names_a_registered_model(path):
    from crossmatch.models import list_models

    cfg = load_config(path)
    assert cfg.model["name"] in list_models()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_builds_its_model(path):
    """Every model key of a shipped config is a real field of that model (ImageNet downloads switched off)."""
    from crossmatch.data.tokenizer import build_tokenizer
    from crossmatch.models.registry import create_model

    cfg = load_config(path)
    vocab = build_tokenizer(cfg.data.tokenizer, ["a red circle"], 1, cfg.data.max_words).vocab_size
    overrides = {k: v for k, v in cfg.model.items() if k != "name"}
    if "pretrained" in overrides:
        # no network in tests; the architecture is the same (clip names a weight tag, "" for none)
        overrides["pretrained"] = "" if isinstance(overrides["pretrained"], str) else False
    data = {"vocab_size": vocab, "image_size": cfg.data.image_size, "max_text_len": cfg.data.max_words + 1}
    model = create_model(cfg.model["name"], data_defaults=data, **overrides)
    for key, value in overrides.items():  # every key of the file reached the model's config
        got = getattr(model.config, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    assert model.config.vocab_size == vocab if hasattr(model.config, "vocab_size") else True
    from crossmatch.tasks import build_task

    task = build_task(model, cfg.loss)  # and its objective accepts the file's loss section
    assert set(task.parameters()) >= set(model.parameters())


def test_model_config_is_the_variants_config_without_building_the_model(monkeypatch):
    import dataclasses

    import torch

    from crossmatch.models.registry import UnknownModelKeysError, create_model, list_models, model_config

    built = create_model("tiny_albef", width=24)
    assert model_config("tiny_albef", width=24) == built.config  # the variant's defaults + the override
    assert model_config("tiny_albef").width == 16 and model_config("albef_small").width == 256
    with pytest.raises(UnknownModelKeysError, match="model.widht"):
        model_config("tiny_albef", widht=3)

    def no_modules(self, *a, **k):
        raise AssertionError("model_config built a module")

    monkeypatch.setattr(torch.nn.Module, "__init__", no_modules)
    configs = {name: model_config(name) for name in list_models()}  # no tower, no weights for any model
    assert all(dataclasses.is_dataclass(c) for c in configs.values())
    assert configs["vse_pretrained"].text_tower == "minilm"
