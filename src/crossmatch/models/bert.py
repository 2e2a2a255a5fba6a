"""BERT-layout transformer layers (Devlin et al., NAACL 2019) that take a Hugging Face BERT-family checkpoint
tensor by tensor: the pretrained starts of the fusion models. ALBEF (Li et al., NeurIPS 2021) initialises its
text encoder with the first half of BERT's layers and its fusion encoder with the second half, adding a freshly
initialised cross-attention to each fusion layer; ViLT (Kim et al., ICML 2021) runs one such stack over
[text; image] tokens.

The layers are post-norm as BERT's (written here, not borrowed from `transformers`, so the cross-attention
can sit inside them as in ALBEF's `BertLayer`):
    x = LN(x + SelfAttn(x));  [x = LN(x + CrossAttn(x, context))];  x = LN(x + FFN(x)).
`load_mapped` copies a checkpoint's tensors by an explicit name map and is strict: a mapped name that is
missing, a shape that differs, or a checkpoint tensor that nothing uses is a ModelError naming it. What it did
is an `InitReport` (pretrained tensor -> parameter, and every parameter it did not fill).

Legend: B batch, L tokens (queries), M context tokens (keys), D width, H heads, Dh head width, F FFN width.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossmatch.errors import ModelError
from crossmatch.weights import resolve_text_checkpoint

log = logging.getLogger(__name__)

SUPPORTED_TYPES = ("bert",)  # the checkpoint layouts whose names `layer_map` knows (BERT, MiniLM, ...)
ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}  # -> F.gelu(approximate=...)


@dataclass
class BertShape:
    """The architecture facts of a checkpoint's config.json that the layers need."""

    width: int  # hidden_size D
    heads: int  # num_attention_heads H
    ffn: int  # intermediate_size F
    layers: int  # num_hidden_layers
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    eps: float  # layer_norm_eps
    act: str  # hidden_act


def read_checkpoint(name: str, load_weights: bool = True) -> tuple[BertShape, dict[str, Tensor] | None, str]:
    """A BERT-family checkpoint folder, packaged short name (`minilm`) or hub id -> its shape, its state dict
    (None when `load_weights` is False) and the resolved source.

    Raises:
        ModelError: one line naming the checkpoint when it cannot be read or is not a BERT-layout model.
    """
    from crossmatch.models.pretrained import require

    transformers = require("transformers")
    source = resolve_text_checkpoint(name)
    local = Path(source).is_dir()
    if local and not (Path(source) / "config.json").is_file():
        raise ModelError(f"text checkpoint {name!r}: {source} has no config.json (not a Hugging Face model folder)")
    try:
        cfg = transformers.AutoConfig.from_pretrained(source, local_files_only=local)
        state = None
        if load_weights:
            state = _quiet_load(transformers, source, local)
    except (OSError, ValueError, RuntimeError, KeyError) as err:  # missing files, corrupt weights, bad hub id
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ModelError(f"text checkpoint {name!r}: cannot read it: {first}") from err
    if cfg.model_type not in SUPPORTED_TYPES:
        raise ModelError(f"text checkpoint {name!r} is a {cfg.model_type!r} model; supported: {SUPPORTED_TYPES}")
    if cfg.hidden_act not in ACTIVATIONS:
        raise ModelError(f"text checkpoint {name!r}: activation {cfg.hidden_act!r}; supported: {list(ACTIVATIONS)}")
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        raise ModelError(f"text checkpoint {name!r}: only absolute position embeddings are supported")
    shape = BertShape(
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.intermediate_size,
        cfg.num_hidden_layers,
        cfg.vocab_size,
        cfg.max_position_embeddings,
        cfg.type_vocab_size,
        cfg.layer_norm_eps,
        cfg.hidden_act,
    )
    return shape, state, source


def _quiet_load(transformers, source: str, local: bool) -> dict[str, Tensor]:
    """The checkpoint's state dict through AutoModel (any file format, prefixes stripped), without its
    progress bar (the report says what was loaded)."""
    hf_logging = transformers.utils.logging
    was_disabled = hf_logging.is_progress_bar_enabled() is False
    hf_logging.disable_progress_bar()
    try:
        return transformers.AutoModel.from_pretrained(source, local_files_only=local).state_dict()
    finally:
        if not was_disabled:
            hf_logging.enable_progress_bar()


class BertAttention(nn.Module):
    """Multi-head attention of x (B, L, D) over a context (B, M, D) (x itself for self-attention)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ModelError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.out_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        """x (B, L, D), context (B, M, D) or None, context_mask (B, M) bool (True = real) -> (B, L, D)."""
        context = x if context is None else context
        B, L, D = x.shape
        M, H = context.shape[1], self.heads
        q = self.q(x).view(B, L, H, D // H).transpose(1, 2)  # (B, H, L, Dh)
        k = self.k(context).view(B, M, H, D // H).transpose(1, 2)  # (B, H, M, Dh)
        v = self.v(context).view(B, M, H, D // H).transpose(1, 2)  # (B, H, M, Dh)
        mask = None if context_mask is None else context_mask.bool()[:, None, None, :]  # (B, 1, 1, M)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, L, Dh)
        return self.out_drop(self.out(y.transpose(1, 2).reshape(B, L, D)))  # (B, L, D)


class BertLayer(nn.Module):
    """One post-norm BERT layer; with `cross`, ALBEF's cross-attention to a context between the two."""

    def __init__(self, shape: BertShape, dropout: float = 0.1, cross: bool = False):
        super().__init__()
        D = shape.width
        self.attn, self.attn_norm = BertAttention(D, shape.heads, dropout), nn.LayerNorm(D, eps=shape.eps)
        self.cross = cross
        if cross:
            self.cross_attn, self.cross_norm = BertAttention(D, shape.heads, dropout), nn.LayerNorm(D, eps=shape.eps)
        self.fc1, self.fc2 = nn.Linear(D, shape.ffn), nn.Linear(shape.ffn, D)
        self.ffn_norm, self.drop = nn.LayerNorm(D, eps=shape.eps), nn.Dropout(dropout)
        self.approximate = ACTIVATIONS[shape.act]

    def forward(
        self, x: Tensor, mask: Tensor | None = None, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:
        """x (B, L, D) with mask (B, L); context (B, M, D) with context_mask (B, M) -> (B, L, D)."""
        x = self.attn_norm(x + self.attn(x, x, mask))  # (B, L, D)
        if self.cross:
            x = self.cross_norm(x + self.cross_attn(x, context, context_mask))  # L queries read M image keys
        h = F.gelu(self.fc1(x), approximate=self.approximate)  # (B, L, F)
        return self.ffn_norm(x + self.drop(self.fc2(h)))  # (B, L, D)


class BertStack(nn.Module):
    """`depth` BERT layers (all with cross-attention when `cross`): (B, L, D) -> (B, L, D)."""

    def __init__(self, shape: BertShape, depth: int, dropout: float = 0.1, cross: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(BertLayer(shape, dropout, cross) for _ in range(depth))

    def forward(
        self, x: Tensor, mask: Tensor | None = None, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:
        for layer in self.layers:
            x = layer(x, mask, context, context_mask)
        return x


class BertEmbeddings(nn.Module):
    """LN(word + position + token type 0), dropout: ids (B, L) -> (B, L, D). Ids carry the tokenizer's own
    [CLS] ... [SEP] (the checkpoint's WordPiece tokenizer adds them)."""

    def __init__(self, shape: BertShape, dropout: float = 0.1):
        super().__init__()
        D = shape.width
        self.word = nn.Embedding(shape.vocab_size, D, padding_idx=0)
        self.position = nn.Embedding(shape.max_positions, D)
        self.token_type = nn.Embedding(shape.type_vocab_size, D)
        self.norm, self.drop = nn.LayerNorm(D, eps=shape.eps), nn.Dropout(dropout)

    def forward(self, input_ids: Tensor) -> Tensor:
        L = input_ids.shape[1]
        if L > self.position.num_embeddings:
            raise ModelError(f"{L} tokens exceed the checkpoint's {self.position.num_embeddings} positions")
        x = self.word(input_ids) + self.position.weight[:L] + self.token_type.weight[0]  # (B, L, D)
        return self.drop(self.norm(x))


class BertText(nn.Module):
    """Embeddings + `depth` self-attention layers: ids (B, L), mask (B, L) -> tokens (B, L, D)."""

    def __init__(self, shape: BertShape, depth: int, dropout: float = 0.1):
        super().__init__()
        self.embeddings = BertEmbeddings(shape, dropout)
        self.encoder = BertStack(shape, depth, dropout)

    def forward(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        return self.encoder(self.embeddings(input_ids), mask)  # (B, L, D)


# checkpoint names (HF BertModel) -> ours, inside one layer / the embeddings
LAYER_NAMES = {
    "attention.self.query": "attn.q",
    "attention.self.key": "attn.k",
    "attention.self.value": "attn.v",
    "attention.output.dense": "attn.out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "output.LayerNorm": "ffn_norm",
}
EMBEDDING_NAMES = {
    "word_embeddings": "word",
    "position_embeddings": "position",
    "token_type_embeddings": "token_type",
    "LayerNorm": "norm",
}


def layer_map(src: int, dst: str) -> dict[str, str]:
    """Checkpoint layer `src` -> our BertLayer at module path `dst` (weights and biases)."""
    out = {}
    for theirs, ours in LAYER_NAMES.items():
        for p in ("weight", "bias"):
            out[f"encoder.layer.{src}.{theirs}.{p}"] = f"{dst}.{ours}.{p}"
    return out


def embedding_map(dst: str) -> dict[str, str]:
    """Checkpoint embeddings -> our BertEmbeddings at module path `dst`."""
    out = {f"embeddings.{t}.weight": f"{dst}.{o}.weight" for t, o in EMBEDDING_NAMES.items()}
    out["embeddings.LayerNorm.bias"] = f"{dst}.norm.bias"
    return out


def pooler_map(dst: str) -> dict[str, str]:
    """BERT's pooler (Linear + tanh on [CLS], the input of its next-sentence head) -> a Linear at `dst`."""
    return {"pooler.dense.weight": f"{dst}.weight", "pooler.dense.bias": f"{dst}.bias"}


@dataclass
class InitReport:
    """Where a model's tensors came from. `used`: checkpoint tensor -> model tensor; `pretrained_other`:
    model tensors filled by another pretrained source (the image tower), with that source; `new`: freshly
    initialised model tensors; `copied`: model tensor -> the model tensor it starts as a copy of (momentum)."""

    source: str
    used: dict[str, str] = field(default_factory=dict)
    pretrained_other: dict[str, str] = field(default_factory=dict)
    new: list[str] = field(default_factory=list)
    copied: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """Every tensor, one line each."""
        out = [f"pretrained {k} -> {v}" for k, v in self.used.items()]
        out += [f"pretrained ({src}) {k}" for k, src in self.pretrained_other.items()]
        out += [f"new {k}" for k in self.new]
        return out + [f"copy {k} <- {v}" for k, v in self.copied.items()]

    def summary(self) -> list[str]:
        """The same, grouped by layer: a dozen lines for the run header."""
        used = f"{len(self.used)} checkpoint tensors used (all of them)" if self.used else "no checkpoint tensors"
        head = (
            f"init from {self.source}: {used}, {len(self.pretrained_other)} from the image tower, "
            f"{len(self.new)} new, {len(self.copied)} momentum copies"
        )
        groups: dict[tuple[str, str], int] = {}
        for k, v in self.used.items():
            key = (_group(k), _group(v))
            groups[key] = groups.get(key, 0) + 1
        out = [head] + [f"  {a}.* -> {b}.* ({n})" for (a, b), n in groups.items()]
        new: dict[str, int] = {}
        for k in self.new:
            new[_group(k, 1)] = new.get(_group(k, 1), 0) + 1
        return out + ["  new: " + ", ".join(f"{g} ({n})" for g, n in new.items())]


def _group(name: str, extra: int = 0) -> str:
    """The name cut after its first layer index (plus `extra` parts), else its first part (plus `extra`)."""
    parts = name.split(".")
    idx = next((i for i, p in enumerate(parts) if re.fullmatch(r"\d+", p)), 0)
    return ".".join(parts[: min(len(parts) - 1, idx + 1 + extra)]) or name


@torch.no_grad()
def load_mapped(model: nn.Module, state: dict[str, Tensor], mapping: dict[str, str], source: str) -> InitReport:
    """Copy `state[src]` into the model's tensor `mapping[src]` for every entry, strictly.

    Raises:
        ModelError: a checkpoint tensor that `mapping` does not use, a mapped name absent from the checkpoint
            or the model, or a shape mismatch; the message names the tensor.
    """
    unused = sorted(set(state) - set(mapping))
    if unused:
        raise ModelError(f"checkpoint {source}: tensor {unused[0]!r} is not used ({len(unused)} unused in all)")
    targets = model.state_dict(keep_vars=True)
    for src, dst in mapping.items():
        if src not in state:
            raise ModelError(f"checkpoint {source} has no tensor {src!r} (wanted for {dst})")
        if dst not in targets:
            raise ModelError(f"model has no tensor {dst!r} for checkpoint tensor {src!r}")
        if targets[dst].shape != state[src].shape:
            raise ModelError(
                f"checkpoint tensor {src!r} has shape {tuple(state[src].shape)}, "
                f"model tensor {dst!r} {tuple(targets[dst].shape)}"
            )
        targets[dst].copy_(state[src])
    return InitReport(source, used=dict(mapping))


def complete_report(report: InitReport, model: nn.Module, other: dict[str, str], copied: dict[str, str]) -> InitReport:
    """Fill `new` with every model tensor that is neither from the checkpoint, nor from another pretrained
    source (`other`: name prefix -> source), nor a copy (`copied`: name prefix -> prefix it copies)."""
    used = set(report.used.values())
    for name in model.state_dict():
        if name in used:
            continue
        src = next((s for p, s in other.items() if name.startswith(p)), None)
        copy_of = next((name.replace(p, c, 1) for p, c in copied.items() if name.startswith(p)), None)
        if src is not None:
            report.pretrained_other[name] = src
        elif copy_of is not None:
            report.copied[name] = copy_of
        else:
            report.new.append(name)
    return report


def log_report(name: str, report: InitReport) -> None:
    """The summary at INFO when weights were loaded (at DEBUG for an architecture-only build, which a
    checkpoint's weights follow), every tensor at DEBUG."""
    level = logging.INFO if report.used else logging.DEBUG
    for line in report.summary():
        log.log(level, "%s %s", name, line)
    for line in report.lines():
        log.debug("%s %s", name, line)
