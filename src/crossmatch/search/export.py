"""ONNX export of a trained model's encoders, so embeddings can be served from other runtimes
(ONNX, onnx.ai; graphs captured with the `torch.export`-based exporter of `torch.onnx` and checked
with onnxruntime, Microsoft).

A dual encoder (VSE++, Faghri et al., BMVC 2018; `vse_pretrained`) scores a pair by the dot product of
two l2-normalised vectors, so it splits into two graphs that run independently:

    image_encoder.onnx   image (B, 3, S, S) float32, normalised as `preprocessing` says -> embed (B, E)
    text_encoder.onnx    input_ids (B, L) int64, attention_mask (B, L) int64 (1 real, 0 pad) -> embed (B, E)

B and L are dynamic. `crossmatch_onnx.json` holds what a runtime needs around them: the image
preprocessing (size, resize, scale, mean, std, layout), the tokenizer (`tokenizer.json`, loadable by
the Hugging Face `tokenizers` library in any of its languages, set to truncate and pad as training
did; the empty-caption rule), the score, and the parity measured against torch at export time.

Models whose score is not such a dot product (SCAN's cross attention over regions and words, ALBEF's
and ViLT's fusion encoders, TIPCB's part cosines) are refused as dual encoders; with `towers=True` their
unimodal towers are exported instead (`image_tower.onnx`, `text_tower.onnx`: every tensor that
`encode_image_features` / `encode_text_features` return, by name), which is what an external runtime can precompute.

Frozen towers whose per-item outputs a model caches while training (`model.cache_frozen`, keyed by the bytes
of each input) are exported uncached: a traced graph computes every tower, which gives the same numbers.

The GRU text tower packs its batch by length (`pack_padded_sequence`), which ONNX has no operator for;
the exported graph runs an equivalent `UnpackedGRU` on the padded batch instead (each direction is
read at, or started from, each caption's last real word), checked against the packed original.

Legend: B batch, S image side, L tokens, D GRU width, W word-embedding width, E embedding.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from crossmatch.config import image_hw
from crossmatch.data.clip_tokenizer import OpenClipTokenizer
from crossmatch.data.loaders import pad_sequences
from crossmatch.data.tokenizer import PAD_ID, SPECIAL_TOKENS, UNK_ID, CaptionTokenizer
from crossmatch.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from crossmatch.errors import ConfigError, ModelError, install_hint
from crossmatch.files import atomic_write, write_text
from crossmatch.models.layers import GRUTextEncoder
from crossmatch.models.protocols import PairScorer, config_of, takes_boxes

log = logging.getLogger(__name__)

MANIFEST = "crossmatch_onnx.json"
TOKENIZER_FILE = "tokenizer.json"
DUAL_FILES = {"image": "image_encoder.onnx", "text": "text_encoder.onnx"}
TOWER_FILES = {"image": "image_tower.onnx", "text": "text_tower.onnx"}
PARITY_ATOL = 1e-4  # max |onnxruntime - torch| accepted at export time, per output element
INSTALL_HINT = install_hint("export")


def require_onnx():
    """(onnx, onnxruntime), or a ConfigError with the install hint."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ConfigError(f"ONNX export needs the onnx and onnxruntime packages: {INSTALL_HINT}") from err
    return onnx, onnxruntime


class UnpackedGRU(nn.Module):
    """The computation of a `GRUTextEncoder` on a right-padded batch, without packing.

    Forward direction: the state at each caption's last real word is its packed final state. Backward
    direction: each caption's real words are reversed in place (pads stay behind them), run forward
    with the reverse weights, read at the last real word, and reversed back for the per-word states.
    Padded positions of the word states are zero, as `pad_packed_sequence` leaves them.
    """

    def __init__(self, enc: GRUTextEncoder):
        super().__init__()
        gru = enc.gru
        self.embed, self.bidirectional = enc.embed, enc.bidirectional
        self.fwd = self._direction(gru, "")
        self.bwd = self._direction(gru, "_reverse") if enc.bidirectional else None

    @staticmethod
    def _direction(gru: nn.GRU, suffix: str) -> nn.GRU:
        one = nn.GRU(gru.input_size, gru.hidden_size, batch_first=True)
        names = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
        one.load_state_dict({n: getattr(gru, n + suffix).detach().clone() for n in names})
        return one

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """input_ids, attention_mask (B, L) -> words (B, L, D) and sentence (B, D), as GRUTextEncoder."""
        B, L = input_ids.shape
        lengths = attention_mask.long().sum(1).clamp(min=1)  # (B,) packing treats an empty caption as 1 word
        last = (lengths - 1).view(B, 1, 1)  # (B, 1, 1)
        x = self.embed(input_ids)  # (B, L, W)
        words, _ = self.fwd(x)  # (B, L, D)
        H = words.shape[-1]
        sentence = words.gather(1, last.expand(B, 1, H)).squeeze(1)  # (B, D)
        if self.bwd is not None:
            t = torch.arange(L, device=input_ids.device).unsqueeze(0)  # (1, L)
            real = t < lengths.unsqueeze(1)  # (B, L)
            rev = torch.where(real, lengths.unsqueeze(1) - 1 - t, t)  # (B, L) an involution: its own inverse
            back, _ = self.bwd(x.gather(1, rev.unsqueeze(-1).expand(B, L, x.shape[-1])))  # (B, L, D) reversed order
            sentence = (sentence + back.gather(1, last.expand(B, 1, H)).squeeze(1)) / 2  # (B, D)
            words = (words + back.gather(1, rev.unsqueeze(-1).expand(B, L, H))) / 2  # (B, L, D) original order
        valid = torch.arange(L, device=input_ids.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, L)
        return words * valid.unsqueeze(-1).to(words.dtype), sentence


def uncached(model: nn.Module) -> nn.Module:
    """`model`, or for a model that caches its frozen towers' outputs (`model.cache_frozen`) a shallow copy that
    computes them on every call: a cache is keyed by the bytes of each input, which a traced graph cannot read,
    and a cached output equals the computed one. The model itself is not changed."""
    cfg = config_of(model)
    if not getattr(cfg, "cache_frozen", False):  # a field of the configs of families with frozen towers
        return model
    twin = copy.copy(model)  # shares the weights; its own attributes below
    twin.config = dataclasses.replace(cfg, cache_frozen=False)
    twin.image_cache = twin.text_cache = None  # not read without cache_frozen; not deep-copied by onnx_friendly
    return twin


def onnx_friendly(model: nn.Module) -> nn.Module:
    """A copy of `model` (eval mode) whose GRU text towers are `UnpackedGRU`s; the model is not changed."""
    twin = copy.deepcopy(model).eval()
    for name, sub in list(twin.named_modules()):
        if isinstance(sub, GRUTextEncoder):
            parent_name, _, attr = name.rpartition(".")
            setattr(twin.get_submodule(parent_name) if parent_name else twin, attr, UnpackedGRU(sub))
    return twin


class _ImageGraph(nn.Module):
    """image (B, 3, S, S) -> the tensors of encode_image_features, in the order of `keys`."""

    def __init__(self, model: nn.Module, keys: list[str]):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        out = self.model.encode_image_features({"image": image})
        return tuple(out[k] for k in self.keys)


class _TextGraph(nn.Module):
    """input_ids, attention_mask (B, L) int64 -> the tensors of encode_text_features, in the order of `keys`."""

    def __init__(self, model: nn.Module, keys: list[str]):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        out = self.model.encode_text_features({"input_ids": input_ids, "attention_mask": attention_mask > 0})
        return tuple(out[k] for k in self.keys)


def _example_text(vocab_size: int, B: int, L: int, seed: int) -> tuple[Tensor, Tensor]:
    """(B, L) random word ids and an int64 mask with uneven true lengths (row 0 full, the last row 1 word)."""
    g = torch.Generator().manual_seed(seed)
    lo = len(SPECIAL_TOKENS) if vocab_size > len(SPECIAL_TOKENS) + 1 else 1
    ids = torch.randint(lo, max(lo + 1, vocab_size), (B, L), generator=g)  # (B, L)
    lengths = torch.linspace(L, 1, B).round().long()  # (B,)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()  # (B, L)
    return ids * mask, mask


def _tensor_outputs(out: dict[str, Any]) -> list[str]:
    return sorted(k for k, v in out.items() if torch.is_tensor(v))


def probe(model: nn.Module, image_size: int, vocab_size: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """encode_image_features / encode_text_features outputs on a tiny batch, to see what the model returns."""
    with torch.no_grad():
        img = model.encode_image_features({"image": torch.zeros(2, 3, *image_hw(image_size))})
        ids, mask = _example_text(vocab_size, 2, 2, seed=0)
        txt = model.encode_text_features({"input_ids": ids, "attention_mask": mask > 0})
    return img, txt


def check_exportable(model: nn.Module, name: str, img: dict, txt: dict, towers: bool) -> None:
    """Raise a one-line ModelError when `model` cannot be exported the way asked, naming what can be."""
    if not towers:
        if set(img) == {"embed"} and set(txt) == {"embed"}:
            return
        why = (
            "its pairs are re-scored by a joint pass, score_pairs"
            if isinstance(model, PairScorer)
            else "its similarity() is not the dot product of one vector per side"
        )
        raise ModelError(
            f"model {name} is not a dual encoder ({why}: encode_image_features gives {_tensor_outputs(img)}, "
            f"encode_text_features {_tensor_outputs(txt)}); export its unimodal towers instead: "
            "crossmatch export CKPT --onnx DIR --towers"
        )
    if takes_boxes(model) or getattr(config_of(model), "regions", "") == "precomputed":
        raise ModelError(
            f"model {name} reads object boxes or precomputed region features, not just an image: its image "
            "tower cannot be exported on its own; its text tower can be used through a grid-region model"
        )


def _export_graph(
    module: nn.Module, args: tuple[Tensor, ...], path: Path, names: dict, opset: int, verbose: bool = False
) -> None:
    """One torch.export -> ONNX pass with dynamic batch (and length) axes, written atomically as one file.
    The exporter's progress lines and warnings are shown only with `verbose`.

    Raises:
        ConfigError: the graph is not of the requested `opset` (torch's exporter writes 18 and converts; the
            conversion to an older opset can fail and leave 18), before anything is written.
    """
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    dims = [{0: batch}] if len(args) == 1 else [{0: batch, 1: length}, {0: batch, 1: length}]
    quiet = contextlib.ExitStack()
    if not verbose:  # the exporter prints its steps to stdout and warns about deprecations and shape names
        quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
        quiet.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
    with quiet:
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            dynamic_shapes=tuple(dims),
            input_names=names["inputs"],
            output_names=names["outputs"],
            opset_version=opset,
            # onnxscript's optimizer drops the `+ eps` of l2norm (x / (||x|| + 1e-8)), turning the
            # zero vectors of padded words into NaN: export the graph as traced.
            optimize=False,
            verbose=verbose,
        )
    proto = program.model_proto  # weights inline: one self-contained file (models under 2 GB)
    written = graph_opset(proto)
    if written != opset:
        raise ConfigError(f"--opset {opset}: the exporter can only write opset {written}; choose --opset {written}")
    atomic_write(path, lambda f: f.write(proto.SerializeToString()))


def graph_opset(proto) -> int | None:
    """The default-domain (ai.onnx) opset an ONNX model proto imports."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def output_shapes(model: nn.Module, image_size: int, vocab_size: int, max_len: int) -> dict[str, dict[str, dict]]:
    """{"image"|"text": {output: {"shape", "dtype"}}}: each dim is a number, "batch", or "length" (+ c)
    for dims that follow the caption length, found by running the torch model at two batch shapes."""
    runs = []
    with torch.no_grad():
        for B, L in ((2, max(1, max_len - 1)), (3, max_len)):
            ids, mask = _example_text(vocab_size, B, L, seed=0)
            img = model.encode_image_features({"image": torch.zeros(B, 3, *image_hw(image_size))})
            runs.append(
                (L, {"image": img, "text": model.encode_text_features({"input_ids": ids, "attention_mask": mask > 0})})
            )
    (L0, first), (_, second) = runs
    shapes: dict[str, dict[str, dict]] = {"image": {}, "text": {}}
    for side in shapes:
        for key in _tensor_outputs(first[side]):
            a, b = first[side][key].shape, second[side][key].shape
            dims: list[Any] = []
            for d, (x, y) in enumerate(zip(a, b, strict=True)):
                c = x - L0
                dims.append(x if x == y else "batch" if d == 0 else "length" if c == 0 else f"length + {c}")
            shapes[side][key] = {"shape": dims, "dtype": str(first[side][key].dtype).removeprefix("torch.")}
    return shapes


def _ort_session(path: Path):
    _, ort = require_onnx()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _max_diff(got: list[np.ndarray], ref: tuple[Tensor, ...], keys: list[str], mask: Tensor | None) -> float:
    """Largest |onnx - torch| over every output; per-word outputs are compared on real words only
    (the contents of padded positions are unspecified: models never read them)."""
    worst = 0.0
    for key, g, r in zip(keys, got, ref, strict=True):
        r = r.detach().float().numpy() if r.is_floating_point() else r.numpy()
        if g.shape != r.shape:
            raise ModelError(f"ONNX output {key} has shape {g.shape}, torch {r.shape}")
        diff = np.abs(g.astype(np.float64) - r.astype(np.float64))
        if mask is not None and diff.ndim >= 2 and diff.shape[1] == mask.shape[1]:
            real = mask.numpy().astype(bool).reshape(*mask.shape, *([1] * (diff.ndim - 2)))
            diff = np.where(real, diff, 0.0)
        if np.isnan(diff).any():
            return float("inf")  # a NaN on one side only (both NaN also fails: an export must not make NaN)
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return worst


def verify_parity(
    model: nn.Module, out_dir: Path, files: dict[str, str], keys: dict[str, list[str]], image_size: int, tok: dict
) -> dict[str, float]:
    """Run both graphs through onnxruntime (CPU) on fresh batches of other sizes than the export examples
    (batch 1 and 5, length 1 and the longest caption) and compare with the torch model itself (packed GRU
    included). `tok`: {"vocab": vocabulary size, "max_len": longest caption in ids}."""
    worst = {"image": 0.0, "text": 0.0}
    img_sess, txt_sess = _ort_session(out_dir / files["image"]), _ort_session(out_dir / files["text"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for B, L in ((1, 1), (5, tok["max_len"])):
            image = torch.randn(B, 3, *image_hw(image_size), generator=g)  # (B, 3, S, S)
            ref = _ImageGraph(model, keys["image"])(image)
            got = img_sess.run(keys["image"], {"image": image.numpy()})
            worst["image"] = max(worst["image"], _max_diff(got, ref, keys["image"], None))
            ids, mask = _example_text(tok["vocab"], B, L, seed=B)
            ref = _TextGraph(model, keys["text"])(ids, mask)
            got = txt_sess.run(keys["text"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
            worst["text"] = max(worst["text"], _max_diff(got, ref, keys["text"], mask))
    return worst


def exported_tokenizer(tokenizer: CaptionTokenizer) -> str:
    """The tokenizer as a tokenizer.json that, on its own, gives the ids and mask training used:
    truncation to max_words and right padding with [PAD] = 0 to the longest caption of a batch. An open_clip
    tokenizer (clip models) becomes the same BPE in the `tokenizers` format (`open_clip_tokenizer_json`)."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, OpenClipTokenizer):
        return open_clip_tokenizer_json(tokenizer)

    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.enable_truncation(max_length=tokenizer.max_words)
    tok.enable_padding(direction="right", pad_id=PAD_ID, pad_token=SPECIAL_TOKENS[PAD_ID])
    return tok.to_str()


# open_clip's SimpleTokenizer splits text with this pattern after its cleaning (ftfy, whitespace, lower case).
CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def open_clip_tokenizer_json(tokenizer: OpenClipTokenizer) -> str:
    """An open_clip tokenizer as a tokenizer.json: CLIP's byte-level BPE (its vocabulary and merges, words ending
    in </w>) after NFC, whitespace folding and lower-casing, framed by [SOT] ... [EOT], truncated to the context
    length with [EOT] kept last, right-padded with the pad id; a Hugging Face tokenizer as its own tokenizer.json
    with that truncation and padding. open_clip's ftfy repair of broken Unicode is not reproduced.

    Raises:
        ModelError: an open_clip tokenizer of another kind.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

    inner, n = tokenizer.tok, tokenizer.context_length
    if hasattr(getattr(inner, "tokenizer", None), "backend_tokenizer"):  # open_clip's HFTokenizer
        tok = Tokenizer.from_str(inner.tokenizer.backend_tokenizer.to_str())
    elif hasattr(inner, "bpe_ranks") and hasattr(inner, "encoder"):  # open_clip's SimpleTokenizer (CLIP BPE)
        merges = sorted(inner.bpe_ranks, key=inner.bpe_ranks.get)  # by rank: the order BPE applies them
        tok = Tokenizer(models.BPE(vocab=dict(inner.encoder), merges=merges, end_of_word_suffix="</w>"))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        split = pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        sot, eot = inner.decoder[inner.sot_token_id], inner.decoder[inner.eot_token_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{sot} $A {eot}", special_tokens=[(sot, inner.sot_token_id), (eot, inner.eot_token_id)]
        )
    else:
        raise ModelError(
            f"cannot export the tokenizer of {tokenizer.arch or 'this clip model'} ({type(inner).__name__})"
        )
    tok.enable_truncation(max_length=n)
    tok.enable_padding(direction="right", pad_id=tokenizer.pad_id, pad_token="<pad>")
    return tok.to_str()


RESIZE_MODES = {
    "squash": "to exactly (S, S) (aspect ratio not kept, no crop)",
    "shortest": "the shorter side to S, then a centre crop of (S, S)",
}


def manifest(
    model_name: str,
    image_size: int,
    tokenizer: CaptionTokenizer,
    files: dict,
    keys: dict,
    shapes: dict,
    towers: bool,
    preprocess: dict | None = None,
) -> dict[str, Any]:
    """The JSON written next to the graphs (see the module docstring); `preprocess` holds the run's own
    image preprocessing (build_image_transform keywords; defaults ImageNet mean/std, squash, bilinear)."""
    pp = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "resize": "squash", "interpolation": "bilinear"}
    pp.update(preprocess or {})
    return {
        "format": "crossmatch-onnx",
        "version": 1,
        "model": model_name,
        "kind": "towers" if towers else "dual_encoder",
        "score": (
            "unimodal tower outputs; the model's own similarity/score_pairs combines them"
            if towers
            else "dot product of the image and text embeddings (both l2-normalised: cosine)"
        ),
        "image_encoder": {
            "file": files["image"],
            "inputs": {"image": {"shape": ["batch", 3, *image_hw(image_size)], "dtype": "float32"}},
            "outputs": {k: shapes["image"][k] for k in keys["image"]},
        },
        "text_encoder": {
            "file": files["text"],
            "inputs": {
                "input_ids": {"shape": ["batch", "length"], "dtype": "int64"},
                "attention_mask": {"shape": ["batch", "length"], "dtype": "int64", "values": "1 real token, 0 pad"},
            },
            "outputs": {k: shapes["text"][k] for k in keys["text"]},
        },
        "preprocessing": {
            "color": "RGB",
            "resize": list(image_hw(image_size)),
            "resize_mode": f"{pp['interpolation']} with antialias, {RESIZE_MODES.get(pp['resize'], pp['resize'])}",
            "scale": 1 / 255,
            "mean": list(pp["mean"]),
            "std": list(pp["std"]),
            "layout": "NCHW",
            "formula": "((pixel_uint8 / 255) - mean) / std per channel",
        },
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "max_words": tokenizer.max_words,
            "pad_id": getattr(tokenizer, "pad_id", PAD_ID),
            "empty_caption": [UNK_ID],
            "notes": (
                "tokenizer.json truncates to max_words and pads batches on the right with pad_id; "
                "a caption with no token at all is encoded as empty_caption"
            ),
        },
    }


def export_onnx(
    model: nn.Module,
    tokenizer: CaptionTokenizer,
    image_size: int,
    out_dir: str | Path,
    *,
    model_name: str,
    towers: bool = False,
    opset: int = 18,
    verify: bool = True,
    preprocess: dict | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Write the ONNX graphs, tokenizer.json and crossmatch_onnx.json of `model` into `out_dir`.

    Args:
        model: a crossmatch model (any device; exported on CPU in eval mode, not modified).
        tokenizer: the tokenizer it was trained with.
        image_size: the square input side S the model was trained at.
        model_name: the registered name (recorded, and named in refusals).
        towers: export the unimodal towers of a model that is not a dual encoder.
        opset: ONNX opset of the graphs.
        verify: run both graphs through onnxruntime and compare with torch (raises past PARITY_ATOL).
        preprocess: the run's image preprocessing (`data.transforms.preprocess_kwargs(cfg.data)`), recorded.
        verbose: show torch.onnx's progress lines and warnings.
    Returns:
        The manifest dict, with "parity" ({"image", "text"} max abs differences) when verified.
    Raises:
        ModelError: the model cannot be exported so (the message names what can), or parity fails.
        ConfigError: onnx / onnxruntime are not installed.
    """
    require_onnx()
    model = uncached(model.eval().cpu())
    vocab, max_len = tokenizer.vocab_size, max(2, tokenizer.max_words)
    img, txt = probe(model, image_size, vocab)
    check_exportable(model, model_name, img, txt, towers)
    keys = {"image": _tensor_outputs(img), "text": _tensor_outputs(txt)}
    files = TOWER_FILES if towers else DUAL_FILES
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    graph_model = onnx_friendly(model)
    ids, mask = _example_text(vocab, 3, min(7, max_len), seed=0)  # B, L > 1: size-1 examples would stay static
    image = torch.randn(2, 3, *image_hw(image_size), generator=torch.Generator().manual_seed(0))
    names = {"inputs": ["image"], "outputs": keys["image"]}
    _export_graph(_ImageGraph(graph_model, keys["image"]), (image,), out_dir / files["image"], names, opset, verbose)
    names = {"inputs": ["input_ids", "attention_mask"], "outputs": keys["text"]}
    _export_graph(_TextGraph(graph_model, keys["text"]), (ids, mask), out_dir / files["text"], names, opset, verbose)
    shapes = output_shapes(model, image_size, vocab, max_len)
    info = manifest(model_name, image_size, tokenizer, files, keys, shapes, towers, preprocess)
    info["opset"] = opset  # what both graphs import (_export_graph checks it)
    if verify:
        parity = verify_parity(model, out_dir, files, keys, image_size, {"vocab": vocab, "max_len": max_len})
        info["parity"] = {"max_abs_diff": parity, "atol": PARITY_ATOL, "runtime": "onnxruntime CPU"}
        bad = {k: v for k, v in parity.items() if not v <= PARITY_ATOL}
        if bad:
            raise ModelError(f"ONNX export of {model_name} differs from torch by {bad} (> {PARITY_ATOL}) in {out_dir}")
    write_text(out_dir / TOKENIZER_FILE, exported_tokenizer(tokenizer))
    write_text(out_dir / MANIFEST, json.dumps(info, indent=2))
    return info


class OnnxDualEncoder:
    """Embeddings from an exported dual encoder through onnxruntime alone (no torch model): the reference
    consumer of crossmatch_onnx.json, used by the tests."""

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise ModelError(f"not a crossmatch ONNX export (no {MANIFEST}): {self.folder}")
        self.info = json.loads(path.read_text())
        if self.info.get("kind") != "dual_encoder":
            raise ModelError(f"{self.folder} holds unimodal towers, not a dual encoder")
        self.image = _ort_session(self.folder / self.info["image_encoder"]["file"])
        self.text = _ort_session(self.folder / self.info["text_encoder"]["file"])
        self.tokenizer = Tokenizer.from_file(str(self.folder / self.info["tokenizer"]["file"]))

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Captions -> input_ids, attention_mask (B, L) int64, as the manifest prescribes."""
        empty = self.info["tokenizer"]["empty_caption"]
        enc = self.tokenizer.encode_batch(texts)
        seqs = [[i for i, m in zip(e.ids, e.attention_mask, strict=True) if m] or empty for e in enc]
        ids, mask = pad_sequences(seqs, self.info["tokenizer"]["pad_id"])  # (B, L) each
        return ids.numpy(), mask.long().numpy()

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """Captions -> (B, E) float32 embeddings."""
        ids, mask = self.tokenize(texts)
        return self.text.run(["embed"], {"input_ids": ids, "attention_mask": mask})[0]

    def encode_image(self, images: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32 preprocessed images -> (B, E) float32 embeddings."""
        return self.image.run(["embed"], {"image": np.ascontiguousarray(images, dtype=np.float32)})[0]
