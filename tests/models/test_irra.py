"""The IRRA family (models/irra.py): the bilinear resize of a ViT's position grid on a hand-made grid, tall
inputs through the open_clip towers, the retrieval face (open_clip's embeddings, no cross-modal module),
the cross-modal encoder's shapes and padding rule, and what save_pretrained and the tower lr leave out."""

import pytest
import torch

pytest.importorskip("open_clip")

from crossmatch.config import TrainConfig  # noqa: E402
from crossmatch.engine.optim import create_optimizer  # noqa: E402
from crossmatch.models import create_model  # noqa: E402
from crossmatch.models.irra import resize_pos_embed  # noqa: E402
from crossmatch.models.registry import create_tokenizer  # noqa: E402

SOT, EOT = 49406, 49407


def tiny(**overrides):
    torch.manual_seed(0)
    return create_model("tiny_irra", data_defaults={"image_size": [64, 24]}, **overrides).eval()


def test_the_position_grid_is_resized_bilinearly_on_a_hand_made_grid():
    # grid (h=2, w=2): channel 0 holds [[0, 1], [2, 3]], channel 1 ten times that; the class row is 7, 70.
    pos = torch.tensor([[7.0, 70.0], [0.0, 0.0], [1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])  # (1 + 2*2, D=2)
    out = resize_pos_embed(pos, (2, 2), (4, 2))  # (1 + 4*2, 2)
    # Rows to 4 with align_corners=False: output row i samples input row (i + 0.5) * 2/4 - 0.5 =
    # -0.25, 0.25, 0.75, 1.25, clamped to [0, 1] -> weights of row 1: 0, 0.25, 0.75, 1. Columns stay.
    grid0 = [[0.0, 1.0], [0.5, 1.5], [1.5, 2.5], [2.0, 3.0]]
    expected = torch.tensor([[7.0, 70.0]] + [[v, 10 * v] for row in grid0 for v in row])
    torch.testing.assert_close(out, expected)


def test_a_tall_input_builds_its_grid_from_the_square_one():
    square = tiny(image_size=32)  # tiny_clip's own 4 x 4 grid of 8 px patches
    tall = tiny()  # the same seed: the same weights before the resize
    assert square.clip.visual.grid_size == (4, 4) and tall.clip.visual.grid_size == (8, 3)
    ref = resize_pos_embed(square.clip.visual.positional_embedding.detach(), (4, 4), (8, 3))
    torch.testing.assert_close(tall.clip.visual.positional_embedding.detach(), ref)
    assert tall.preprocess["size"] == [64, 24] and tall.preprocess["resize"] == "squash"
    with torch.no_grad():
        emb = tall.encode_image(torch.randn(2, 3, 64, 24), normalize=True)
    assert emb.shape == (2, 32) and torch.isfinite(emb).all()


def test_the_retrieval_face_is_the_open_clip_towers_alone():
    model = tiny()
    assert model.family == "irra"
    ids = torch.tensor(create_tokenizer("tiny_irra").encode_batch(["a man in a red shirt"]))  # (1, L) with SOT, EOT
    mask = torch.ones_like(ids, dtype=torch.bool)
    image = torch.randn(2, 3, 64, 24)
    with torch.no_grad():
        img = model.encode_image_features({"image": image})
        txt = model.encode_text_features({"input_ids": ids, "attention_mask": mask})
        assert set(img) == {"embed"} and set(txt) == {"embed"}  # nothing of the cross-modal encoder
        full = model._padded(ids, mask)
        torch.testing.assert_close(txt["embed"], torch.nn.functional.normalize(model.clip.encode_text(full), dim=-1))
        tokens = model.image_tokens(image)  # the training pass: the same embedding plus the projected tokens
        torch.testing.assert_close(tokens["embed"], img["embed"])
        assert tokens["tokens"].shape == (2, 1 + 8 * 3, 32)
        # the projected class token is the (unnormalised) embedding; the EOT token the caption's embedding
        torch.testing.assert_close(torch.nn.functional.normalize(tokens["tokens"][:, 0], dim=-1), img["embed"])
        words = model.text_tokens(ids, mask)  # (1, L, E)
        eot = torch.nn.functional.normalize(words[0, ids[0].tolist().index(EOT)], dim=-1)
        torch.testing.assert_close(eot, txt["embed"][0])


def test_the_cross_modal_encoder_ignores_padding_after_a_caption():
    model = tiny()
    image = model.image_tokens(torch.randn(1, 3, 64, 24))["tokens"]  # (1, R, E)
    ids = torch.tensor([[SOT, 320, 1125, EOT]])
    padded = torch.tensor([[SOT, 320, 1125, EOT, 0, 0]])
    with torch.no_grad():
        short = model.relation_features(image, ids, torch.ones(1, 4, dtype=torch.bool))  # (1, 4, E)
        longer = model.relation_features(image, padded, padded != 0)  # (1, 6, E)
    assert short.shape == (1, 4, 32) and model.mlm_head(short).shape == (1, 4, 49408)
    torch.testing.assert_close(longer[:, :4], short)  # the padded slots change nothing of the real tokens


def test_save_pretrained_and_the_tower_lr_leave_the_training_only_modules_aside():
    model, plain = tiny(), tiny(mlm=False)
    train_only = set(model.training_only_keys())
    assert train_only and all(k.startswith(("cross_encoder.", "mlm_head.")) for k in train_only)
    assert set(model.state_dict()) - train_only == set(plain.state_dict())  # the dual encoder, exactly
    opt = create_optimizer(model, TrainConfig(lr=5e-5, tower_lr=1e-5))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if not p.requires_grad:  # open_clip's own temperature stays frozen (models/clip.py)
            continue
        assert lr_of[id(p)] == (1e-5 if name.startswith("clip.") else 5e-5), name
