"""Word-level caption tokenizer (Hugging Face `tokenizers`), trained on the training captions and saved
with every run as tokenizer.json, so a checkpoint carries the exact vocabulary it was trained with.

Ids: 0 [PAD], 1 [UNK], 2 [CLS], 3 [SEP], 4 [MASK]; words start at 5. Encoded captions hold words only:
models that want a [CLS] token prepend it themselves.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from crossmatch.errors import ConfigError, DataError
from crossmatch.files import write_text

# The one token-id table: every tokenizer crossmatch builds or accepts puts these first, in this order.
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(5)
FIRST_WORD_ID = len(SPECIAL_TOKENS)  # ids from here on are words


class CaptionTokenizer:
    """Lower-cases, splits words from punctuation, maps words to ids; truncates to `max_words`."""

    def __init__(self, tokenizer: Tokenizer, max_words: int = 32):
        self.tokenizer = tokenizer
        self.max_words = max_words

    @classmethod
    def train(cls, captions: Iterable[str], min_freq: int = 1, max_words: int = 32) -> CaptionTokenizer:
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
        tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation as separate tokens
        trainer = trainers.WordLevelTrainer(min_frequency=min_freq, special_tokens=SPECIAL_TOKENS, show_progress=False)
        tok.train_from_iterator(captions, trainer=trainer)
        return cls(tok, max_words)

    @classmethod
    def from_str(cls, json_str: str, max_words: int = 32) -> CaptionTokenizer:
        """A stored tokenizer: a tokenizer.json, or the spec of an open_clip tokenizer (data/clip_tokenizer.py).
        Raises DataError when `json_str` is neither."""
        from crossmatch.data import clip_tokenizer

        if clip_tokenizer.is_spec(json_str):
            return clip_tokenizer.OpenClipTokenizer.from_str(json_str)
        try:
            return cls(Tokenizer.from_str(json_str), max_words)
        except Exception as err:  # the Rust library raises a bare Exception
            first = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
            raise DataError(f"unreadable tokenizer JSON ({first})") from err

    @classmethod
    def from_file(cls, path: str | Path, max_words: int = 32) -> CaptionTokenizer:
        return cls(Tokenizer.from_file(str(path)), max_words)

    def to_str(self) -> str:
        return self.tokenizer.to_str()

    def save(self, path: str | Path) -> None:
        write_text(path, self.to_str())

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """One caption -> word ids (at least one: an empty string maps to [UNK])."""
        ids = self.tokenizer.encode(text).ids[: self.max_words]
        return ids or [UNK_ID]

    def encode_query(self, text: str) -> list[int]:
        """A search query -> word ids; refuses (DataError) a query that is empty or whose words are all
        unknown to the vocabulary, which would otherwise be ranked as a string of [UNK] tokens."""
        if not text.strip():
            raise DataError("the query is empty")
        enc = self.tokenizer.encode(text)
        unk = self.tokenizer.token_to_id("[UNK]")
        words = [i for i, special in zip(enc.ids, enc.special_tokens_mask, strict=True) if not special]
        if not words or all(i == unk for i in words):
            raise DataError(f"no word of the query {text!r} is in the model's vocabulary ({self.vocab_size} tokens)")
        return enc.ids[: self.max_words]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [(e.ids[: self.max_words] or [UNK_ID]) for e in self.tokenizer.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i != PAD_ID])


def build_tokenizer(name: str, captions: Iterable[str], min_freq: int = 1, max_words: int = 32) -> CaptionTokenizer:
    """`word`: a word-level vocabulary trained on `captions`; otherwise a tokenizer.json file, or a folder
    holding one (a pretrained text tower's own tokenizer), or a packaged name such as `minilm`.

    A loaded tokenizer is set to truncate to `max_words` ids itself (so a [CLS] ... [SEP] template keeps
    its [SEP]) and not to pad: `collate` pads with 0 ([PAD] of BERT vocabularies and of ours) and builds
    the attention mask from the true lengths. These settings travel with the saved tokenizer.json.
    """
    if name == "word":
        captions = list(captions)
        tok = CaptionTokenizer.train(captions, min_freq, max_words)
        if tok.vocab_size <= len(SPECIAL_TOKENS):  # every caption would be [UNK] ...
            raise ConfigError(
                f"data.min_word_freq={min_freq}: no word occurs that often in the {len(captions)} train captions, "
                "so the vocabulary would hold no word; lower data.min_word_freq"
            )
        return tok
    from crossmatch.weights import resolve_text_checkpoint

    path = Path(resolve_text_checkpoint(name))
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"data.tokenizer {name!r}: no tokenizer.json there (use 'word' to train a vocabulary)")
    tok = Tokenizer.from_file(str(path))
    if tok.token_to_id("[PAD]") not in (None, PAD_ID):
        raise ConfigError(f"data.tokenizer {name!r}: [PAD] has id {tok.token_to_id('[PAD]')}, collate pads with 0")
    tok.no_padding()  # tokenizer.json files of BERT checkpoints often pad every caption to 128
    tok.enable_truncation(max_length=max_words)
    return CaptionTokenizer(tok, max_words)
