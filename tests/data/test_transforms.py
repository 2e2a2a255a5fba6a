"""`data.image_size` as an int or [H, W] (non-square inputs, as person-search models use 384 x 128): the
transforms, box pooling and SCAN's box regions follow the non-square frame; an int means what it always did."""

import pytest
import torch
from torchvision.transforms import v2

from crossmatch.config import config_from_dict, config_to_dict, image_hw, load_config, validate_config
from crossmatch.data.transforms import build_image_transform, describe_transform
from crossmatch.errors import ConfigError
from crossmatch.models.layers import pool_boxes

PLAIN = {"mean": [0, 0, 0], "std": [1, 1, 1]}


@pytest.mark.parametrize("resize", ["squash", "letterbox", "shortest"])
@pytest.mark.parametrize("train", [False, True])
def test_an_hw_transform_gives_h_by_w(resize, train):
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    t = build_image_transform([24, 8], train=train, augment=True, resize=resize)
    assert t(image).shape == (3, 24, 8)


def test_letterbox_and_shortest_on_a_non_square_frame_by_hand():
    square = torch.zeros(3, 10, 10, dtype=torch.uint8)
    # letterbox into 4 x 8: scale min(4/10, 8/10) = 0.4 -> 4 x 4, centred: 2 columns of fill each side
    t = build_image_transform([4, 8], train=False, resize="letterbox", background=[255, 255, 255], **PLAIN)
    out = t(square)  # (3, 4, 8)
    assert out[0].tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]] * 4
    # shortest (cover, then centre crop) into 4 x 8 of a 10 x 10 image with a bright bottom half: scale
    # max(0.4, 0.8) = 0.8 -> 8 x 8, centre rows 2-5 kept: the top two of them dark, the bottom two bright (the
    # antialiased resize blends the rows next to the edge a little: 0.08 of the other half)
    halves = torch.cat([torch.zeros(3, 5, 10), torch.full((3, 5, 10), 255.0)], 1).to(torch.uint8)
    out = build_image_transform([4, 8], train=False, resize="shortest", **PLAIN)(halves)
    assert out.shape == (3, 4, 8)
    assert out[0, :2].max() < 0.1 and out[0, 2:].min() > 0.9 and out[0, 0].max() == 0 and out[0, 3].min() == 1


def test_an_int_size_builds_the_transform_it_always_did():
    image = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    norm = [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    squash = v2.Compose([v2.Resize((16, 16), antialias=True), *norm])  # 0.1.0's pipeline
    shortest = v2.Compose([v2.Resize(16, antialias=True), v2.CenterCrop(16), *norm])
    assert torch.equal(build_image_transform(16, train=False)(image), squash(image))
    assert torch.equal(build_image_transform(16, train=False, resize="shortest")(image), shortest(image))
    for resize in ("squash", "shortest", "letterbox"):
        a = build_image_transform(16, train=False, resize=resize)(image)
        assert torch.equal(a, build_image_transform([16, 16], train=False, resize=resize)(image))


def test_box_pooling_on_a_non_square_image_picks_the_boxed_region():
    # a 32 x 64 (H x W) image, a (4, 8) feature map: each map cell covers 8 x 8 pixels. Value 10 R + C on the
    # 2 x 2 blocks of cells (R = 0..1 rows, C = 0..3 columns), so a box of 16 x 16 pixels reads one block exactly
    fmap = torch.tensor([[10.0 * (r // 2) + (c // 2) for c in range(8)] for r in range(4)])[None, None]  # (1, 1, 4, 8)
    boxes = torch.tensor([[[48.0, 0.0, 64.0, 16.0], [0.0, 16.0, 16.0, 32.0], [32.0, 16.0, 48.0, 32.0]]])  # (1, 3, 4)
    out = pool_boxes(fmap, boxes, (32, 64))  # (1, 3, 1)
    assert out.flatten().tolist() == [3.0, 10.0, 12.0]
    # an int side is the square frame, as before
    assert pool_boxes(fmap, boxes / torch.tensor([64.0, 32.0, 64.0, 32.0]) * 8, 8).flatten().tolist() == [
        3.0,
        10.0,
        12.0,
    ]


def test_scan_box_regions_span_the_non_square_image():
    from crossmatch.models.registry import create_model

    model = create_model("tiny_scan", vocab_size=9, regions="boxes", image_size=[32, 16])
    batch = {"image": torch.zeros(1, 3, 32, 16)}
    boxes = model.region_boxes(batch)  # (1, 1 + n, 4)
    assert boxes[0, 0].tolist() == [0.0, 0.0, 16.0, 32.0]  # the whole image: x to W = 16, y to H = 32
    assert boxes[0, 1].tolist() == [0.0, 0.0, 8.0, 16.0]  # the first coarse grid cell (2 x 2 grid for 3 boxes)
    assert model.region_layout(batch)[0, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert model.encode_image_features(batch)["regions"].shape[:2] == (1, 4)


def test_the_config_takes_an_int_or_hw_and_a_checkpoint_keeps_it():
    cfg = load_config(None, ["data.image_size=[384,128]"])
    validate_config(cfg)
    assert image_hw(cfg.data.image_size) == (384, 128) and image_hw(64) == (64, 64)
    stored = config_to_dict(cfg)  # what every checkpoint holds
    assert stored["data"]["image_size"] == [384, 128]
    assert config_from_dict(stored).data.image_size == [384, 128]
    assert "resize to 384x128" in describe_transform(cfg.data)
    assert load_config(None, ["data.image_size=96"]).data.image_size == 96
    for bad in ("[384]", "0", "[384,0]", "abc"):
        with pytest.raises(ConfigError, match="data.image_size"):
            validate_config(load_config(None, [f"data.image_size={bad}"]))
