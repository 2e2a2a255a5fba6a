"""Frozen image towers cost once per image file: with `model.cache_frozen` and unaugmented images, a
run computes the frozen tower's outputs of its train (and validation-loss) images once, keyed by the SHA-1 of
each file and its preprocessing, and then feeds keys instead of pixels, so later epochs, and later runs that
share the cache folder, decode none of these images. The towers are the real architectures randomly initialised
(`model.pretrained=false`), on 32 px shapes."""

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("timm")

from crossmatch import runs  # noqa: E402
from crossmatch.data import datasets  # noqa: E402
from crossmatch.data.datasets import KeyedImageView, file_key  # noqa: E402
from crossmatch.data.transforms import build_image_transform  # noqa: E402
from crossmatch.errors import DataError  # noqa: E402
from tests.helpers import tiny_cfg  # noqa: E402

PRETRAINED = (
    "model.name=vse_pretrained",
    "model.pretrained=false",
    "model.embed_dim=16",
    "model.cache_frozen=true",
    "data.tokenizer=minilm",
    "data.augment=false",
    "loss.name=infonce",
    "train.epochs=1",
    "train.max_steps_per_epoch=0",  # whole epochs (10 steps of 20 pairs): a shorter run is not keyed
    "train.batch_size=20",
)


@pytest.fixture
def decodes(monkeypatch):
    """The image files the data views decode, in order."""
    seen, real = [], datasets.load_image

    def counting(path, *args, **kwargs):
        seen.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_image", counting)
    return seen


def split_files(root, split: str) -> set[str]:
    data = json.loads((root / "dataset.json").read_text())
    return {str(root / "images" / im["filename"]) for im in data["images"] if im["split"] == split}


def train(cfg, run_dir) -> None:
    """runs.train, then delete the run's checkpoints: each of the five files holds the towers' ~100 MB, and
    these tests read metrics.jsonl (a suite that kept them left 4 GB of temporary files)."""
    runs.train(cfg, run_dir)
    shutil.rmtree(run_dir / "checkpoints")


def losses(run_dir) -> list[float]:
    """The validation loss of each epoch."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "val" and "loss" in r]


def test_file_keys_change_with_the_bytes_and_the_preprocessing(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"\x89PNG one")
    b.write_bytes(b"\x89PNG one")
    lite0 = repr(build_image_transform(32, train=False, mean=[0.5] * 3, std=[0.5] * 3)).encode()
    imagenet = repr(build_image_transform(32, train=False)).encode()
    assert file_key(a, lite0) == file_key(b, lite0)  # the bytes, not the name
    assert file_key(a, lite0) != file_key(a, imagenet)  # another mean/std is another key
    b.write_bytes(b"\x89PNG two")
    assert file_key(a, lite0) != file_key(b, lite0)
    with pytest.raises(DataError, match="image not found: .*missing.png"):
        file_key(tmp_path / "missing.png", lite0)


@pytest.mark.slow
def test_each_train_image_is_decoded_once_and_a_shared_cache_decodes_none(shapes_root, tmp_path, decodes):
    train_files, val_files = split_files(shapes_root, "train"), split_files(shapes_root, "val")
    cache = f"model.cache_dir={tmp_path / 'shared'}"
    train(tiny_cfg(shapes_root, *PRETRAINED, cache, "train.epochs=2"), tmp_path / "a")
    train_decodes = [p for p in decodes if p in train_files]
    assert sorted(train_decodes) == sorted(train_files)  # every train image once, over both epochs
    assert set(decodes) - train_files <= val_files  # validation (loss and retrieval) decodes its own each epoch
    decodes.clear()
    train(tiny_cfg(shapes_root, *PRETRAINED, cache, "train.epochs=2"), tmp_path / "b")  # the same cache
    assert not [p for p in decodes if p in train_files]
    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # the same rows: equality is real


@pytest.mark.slow
def test_keyed_epochs_give_the_decoding_runs_loss_to_float16_tolerance(shapes_root, tmp_path):
    train(tiny_cfg(shapes_root, *PRETRAINED), tmp_path / "keyed")
    train(tiny_cfg(shapes_root, *PRETRAINED, "model.cache_frozen=false"), tmp_path / "plain")
    keyed, plain = losses(tmp_path / "keyed"), losses(tmp_path / "plain")
    assert len(keyed) == len(plain) == 1
    # the cached pooled features carry float16 rounding (relative <= 2 ** -11 each); through the projections,
    # the l2 normalisation and a 20 x 20 InfoNCE the loss moves by well under 1e-2 (as in test_pretrained_tuning)
    assert keyed == pytest.approx(plain, rel=1e-2, abs=1e-3)


@pytest.mark.slow
def test_an_edited_image_or_other_preprocessing_is_computed_again(shapes_root, tmp_path, decodes):
    root = tmp_path / "shapes"
    shutil.copytree(shapes_root, root)
    cache = f"model.cache_dir={tmp_path / 'shared'}"
    train(tiny_cfg(root, *PRETRAINED, cache), tmp_path / "a")
    train_files = split_files(root, "train")
    edited = sorted(train_files)[0]
    with open(edited, "ab") as f:  # the same pixels (PNG ignores trailing bytes), other file bytes
        f.write(b"\0")
    decodes.clear()
    train(tiny_cfg(root, *PRETRAINED, cache), tmp_path / "b")
    assert [p for p in decodes if p in train_files] == [edited]
    decodes.clear()
    train(tiny_cfg(root, *PRETRAINED, cache, "data.image_mean=[0.485,0.456,0.406]"), tmp_path / "c")
    assert sorted(p for p in decodes if p in train_files) == sorted(train_files)


@pytest.mark.slow
def test_an_unreadable_train_image_fails_the_fill_or_is_skipped_and_counted(shapes_copy, tmp_path):
    from crossmatch.engine.checkpoint import load_checkpoint

    bad = sorted((shapes_copy / "images").iterdir())[0]  # imgid 0 is a train image
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match=f"cannot decode image .*{bad.name}"):
        train(tiny_cfg(shapes_copy, *PRETRAINED), tmp_path / "strict")
    runs.train(tiny_cfg(shapes_copy, *PRETRAINED, "train.epochs=2", "data.max_bad_samples=1"), tmp_path / "lenient")
    state = load_checkpoint(tmp_path / "lenient" / "checkpoints" / "last.pt")["trainer"]
    assert state["skipped_samples"] == 2 * 5  # its 5 captions, skipped in each of the 2 epochs


def test_an_unreadable_image_is_skipped_every_epoch_with_skip_bad(tmp_path):
    class View:
        ds = type("DS", (), {"images": [type("R", (), {"pid": None})()] * 2})()

    keyed = KeyedImageView(View(), [b"k0", None], {1: "cannot decode image x.png: broken"})
    assert keyed[0] == {"image_key": b"k0", "image_idx": 0}
    with pytest.raises(DataError, match="cannot decode image x.png"):
        keyed[1]


def test_keys_only_for_an_image_not_in_the_cache_is_an_error():
    from crossmatch.errors import ModelError
    from crossmatch.models.pretrained import PretrainedDualConfig, PretrainedDualEncoder

    model = PretrainedDualEncoder(PretrainedDualConfig(pretrained=False, embed_dim=8, cache_frozen=True)).eval()
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.fill_image_cache([b"a", b"b"], image)
        assert model.missing_image_outputs([b"a", b"c", b"b"]) == [1]
        by_key = model.encode_image_features({"image_key": [b"a", b"b"]})["embed"]
        swapped = model.encode_image_features({"image_key": [b"b", b"a"]})["embed"]
        model.config.cache_frozen = False
        by_pixels = model.encode_image_features({"image": image})["embed"]
        # the in-memory cache is exact (float32) and the batch shape the same, but the rows come from the fill's
        # tower call: with several threads a convolution may round differently between calls (float32 rounding)
        torch.testing.assert_close(by_key, by_pixels, rtol=1e-5, atol=1e-6)
        # the same rows in the other order: only the projection's matmul may round differently per row position
        torch.testing.assert_close(swapped, by_key.flip(0), rtol=1e-6, atol=1e-6)
        with pytest.raises(ModelError, match="1 image.* not in the cache"):
            model.encode_image_features({"image_key": [b"a", b"c"]})


@pytest.mark.slow
def test_a_run_shorter_than_its_epochs_decodes_only_what_it_meets(shapes_root, tmp_path, decodes):
    train(tiny_cfg(shapes_root, *PRETRAINED, "train.epochs=2", "train.max_steps_per_epoch=2"), tmp_path / "s")
    train_files = split_files(shapes_root, "train")
    assert len([p for p in decodes if p in train_files]) == 2 * 2 * 20  # 2 epochs x 2 steps x 20 pairs, by pixels
