"""open_clip's own tokenizers (CLIP's byte-level BPE, or the Hugging Face tokenizer an architecture names)
behind the interface of `CaptionTokenizer`, so the loaders, the CLI and checkpoints treat both alike.

A checkpoint stores a tokenizer as a string. For these it is a small JSON spec, not the vocabulary:
    {"format": "open_clip", "arch": "ViT-B-32", "text_cfg": {"context_length": 77, ...}}
The BPE vocabulary ships inside the `open_clip_torch` package (Hugging Face tokenizers come from its
cache). `CaptionTokenizer.from_str` recognises the spec and returns an `OpenClipTokenizer`.

Encoded captions are the model's full token sequence ([SOT] words [EOT] for CLIP) without the padding;
`collate` pads with 0 and the model re-pads with its own pad id to the context length it was trained with.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from crossmatch.errors import DataError, ModelError, install_hint
from crossmatch.files import write_text

FORMAT = "open_clip"
TEXT_KEYS = ("context_length", "hf_tokenizer_name", "tokenizer_kwargs", "tokenizer_mode")


def is_spec(text: str) -> bool:
    """True when a stored tokenizer string is an open_clip spec (small JSON whose "format" is "open_clip";
    a tokenizer.json is large and has no such key)."""
    if len(text) > 4096 or not text.lstrip().startswith("{"):
        return False
    try:
        return json.loads(text).get("format") == FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def open_clip_module():
    try:
        import open_clip
    except ImportError as err:
        raise ModelError(f"the clip family needs open_clip: {install_hint('clip')}") from err
    return open_clip


class OpenClipTokenizer:
    """Captions -> open_clip token ids; `to_str` gives the spec that rebuilds it."""

    def __init__(self, arch: str, text_cfg: dict[str, Any]):
        open_clip = open_clip_module()
        self.arch, self.text_cfg = arch, {k: text_cfg[k] for k in TEXT_KEYS if text_cfg.get(k) is not None}
        self.context_length = int(self.text_cfg.get("context_length", 77))
        self.max_words = self.context_length
        kwargs = dict(self.text_cfg.get("tokenizer_kwargs") or {})
        try:
            if arch and open_clip.get_model_config(arch) is not None:
                self.tok = open_clip.get_tokenizer(arch, context_length=self.context_length)
            elif self.text_cfg.get("hf_tokenizer_name"):
                mode = self.text_cfg.get("tokenizer_mode")
                name = self.text_cfg["hf_tokenizer_name"]
                self.tok = open_clip.tokenizer.HFTokenizer(name, self.context_length, tokenizer_mode=mode, **kwargs)
            else:
                self.tok = open_clip.SimpleTokenizer(context_length=self.context_length, **kwargs)
        except OSError as err:  # a Hugging Face tokenizer that is neither cached nor reachable
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelError(
                f"open_clip tokenizer of {arch or 'the custom architecture'} needs the network: {first}"
            ) from err
        inner = getattr(self.tok, "tokenizer", None)
        self.pad_id = int(getattr(inner, "pad_token_id", None) or 0)

    @classmethod
    def from_str(cls, text: str) -> OpenClipTokenizer:
        spec = json.loads(text)
        return cls(spec.get("arch", ""), spec.get("text_cfg", {}))

    def to_str(self) -> str:
        return json.dumps({"format": FORMAT, "arch": self.arch, "text_cfg": self.text_cfg}, sort_keys=True)

    def save(self, path: str | Path) -> None:
        write_text(path, self.to_str())

    @property
    def vocab_size(self) -> int:
        inner = getattr(self.tok, "tokenizer", None)
        return int(getattr(self.tok, "vocab_size", None) or len(inner))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Captions -> id lists up to their last non-padding token ([EOT] for CLIP), at most context_length."""
        if not texts:
            return []
        ids = self.tok(list(texts))  # (N, context_length), padded with pad_id
        real = ids != self.pad_id  # (N, C); the last real token ends the caption (pad ids inside are kept)
        lengths = (real.long().cumsum(1).argmax(1) + 1).tolist()
        return [row[:n] for row, n in zip(ids.tolist(), lengths, strict=True)]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_query(self, text: str) -> list[int]:
        """A search query -> ids; byte-level BPE knows every word, so only an empty query is refused."""
        if not text.strip():
            raise DataError("the query is empty")
        return self.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [i for i in ids if i != self.pad_id]
        if hasattr(self.tok, "decode"):
            return self.tok.decode(ids)
        return self.tok.tokenizer.decode(ids, skip_special_tokens=True)
