import pytest
import torch

from crossmatch.data.datasets import CaptionView, ImageCaptionDataset, ImageView, PairView
from crossmatch.data.loaders import EpochSampler, build_train_loader, collate, pad_sequences
from crossmatch.data.tokenizer import MASK_ID, PAD_ID, UNK_ID, CaptionTokenizer
from crossmatch.data.transforms import build_image_transform, load_image
from crossmatch.errors import DataError
from tests.helpers import write_karpathy

ENTRIES = [
    {"split": "train", "captions": ["a red circle", "a crimson disc", "red round thing"]},
    {"split": "test", "captions": ["a blue square"], "twin": 2},
    {"split": "test", "captions": ["a square that is blue", "blue box", "a blue square", "square", "b"], "twin": 1},
    {"split": "val", "captions": ["green star"]},
]


def test_karpathy_split_with_uneven_captions(tmp_path):
    root = write_karpathy(tmp_path, ENTRIES)
    test = ImageCaptionDataset(root, "test")
    assert len(test.images) == 2 and len(test.captions) == 6
    assert test.txt_to_img == [0, 1, 1, 1, 1, 1]
    assert test.img_to_txt == [[0], [1, 2, 3, 4, 5]]
    assert test.twins == [(0, 1)]
    both = ImageCaptionDataset(root, ["train", "val"])
    assert [r.imgid for r in both.images] == [0, 3]


def test_views_and_collate_pad_and_mask(tmp_path):
    root = write_karpathy(tmp_path, ENTRIES)
    ds = ImageCaptionDataset(root, "test")
    tok = CaptionTokenizer.train(ds.captions)
    transform = build_image_transform(16, train=False)
    assert len(ImageView(ds, transform)) == 2 and len(CaptionView(ds, tok)) == 6
    batch = collate([PairView(ds, tok, transform)[t] for t in range(6)])
    assert batch["image"].shape == (6, 3, 16, 16)
    assert batch["input_ids"].shape == (6, 5)  # "a square that is blue" is the longest
    assert batch["attention_mask"].sum(1).tolist() == [3, 5, 2, 3, 1, 1]
    assert (batch["input_ids"][~batch["attention_mask"]] == PAD_ID).all()
    assert batch["image_idx"].tolist() == [0, 1, 1, 1, 1, 1] and batch["text_idx"].tolist() == list(range(6))


def test_pad_sequences():
    ids, mask = pad_sequences([[7, 8, 9], [5]])
    assert ids.tolist() == [[7, 8, 9], [5, 0, 0]] and mask.tolist() == [[True] * 3, [True, False, False]]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: (root / "images" / "001.png").unlink(), "missing, first: .*001.png"),
        (lambda root: (root / "dataset.json").write_text("{not json"), "not valid JSON"),
        (lambda root: (root / "dataset.json").write_text('{"x": 1}'), "no 'images' list"),
    ],
)
def test_bad_dataset_files_are_named(tmp_path, damage, message):
    root = write_karpathy(tmp_path, ENTRIES)
    damage(root)
    with pytest.raises(DataError, match=message):
        ImageCaptionDataset(root, "test")


def test_empty_caption_is_an_error(tmp_path):
    root = write_karpathy(tmp_path, [{"split": "test", "captions": ["fine", "   "]}])
    with pytest.raises(DataError, match="empty caption for image 000.png"):
        ImageCaptionDataset(root, "test")


def test_corrupt_image_names_the_file(tmp_path):
    root = write_karpathy(tmp_path, ENTRIES)
    (root / "images" / "002.png").write_bytes(b"\x89PNG\r\n garbage")
    with pytest.raises(DataError, match="cannot decode image .*002.png"):
        load_image(root / "images" / "002.png")


def test_tokenizer_ids_and_round_trip(tmp_path):
    tok = CaptionTokenizer.train(["A red circle.", "a blue square"], max_words=3)
    ids = tok.encode("a red circle")
    assert len(ids) == 3 and min(ids) > MASK_ID  # words start after the 5 special tokens
    assert tok.encode("a purple circle")[1] == UNK_ID
    assert len(tok.encode("a red circle left of a blue square")) == 3  # truncated
    assert tok.encode("") == [UNK_ID]
    tok.save(tmp_path / "tok.json")
    again = CaptionTokenizer.from_file(tmp_path / "tok.json", max_words=3)
    assert again.encode("a red circle") == ids and again.vocab_size == tok.vocab_size
    assert CaptionTokenizer.from_str(tok.to_str()).decode(ids) == "a red circle"


def test_epoch_sampler_is_seeded_sharded_and_resumable():
    s = EpochSampler(10, seed=3)
    s.set_epoch(1)
    full = list(s)
    assert sorted(i for i, _ in full) == list(range(10))
    s.set_epoch(1)
    assert list(s) == full  # a pure function of (seed, epoch)
    s.set_epoch(2)
    assert [i for i, _ in s] != [i for i, _ in full]
    s.set_epoch(1, start=4)
    assert list(s) == full[4:]  # a resumed epoch continues where it stopped
    shards = [EpochSampler(10, seed=3, rank=r, world_size=3) for r in range(3)]
    for sh in shards:
        sh.set_epoch(1)
    seen = [i for sh in shards for i, _ in sh]
    assert len(seen) == 12 and set(seen) == set(range(10))  # padded to 3 x 4 like DistributedSampler


def test_seeded_items_repeat_their_augmentation(shapes_root):
    ds = ImageCaptionDataset(shapes_root, "train")
    tok = CaptionTokenizer.train(ds.captions)
    view = PairView(ds, tok, build_image_transform(32, train=True))
    a, b, c = view[(3, 11)], view[(3, 11)], view[(3, 12)]
    torch.testing.assert_close(a["image"], b["image"])
    assert not torch.equal(a["image"], c["image"])
    loader = build_train_loader(view, batch_size=8, seed=0)
    first = next(iter(loader))
    assert first["image"].shape == (8, 3, 32, 32) and first["input_ids"].shape[0] == 8


def test_boxes_follow_the_transform(shapes_root):
    ds = ImageCaptionDataset(shapes_root, "test")
    view = ImageView(ds, build_image_transform(64, train=False), max_boxes=8)  # 32 px images resized to 64
    item = view[0]
    expected = torch.tensor(ds.images[0].boxes) * 2
    torch.testing.assert_close(item["boxes"], expected)
