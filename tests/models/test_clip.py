"""The clip family (open_clip models): tokenizer round trip, padding, preprocessing, partial training,
layer-wise lr decay, bad names, and the CLI end to end on a tiny random-initialised architecture."""

import json
import math

import pytest
import torch

pytest.importorskip("open_clip")

from crossmatch.cli.main import main  # noqa: E402
from crossmatch.config import LossConfig, TrainConfig  # noqa: E402
from crossmatch.data.clip_tokenizer import OpenClipTokenizer  # noqa: E402
from crossmatch.data.loaders import pad_sequences  # noqa: E402
from crossmatch.data.tokenizer import CaptionTokenizer  # noqa: E402
from crossmatch.data.transforms import build_image_transform  # noqa: E402
from crossmatch.engine.checkpoint import load_checkpoint  # noqa: E402
from crossmatch.engine.optim import create_optimizer  # noqa: E402
from crossmatch.errors import ConfigError, ModelError  # noqa: E402
from crossmatch.models import create_model  # noqa: E402
from crossmatch.models.registry import create_tokenizer  # noqa: E402
from crossmatch.tasks import build_task  # noqa: E402

SOT, EOT = 49406, 49407  # CLIP's BPE: <start_of_text>, <end_of_text> (the largest id: argmax pooling finds it)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("tiny_clip").eval()


def test_tokenizer_round_trips_through_its_stored_string():
    tok = create_tokenizer("tiny_clip")
    ids = tok.encode_batch(["A red circle!", "a blue square left of a red circle"])
    assert ids[0] == [SOT, 320, 736, 7117, 256, EOT]  # lower-cased BPE words, "!" a token of its own
    back = CaptionTokenizer.from_str(tok.to_str())  # what checkpoints store: a spec, not a vocabulary
    assert isinstance(back, OpenClipTokenizer) and back.encode_batch(["A red circle!"]) == ids[:1]
    long = tok.encode("word " * 40)  # context length 16: cut, the end token kept last
    assert len(long) == 16 and long[0] == SOT and long[-1] == EOT
    assert json.loads(tok.to_str())["text_cfg"]["context_length"] == 16


def test_text_embedding_ignores_how_a_batch_is_padded(tiny):
    tok = tiny.make_tokenizer()
    caps = ["a red circle", "a huge cobalt plus is above a tiny white box"]
    ids, mask = pad_sequences(tok.encode_batch(caps))  # (2, L) 0-padded as collate pads
    together = tiny.encode_text_features({"input_ids": ids, "attention_mask": mask})["embed"]
    for i, c in enumerate(caps):
        one, m = pad_sequences([tok.encode(c)])
        alone = tiny.encode_text_features({"input_ids": one, "attention_mask": m})["embed"]
        torch.testing.assert_close(alone[0], together[i], rtol=1e-5, atol=1e-6)
    assert together.norm(dim=1).sub(1).abs().max() < 1e-5


def test_every_trainable_parameter_gets_a_gradient_and_open_clips_scale_is_frozen(tiny):
    model = create_model("tiny_clip")
    task = build_task(model, LossConfig(name="infonce"))
    ids, mask = pad_sequences(model.make_tokenizer().encode_batch(["a", "a red box", "two blue stars"]))
    batch = {"image": torch.randn(3, 3, 32, 32), "input_ids": ids, "attention_mask": mask}
    batch["image_idx"] = torch.tensor([0, 1, 2])
    losses, _ = task.training_step(batch)
    losses["infonce_loss"].backward()
    missing = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing and not model.clip.logit_scale.requires_grad  # the task learns its own temperature


def test_preprocessing_is_open_clips_and_crops_instead_of_squashing(tiny):
    assert tiny.preprocess["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert tiny.preprocess["resize"] == "shortest" and tiny.preprocess["interpolation"] == "bicubic"
    # A 3:1 image, red | blue | red: the shorter side to 8 px, then the centre crop sees only the blue third.
    img = torch.zeros(3, 8, 24, dtype=torch.uint8)
    img[0, :, :8] = img[0, :, 16:] = 255
    img[2, :, 8:16] = 255
    t = build_image_transform(8, train=False, mean=(0, 0, 0), std=(1, 1, 1), resize="shortest")
    out = t(img)
    assert out.shape == (3, 8, 8) and out[2].min() > 0.99 and out[0].max() < 0.01
    squashed = build_image_transform(8, train=False, mean=(0, 0, 0), std=(1, 1, 1))(img)
    assert squashed[0].max() > 0.99  # the old default squashes: red is still there


def test_unknown_arch_and_tag_list_what_exists():
    with pytest.raises(ModelError, match=r"unknown open_clip arch 'ViT-X'; known: .*ViT-B-32") as err:
        create_model("clip", arch="ViT-X")
    assert "\n" not in str(err.value)
    with pytest.raises(ModelError, match=r"pretrained tag 'nope' for ViT-B-32; known: openai, .*laion2b_s34b_b79k"):
        create_model("clip", pretrained="nope")


def test_weights_that_cannot_be_fetched_say_so_in_one_line(monkeypatch):
    import open_clip

    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'laion2b_s34b_b79k': no network\n(traceback...)")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(ModelError, match=r"hub \(.*: Failed to download weights .*: no network\); .*local-dir:") as err:
        create_model("clip", pretrained="laion2b_s34b_b79k")
    assert "\n" not in str(err.value)


def test_locked_towers_train_only_their_unlocked_groups():
    model = create_model("tiny_clip", lock_image=True, unlocked_image_groups=1, lock_text=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"clip.visual.proj"}  # open_clip's last image group is the projection; text all frozen


def test_layer_decay_scales_the_lr_by_depth():
    model = create_model("tiny_clip")
    task = build_task(model, LossConfig(name="infonce"))
    opt = create_optimizer(task, TrainConfig(lr=1.0, layer_decay=0.5))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(task.named_parameters())
    # each tower: embeddings depth 0, block i depth i + 1, head depth 3 (two blocks): lr 0.5 ** (3 - depth)
    assert lr_of[id(named["model.clip.visual.conv1.weight"])] == 0.125
    assert lr_of[id(named["model.clip.visual.transformer.resblocks.0.mlp.c_fc.weight"])] == 0.25
    assert lr_of[id(named["model.clip.visual.transformer.resblocks.1.mlp.c_fc.weight"])] == 0.5
    assert lr_of[id(named["model.clip.visual.proj"])] == 1.0
    assert lr_of[id(named["model.clip.token_embedding.weight"])] == 0.125
    assert lr_of[id(named["model.clip.transformer.resblocks.1.attn.in_proj_weight"])] == 0.5
    assert lr_of[id(named["logit_scale"])] == 1.0  # the task's temperature: full lr
    assert len(lr_of) == sum(p.requires_grad for p in task.parameters())
    with pytest.raises(ConfigError, match="does not describe its layers"):
        create_optimizer(build_task(create_model("tiny_vse", vocab_size=9), LossConfig()), TrainConfig(layer_decay=0.5))


def test_the_shapes_recipe_builds_its_custom_architecture():
    from crossmatch.config import load_config

    cfg = load_config("configs/clip_shapes.yaml")
    overrides = {k: v for k, v in cfg.model.items() if k != "name"}
    model = create_model(cfg.model["name"], **overrides)
    assert model.preprocess["size"] == 64 and model.context_length == 32 and cfg.loss.name == "infonce"
    assert len(model.clip.visual.transformer.resblocks) == 3


def clip_args(root, run_dir, *extra):
    return [
        "train",
        "configs/vse_shapes.yaml",
        "--run-dir",
        str(run_dir),
        f"data.root={root}",
        "model.name=tiny_clip",
        "loss.name=infonce",
        "train.epochs=1",
        "train.batch_size=8",
        "train.accum_steps=2",
        "train.max_steps_per_epoch=3",
        "train.warmup_steps=0",
        "eval.batch_size=16",
        *extra,
    ]


@pytest.mark.slow
def test_train_evaluate_search_and_zero_shot_through_the_cli(shapes_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(clip_args(shapes_root, run, "train.grad_checkpointing=true")) == 0
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["config"]["data"]["resize"] == "shortest" and ckpt["config"]["data"]["image_size"] == 32
    assert set(ckpt["loss"]) == {"logit_scale"} and ckpt["loss"]["logit_scale"] != pytest.approx(math.log(1 / 0.07))
    assert json.loads(ckpt["tokenizer"])["format"] == "open_clip"
    best = str(run / "checkpoints" / "best.pt")
    capsys.readouterr()
    assert main(["evaluate", best, "--split", "val", "--json", str(tmp_path / "m.json")]) == 0
    # the checkpoint evaluates to what the run measured on val at the end of its epoch
    assert json.loads((tmp_path / "m.json").read_text())["rsum"] == pytest.approx(ckpt["trainer"]["history"][0]["rsum"])
    assert main(["search", best, "--query", "a red circle", "--top-k", "3"]) == 0
    assert len([ln for ln in capsys.readouterr().out.splitlines() if ln.strip()[:1].isdigit()]) == 3
    # index and features read images with the run's own preprocessing
    assert main(["index", "build", best, str(shapes_root / "images"), "--out", str(tmp_path / "idx")]) == 0
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["preprocess"]["resize"] == "shortest" and meta["embed_dim"] == 32
    assert main(["features", best, "--data", str(shapes_root), "--out", str(tmp_path / "f"), "--kind", "grid"]) == 0
    info = json.loads((tmp_path / "f" / "features.json").read_text())["test"]
    assert info["shape"] == [12, 16, 32] and info["normalisation"]["mean"][0] == pytest.approx(0.48145466)
    # zero-shot: an untrained model built from its config (a positional override after --model is one)
    zs = ["evaluate", "--model", "tiny_clip", "model.lock_text=true", "--data", str(shapes_root), "--split", "test"]
    assert main([*zs, "--json", str(tmp_path / "z.json")]) == 0
    assert "tiny_clip on" in capsys.readouterr().out and "t2i_r1" in json.loads((tmp_path / "z.json").read_text())
    # resume restores the objective's temperature (the checkpoint's loss entry): resumed == uninterrupted
    assert main(clip_args(shapes_root, run, "train.epochs=2", "train.grad_checkpointing=true", "--resume")) == 0
    assert main(clip_args(shapes_root, tmp_path / "straight", "train.epochs=2", "train.grad_checkpointing=true")) == 0
    a = load_checkpoint(run / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    assert a["trainer"]["global_step"] == 6 and torch.equal(a["loss"]["logit_scale"], b["loss"]["logit_scale"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_a_clip_checkpoint_is_the_first_stage_of_a_fusion_model(shapes_root, tmp_path):
    from tests.helpers import train_args

    assert main(clip_args(shapes_root, tmp_path / "clip")) == 0
    assert main(train_args(shapes_root, tmp_path / "albef", "model.name=tiny_albef", "train.epochs=1")) == 0
    clip, albef = str(tmp_path / "clip"), str(tmp_path / "albef")
    out = {name: tmp_path / f"{name}.json" for name in ("clip", "stage1", "full", "own_full")}
    assert main(["evaluate", clip, "--json", str(out["clip"])]) == 0
    # without re-ranking, the fusion model's evaluation ranks by the clip model's scores
    assert main(["evaluate", albef, f"eval.first_stage={clip}", "eval.rerank_k=0", "--json", str(out["stage1"])]) == 0
    # re-ranking every candidate makes the first stage irrelevant: the fusion model's own full scoring
    k = "eval.rerank_k=60"  # all 60 test captions (12 images)
    assert main(["evaluate", albef, f"eval.first_stage={clip}", k, "--json", str(out["full"])]) == 0
    assert main(["evaluate", albef, k, "--json", str(out["own_full"])]) == 0
    read = {name: json.loads(path.read_text()) for name, path in out.items()}
    assert read["stage1"] == read["clip"] and read["full"] == read["own_full"]


@pytest.mark.slow
def test_bad_clip_names_are_one_line_and_exit_2(shapes_root, tmp_path, capsys):
    zs = ["evaluate", "--model", "clip", "--data", str(shapes_root)]
    assert main([*zs, "model.arch=ViT-X"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown open_clip arch 'ViT-X'; known:" in err[0]
    assert main(clip_args(shapes_root, tmp_path / "bad", "data.tokenizer=minilm")) == 2
    assert "brings its own tokenizer" in capsys.readouterr().err
    assert main(["evaluate", "--model", "tiny_clip"]) == 2  # no --data
    assert "--model NAME with --data ROOT" in capsys.readouterr().err
    assert main(clip_args(shapes_root, tmp_path / "bad", "model.name=tiny_vse", "train.layer_decay=0.5")) == 2
    assert "does not describe its layers" in capsys.readouterr().err
