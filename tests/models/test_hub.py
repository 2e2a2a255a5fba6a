"""Hugging Face-style files and the hub, offline: save_pretrained / from_pretrained folders, open_clip's
`local-dir:` names, hub ids and pretrained tags failing fast in one whole line when the hub does not answer."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import crossmatch
from crossmatch.config import config_to_dict
from crossmatch.engine.checkpoint import atomic_save
from crossmatch.errors import ModelError
from crossmatch.models.hub import first_words
from crossmatch.runs import build_untrained_run


def untrained_checkpoint(root, path, name, *overrides, **entries):
    torch.manual_seed(0)
    model, cfg, tok = build_untrained_run(name, str(root), ["data.image_size=32", *overrides])
    state = {"model": model.state_dict(), "config": config_to_dict(cfg), "tokenizer": tok.to_str(), **entries}
    atomic_save(state, path)
    return path


@pytest.fixture
def silent_hub(tmp_path, monkeypatch):
    """A 127.0.0.1 'hub' that accepts connections and never answers, as HF_ENDPOINT; an empty cache."""
    from huggingface_hub import constants

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])  # keep the connection open, never answer
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)  # what huggingface_hub derives from HF_ENDPOINT on import
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    for name in ("HF_HUB_OFFLINE", "HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    yield url
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_save_pretrained_writes_the_files_that_from_pretrained_reads(shapes_root, tmp_path):
    history = [{"epoch": 1, "rsum": 10.0}, {"epoch": 2, "rsum": 42.5, "i2t_r1": 8.25, "hinge_loss": 0.5}]
    trainer = {"best_epoch": 2, "history": history}
    model = crossmatch.load(untrained_checkpoint(shapes_root, tmp_path / "vse.pt", "tiny_vse", trainer=trainer))
    folder = model.save_pretrained(tmp_path / "hf")
    names = {"model.safetensors", "config.json", "preprocess.json", "tokenizer.json", "README.md"}
    assert {p.name for p in folder.iterdir()} == names
    assert json.loads((folder / "config.json").read_text())["model"]["name"] == "tiny_vse"
    assert json.loads((folder / "preprocess.json").read_text())["size"] == 32
    card = (folder / "README.md").read_text()
    assert "family: `tiny_vse`" in card and f"`{shapes_root}`" in card and "create_model_and_transforms" in card
    assert "| val rsum (epoch 2) | 42.50 |" in card and "| val i2t_r1 (epoch 2) | 8.25 |" in card
    assert "10.00" not in card and "loss" not in card.split("## Metrics")[1].split("##")[0]  # best epoch, no losses
    again = crossmatch.from_pretrained(folder)
    texts = ["a red circle", "two blue squares"]
    assert torch.equal(again.encode(texts, convert_to_tensor=True), model.encode(texts, convert_to_tensor=True))
    assert torch.equal(crossmatch.get_tokenizer(str(folder))(texts), model.tokenizer(texts))
    _, _, pp = crossmatch.create_model_and_transforms(str(folder))
    assert dict(pp) == dict(model.preprocess)


def test_save_pretrained_leaves_training_only_modules_out(shapes_root, tmp_path):
    model = crossmatch.load(untrained_checkpoint(shapes_root, tmp_path / "albef.pt", "tiny_albef"))
    assert model.training_only_keys()  # momentum copies and queues exist ...
    folder = model.save_pretrained(tmp_path / "hf")
    saved = load_file(str(folder / "model.safetensors"))
    assert not set(saved) & set(model.training_only_keys())  # ... and are not saved
    assert set(saved) | set(model.training_only_keys()) == set(model.state_dict())
    again = crossmatch.from_pretrained(folder)
    images, texts = [torch.zeros(3, 32, 32, dtype=torch.uint8)], ["a red circle", "a blue square"]
    torch.testing.assert_close(crossmatch.score(again, images, texts), crossmatch.score(model, images, texts))


def test_a_clip_model_saves_its_open_clip_tokenizer_spec(shapes_root, tmp_path):
    model = crossmatch.load(untrained_checkpoint(shapes_root, tmp_path / "clip.pt", "tiny_clip"))
    folder = model.save_pretrained(tmp_path / "hf")
    assert (folder / "open_clip_tokenizer.json").is_file() and not (folder / "tokenizer.json").exists()
    ids = crossmatch.get_tokenizer(str(folder))(["a red circle"])
    assert torch.equal(ids, model.tokenizer(["a red circle"]))


def test_clip_takes_open_clips_local_dir_names(tmp_path):
    import open_clip

    from crossmatch.models.clip import TINY_ARCH

    torch.manual_seed(3)
    reference = open_clip.CLIP(**TINY_ARCH).eval()
    folder = tmp_path / "oc"
    folder.mkdir()
    spec = {"model_cfg": TINY_ARCH, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    (folder / "open_clip_config.json").write_text(json.dumps(spec))
    save_file(
        {k: v.contiguous() for k, v in reference.state_dict().items()}, str(folder / "open_clip_model.safetensors")
    )
    model, _, pp = crossmatch.create_model_and_transforms(f"local-dir:{folder}")
    assert pp["mean"] == [0.5] * 3 and pp["std"] == [0.25] * 3 and pp["size"] == 32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), torch.nn.functional.normalize(reference.encode_image(x)))
    # the architecture travels with the model: its saved folder loads after the open_clip folder is gone
    saved = model.save_pretrained(tmp_path / "hf")
    for p in folder.iterdir():
        p.unlink()
    again = crossmatch.from_pretrained(saved)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(x), model.encode_image(x))
    with pytest.raises(ModelError, match="no open_clip_config.json"):
        crossmatch.create_model_and_transforms(f"local-dir:{folder}")


@pytest.mark.parametrize("name", ["someone/tiny-crossmatch", "hf-hub:someone/tiny-open-clip"])
def test_a_hub_id_fails_fast_in_one_line_when_the_hub_does_not_answer(silent_hub, name):
    start = time.monotonic()
    with pytest.raises(ModelError) as err:
        crossmatch.create_model_and_transforms(name)  # a crossmatch save_pretrained repo / an open_clip one
    elapsed = time.monotonic() - start
    msg = str(err.value)
    assert "\n" not in msg and name.removeprefix("hf-hub:") in msg and "local-dir:" in msg
    assert elapsed < 15, f"took {elapsed:.1f} s"  # one request of HUB_TIMEOUT (3 s) decides; was minutes


def test_push_to_hub_uploads_the_save_pretrained_folder(shapes_root, tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    class FakeApi:  # records what the real HfApi would be asked to do
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls["repo"] = (repo_id, private, exist_ok)
            return f"https://hub.example/{repo_id}"

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls["files"] = sorted(p.name for p in folder_path.iterdir())

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = crossmatch.load(untrained_checkpoint(shapes_root, tmp_path / "vse.pt", "tiny_vse"))
    assert model.push_to_hub("me/tiny", private=True) == "https://hub.example/me/tiny"
    assert calls["repo"] == ("me/tiny", True, True)
    assert calls["files"] == ["README.md", "config.json", "model.safetensors", "preprocess.json", "tokenizer.json"]


def test_first_words_never_cuts_a_word():
    text = "Failed to download file (open_clip_pytorch_model.bin) for laion/CLIP-ViT-B-32 " * 5 + "\nsecond line"
    short = first_words(text, limit=100)
    assert len(short) <= 104 and short.endswith(" ...") and "second" not in short
    assert text.startswith(short.removesuffix(" ..."))
    assert text[len(short.removesuffix(" ..."))] == " "  # the cut falls between two words
    assert first_words("one line") == "one line"


def test_a_pretrained_tag_fails_in_seconds_in_one_whole_line_when_the_hub_does_not_answer(silent_hub, tmp_path, capsys):
    from crossmatch.cli.main import main

    start = time.monotonic()
    rc = main(["evaluate", "--model", "clip", "model.pretrained=laion2b_s34b_b79k", "--data", str(tmp_path / "data")])
    elapsed = time.monotonic() - start
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("crossmatch: error:")]
    assert rc == 2 and len(errors) == 1
    assert "laion2b_s34b_b79k" in errors[0] and "local-dir:" in errors[0] and "model.pretrained=/path/to" in errors[0]
    assert errors[0].endswith("save_pretrained folder works")  # whole: the hint at its end is intact
    assert elapsed < 15, f"took {elapsed:.1f} s"  # one request of HUB_TIMEOUT (3 s) decides; was over 5 minutes
