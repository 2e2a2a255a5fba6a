"""The image tower's classifier as a prior in the text space (ConSE, `model.image_prior: class_names`)."""

import math

import pytest
import torch
from torch import nn

from crossmatch.errors import ModelError
from crossmatch.models.class_prior import ClassNamePrior, embed_names


def test_the_prior_mixes_the_top_k_class_names_by_probability():
    head = nn.Linear(2, 3)
    with torch.no_grad():  # logits log(0.5), log(0.3), log(0.2): probabilities 0.5, 0.3, 0.2 whatever the input
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.5, 0.3, 0.2]).log())
    names = torch.tensor([[2.0, 0, 0], [0, 3.0, 0], [0, 0, 1.0]])  # normalised inside: the unit axes
    prior = ClassNamePrior(head, names, top_k=2)
    out = prior(torch.randn(4, 2))  # (4, 3)
    mixed = torch.tensor([0.5, 0.3, 0.0])  # 0.5 * e0 + 0.3 * e1; the third class is not in the top 2
    expected = mixed / mixed.norm() * math.sqrt(3)
    torch.testing.assert_close(out, expected.expand(4, 3))
    assert not any(p.requires_grad for p in prior.parameters())
    assert not prior.train().training  # frozen: stays in eval mode


def test_names_are_embedded_in_the_caption_template_in_batches():
    seen = []

    def embed(sentences):
        seen.append(list(sentences))
        return torch.ones(len(sentences), 2)

    out = embed_names(embed, ["cat", "dog", "frog"], batch_size=2)
    assert seen == [["A cat.", "A dog."], ["A frog."]] and out.shape == (3, 2)


pytest.importorskip("transformers")
pytest.importorskip("timm")


@pytest.fixture(scope="module")
def with_prior():
    from crossmatch.models.pretrained import PretrainedDualConfig, PretrainedDualEncoder

    torch.manual_seed(0)
    cfg = PretrainedDualConfig(pretrained=False, embed_dim=8, image_prior="class_names", cache_frozen=True)
    return PretrainedDualEncoder(cfg).eval()


def test_vse_pretrained_projects_the_pooled_features_and_the_prior(with_prior):
    model = with_prior
    assert model.image_proj.in_features == 1280 + 384  # Lite0's pooled features, then MiniLM's width
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = model.image_tower(image)  # (2, 1280)
        by_hand = nn.functional.normalize(model.image_proj(torch.cat([pooled, model.prior(pooled)], 1)), dim=-1)
        model.fill_image_cache([b"a", b"b"], image)
        keyed = model.encode_image_features({"image_key": [b"a", b"b"]})["embed"]
        model.config.cache_frozen = False
        plain = model.encode_image_features({"image": image})["embed"]
        model.config.cache_frozen = True
    # the same operations on the same batch, but separate calls of the tower: with several threads oneDNN may split
    # a convolution differently from one call to the next (CROSSMATCH_TEST_THREADS=2 showed last-bit differences),
    # so equality holds to float32 rounding of the (B, 8) unit vectors, not bitwise
    torch.testing.assert_close(plain, by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(keyed, plain, rtol=1e-5, atol=1e-6)  # the cache holds the fill call's pooled rows


def test_a_checkpoint_rebuilds_the_same_prior(with_prior):
    from crossmatch.models.pretrained import PretrainedDualConfig, PretrainedDualEncoder

    torch.manual_seed(1)  # other random towers, other name embeddings: the state dict must bring them back
    other = PretrainedDualEncoder(PretrainedDualConfig(pretrained=False, embed_dim=8, image_prior="class_names"))
    assert not torch.equal(other.prior.names, with_prior.prior.names)
    other.load_state_dict(with_prior.state_dict())
    assert torch.equal(other.prior.names, with_prior.prior.names)
    cfg = PretrainedDualConfig(pretrained=False, embed_dim=8, image_prior="class_names")
    loading = PretrainedDualEncoder(cfg, load_weights=False)  # what a checkpoint load builds: nothing embedded
    assert not loading.prior.names.any()
    loading.load_state_dict(with_prior.state_dict())
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        loaded, original = (
            loading.eval().encode_image_features({"image": image}),
            with_prior.encode_image_features({"image": image}),
        )
    # the same weights, batch and operations in two tower calls (float32 rounding across threads, see above)
    torch.testing.assert_close(loaded["embed"], original["embed"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"image_prior": "wordnet"}, "unknown model.image_prior 'wordnet'"),
        ({"image_prior": "class_names", "prior_top_k": 0}, "model.prior_top_k=0"),
        ({"image_prior": "class_names", "image_tower": "torchvision.resnet18"}, "keeps no classifier"),
    ],
)
def test_bad_prior_settings_are_one_line_model_errors(kw, message):
    from crossmatch.models.pretrained import PretrainedDualConfig, PretrainedDualEncoder

    with pytest.raises(ModelError, match=message):
        PretrainedDualEncoder(PretrainedDualConfig(pretrained=False, embed_dim=8, **kw))
