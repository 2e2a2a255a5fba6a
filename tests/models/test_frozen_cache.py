"""models/frozen_cache.py: the one cache type of frozen towers' per-item outputs (`OutputCache`, in memory or on
disk), the one opener every frozen tower's cache comes from (`tower_cache`: vse_pretrained's towers and the fusion
families' CNN), and which models the train-image warm-up (`frozen_cache.warm_up`, run by `crossmatch train`) applies to.
The disk cache's damage handling and the cached epochs' losses are tested in test_pretrained_tuning.py, the
warm-up's runs in tests/runs/test_warmup.py."""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("timm")

from crossmatch.errors import ModelError  # noqa: E402
from crossmatch.models.frozen_cache import (  # noqa: E402
    DiskOutputCache,
    MemoryOutputCache,
    OutputCache,
    tower_cache,
    warm_up,
    weights_digest,
)
from crossmatch.models.pretrained import ImageTower, PretrainedDualConfig, PretrainedDualEncoder  # noqa: E402
from crossmatch.models.protocols import KeyedImageCache  # noqa: E402
from crossmatch.models.registry import create_model  # noqa: E402


@pytest.mark.parametrize("on_disk", [False, True])
def test_both_stores_keep_what_they_computed_and_list_what_they_miss(tmp_path, on_disk):
    cache = DiskOutputCache(tmp_path, {"tower": "t"}) if on_disk else MemoryOutputCache()
    values = [torch.full((2,), float(i)) for i in range(3)]  # exact in float16
    cache([b"a", b"b"], lambda rows: [values[i] for i in rows])  # a -> 0.0, b -> 1.0
    assert cache.missing([b"c", b"a", b"d", b"b"]) == [0, 2]
    calls = []

    def compute_c(rows):
        calls.append(list(rows))
        return [values[2] for _ in rows]

    out = cache([b"b", b"c"], compute_c)  # b kept (1.0), only c computed (2.0)
    assert calls == [[1]]
    assert torch.equal(out, torch.tensor([[1.0, 1.0], [2.0, 2.0]]))
    assert (cache.hits, cache.misses) == (1, 3)


def test_tower_cache_keeps_memory_without_a_folder_and_fingerprints_the_frozen_weights_on_disk(tmp_path):
    tower = ImageTower("test_efficientnet", pretrained=False, freeze=True)
    assert type(tower_cache(tower, "test_efficientnet")) is MemoryOutputCache
    disk = tower_cache(tower, "test_efficientnet", tmp_path)
    assert isinstance(disk, DiskOutputCache)
    weights = weights_digest([tower])
    # the fingerprint vse_pretrained's caches were written with: a cache folder of an earlier run stays valid
    assert disk.fingerprint == {
        "format": 1,
        "tower": "ImageTower:test_efficientnet",
        "unfrozen": 0,
        "weights": weights,
        "pooling": "",
    }
    assert tower_cache(tower, "test_efficientnet", tmp_path).folder == disk.folder
    assert tower_cache(tower, "test_efficientnet", tmp_path, pooling="cls").folder != disk.folder
    with torch.no_grad():
        tower.body.conv_stem.weight.add_(1.0)  # other frozen weights (another checkpoint)
    assert tower_cache(tower, "test_efficientnet", tmp_path).folder != disk.folder


def test_vse_pretrained_opens_its_caches_through_tower_cache(tmp_path):
    cfg = PretrainedDualConfig(pretrained=False, embed_dim=8, image_tower="test_efficientnet", cache_frozen=True)
    model = PretrainedDualEncoder(cfg).eval()
    assert type(model.image_cache) is MemoryOutputCache and type(model.text_cache) is MemoryOutputCache
    model.use_cache_dir(tmp_path)
    with torch.no_grad():
        model.encode_image_features({"image": torch.randn(2, 3, 32, 32)})
    image = tower_cache(model.image_tower, "test_efficientnet", tmp_path / "image")
    assert model.image_cache.folder == image.folder and model.image_cache.misses == 2
    assert model.missing_image_outputs([b"never filled"]) == [0]


def test_the_fusion_families_keep_their_cnn_feature_maps_in_the_same_cache_type():
    model = create_model("albef_minilm", pretrained=False, image_tower="test_efficientnet", image_size=64,
                         cache_frozen=True, momentum=False).eval()  # fmt: skip
    cache = model.image_tower.cache
    assert isinstance(cache, OutputCache) and type(cache) is MemoryOutputCache
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first = model.encode_image_features({"image": image})["tokens"]  # (2, 1+R, D)
        second = model.encode_image_features({"image": image.clone()})["tokens"]  # another tensor: by content
    assert (cache.misses, cache.hits) == (2, 2)
    assert torch.equal(first, second)
    # by content only: the fusion families take no image keys, so the warm-up leaves their pairs alone
    assert not isinstance(model, KeyedImageCache)
    pairs = SimpleNamespace(images="the decoding view")
    assert warm_up(model, pairs, batch_size=4) is False and pairs.images == "the decoding view"


def test_the_warm_up_skips_models_without_a_keyed_image_cache():
    pairs = SimpleNamespace(images="the decoding view")
    assert warm_up(create_model("tiny_vse", vocab_size=9), pairs, batch_size=4) is False
    augmented = PretrainedDualEncoder(PretrainedDualConfig(pretrained=False, embed_dim=8, cache_frozen=True))
    augmented.use_cache_dir("unused", cache_images=False)  # augmented train images are never keyed
    assert isinstance(augmented, KeyedImageCache) and not augmented.caches_image_outputs
    assert warm_up(augmented, pairs, batch_size=4) is False and pairs.images == "the decoding view"


def test_features_refuses_a_checkpoint_without_an_image_tower(tmp_path):
    from crossmatch.search.features import load_tower
    from tests.helpers import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "albef.pt", "tiny_albef")
    with pytest.raises(ModelError, match="model tiny_albef has no image_tower"):
        load_tower(str(ckpt), 0)
