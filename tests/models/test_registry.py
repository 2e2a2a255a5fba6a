"""Registry-wide model checks (timm style): every registered tiny_* model builds, encodes with the
documented shapes, gives every parameter a gradient, and produces no NaN."""

import pytest
import torch

from crossmatch.config import LossConfig
from crossmatch.errors import ModelError
from crossmatch.models import create_model, list_models, registry
from crossmatch.models.dual_encoder import DualEncoder, DualEncoderConfig
from crossmatch.models.protocols import (
    PairScorer,
    RunAttached,
    config_of,
    is_dual_encoder,
    pretrained_temperature,
    takes_boxes,
)
from crossmatch.tasks import build_task
from tests.helpers import tiny_batch

TINY = list_models("tiny_")


def test_registry_lists_every_family_and_a_tiny_variant():
    names = list_models()
    assert {"vse_cnn", "vse_resnet18", "vse_resnet50", "tiny_vse"} <= set(names)
    assert TINY and all(n.startswith("tiny_") for n in TINY)


def test_unknown_name_and_key_are_clear_errors():
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        create_model("nope")
    with pytest.raises(ModelError, match="model.embed_dimm"):
        create_model("tiny_vse", embed_dimm=3)


@pytest.mark.parametrize("name", TINY)
def test_forward_shapes_and_scores(name):
    model = create_model(name, data_defaults={"vocab_size": 50, "image_size": 32}).eval()
    batch = tiny_batch()
    with torch.no_grad():
        img, txt = model.encode_image_features(batch), model.encode_text_features(batch)
        scores = model.similarity(img, txt)
    assert scores.shape == (4, 4) and torch.isfinite(scores).all()
    for feats in (img, txt):
        assert all(v.shape[0] == 4 for v in feats.values())
    if "embed" in img:  # dual-encoder style embeddings are l2-normalised
        torch.testing.assert_close(img["embed"].norm(dim=-1), torch.ones(4))
    if hasattr(model, "score_pairs"):
        with torch.no_grad():
            assert model.score_pairs(img, txt).shape == (4,)


@pytest.mark.parametrize("name", TINY)
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = create_model(name, data_defaults={"vocab_size": 50, "image_size": 32})
    task = build_task(model, LossConfig(max_violation=False))
    losses, logs = task.training_step(tiny_batch())
    assert all(k.endswith("_loss") for k in losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())
    ]
    assert not missing, f"no/NaN gradient: {missing}"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_vse_config_round_trips_and_overrides_apply():
    m = create_model("tiny_vse", vocab_size=50, embed_dim=12, bidirectional=True)
    assert m.config.embed_dim == 12 and m.config.bidirectional and m.config.vocab_size == 50
    assert m.encode_text_features(tiny_batch())["embed"].shape == (4, 12)


def test_data_defaults_fill_only_fields_the_model_has():
    m = create_model("tiny_vse", data_defaults={"vocab_size": 77, "max_text_len": 9}, embed_dim=10)
    assert m.config.vocab_size == 77 and m.config.embed_dim == 10  # max_text_len is not a VSE field: ignored
    m = create_model("tiny_vse", data_defaults={"vocab_size": 77}, vocab_size=5)
    assert m.config.vocab_size == 5  # explicit overrides win


def test_capabilities_are_asked_through_the_protocols():
    vse = create_model("tiny_vse", vocab_size=50)
    scan = create_model("tiny_scan", vocab_size=50)
    boxes = create_model("tiny_scan", vocab_size=50, regions="boxes")
    albef = create_model("tiny_albef", vocab_size=50)
    assert [is_dual_encoder(m) for m in (vse, scan, albef)] == [True, False, False]
    assert [isinstance(m, PairScorer) for m in (vse, scan, albef)] == [False, False, True]
    assert [takes_boxes(m) for m in (vse, scan, boxes)] == [False, False, True]  # scan on grid cells reads none
    assert config_of(scan) is scan.config and config_of(torch.nn.Linear(2, 2)) is None
    assert pretrained_temperature(vse) == {}  # only open_clip models bring a pretrained temperature
    assert not isinstance(vse, RunAttached)  # a bare model: crossmatch.load attaches preprocessing and tokenizer
    with pytest.raises(ModelError, match="needs the preprocessing and tokenizer"):
        vse.encode(["a caption"])


# ---- the registry: a plain lookup of (builder, config class, the variant's defaults) ------------------------


@pytest.fixture
def scratch_registry(monkeypatch):
    """The registry with its real variants, into which a test may register its own (undone afterwards)."""
    list_models()  # the families are registered before the copy
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))


def test_a_variant_is_its_config_class_defaults_and_builder(scratch_registry):
    @registry.register_model(DualEncoderConfig, {"embed_dim": 6, "cnn_channels": (4, 4, 8), "word_dim": 4})
    def test_vse(cfg: DualEncoderConfig) -> DualEncoder:
        """A VSE for this test."""
        return DualEncoder(cfg)

    assert registry.model_config("test_vse", text_hidden=8) == DualEncoderConfig(
        embed_dim=6, cnn_channels=(4, 4, 8), word_dim=4, text_hidden=8
    )
    m = create_model("test_vse", data_defaults={"vocab_size": 11, "max_text_len": 5}, text_hidden=8)
    assert (m.config.vocab_size, m.config.embed_dim, m.config.text_hidden) == (11, 6, 8)
    assert test_vse(vocab_size=11, text_hidden=8).config == m.config  # the variant called by hand builds the same
    assert registry.describe_models("test_vse") == {"test_vse": "A VSE for this test."}


def test_registry_declarations_and_lookups_fail_in_one_line(scratch_registry):
    with pytest.raises(ValueError, match="model 'tiny_vse' is registered twice"):

        @registry.register_model(DualEncoderConfig)
        def tiny_vse(cfg):
            return DualEncoder(cfg)

    with pytest.raises(TypeError, match=r"model 'bad': defaults \['embed_dimm'\] are not fields of DualEncoderConfig"):

        @registry.register_model(DualEncoderConfig, {"embed_dimm": 3})
        def bad(cfg):
            return DualEncoder(cfg)

    with pytest.raises(TypeError, match="takes the config dataclass"):
        registry.register_model(dict)
    with pytest.raises(ModelError, match="unknown model 'nope'; known: albef_minilm, albef_small"):
        registry.model_config("nope")
    with pytest.raises(registry.UnknownModelKeysError, match=r"^unknown key\(s\) for DualEncoderConfig: model.widht$"):
        # a data default the model lacks (max_text_len) is not named: only the explicit override is
        create_model("tiny_vse", data_defaults={"max_text_len": 9}, widht=3)
