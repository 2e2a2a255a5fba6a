"""Checkpoints: a plain dict of state_dicts plus counters, RNG states, config and tokenizer, written
atomically (temp file in the same folder, fsync, os.replace) and read with `weights_only=True`.

Layout of a run's `checkpoints/`: `last.pt` (newest), `best.pt` (best validation metric),
`epoch_XXXX.pt` (the last `keep_last` epochs). A crash during a save leaves the previous file intact;
a truncated or corrupt newest file is reported and the newest readable one is used instead.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossmatch.errors import CheckpointError
from crossmatch.files import atomic_write

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in types that `weights_only` loading accepts."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": np_state["state"]["pos"],
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    # random.setstate needs tuples; some pickle round trips hand lists back.
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def atomic_save(obj: dict[str, Any], path: str | Path) -> None:
    """torch.save to `path` so that readers only ever see a complete file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint safely. Raises CheckpointError (one line naming the file) for missing,
    truncated, corrupt or unsafe files; an unsafe pickle is refused before anything in it runs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it needs arbitrary unpickling, which could run code "
            "(only weights_only checkpoints are accepted)"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({str(err).splitlines()[0][:120]})") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a crossmatch checkpoint (no 'model' entry)")
    return ckpt


def export_safetensors(state: dict[str, Any], path: str | Path) -> None:
    """The model weights as safetensors, with the config and tokenizer (JSON) in its metadata, so that
    `crossmatch.load(path)` rebuilds the model without unpickling anything."""
    from safetensors.torch import save

    path = Path(path)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state["model"].items()}  # no shared storage
    metadata = {
        "format": "crossmatch",
        "config": json.dumps(state.get("config", {})),
        "tokenizer": state.get("tokenizer", ""),
    }
    atomic_write(path, lambda f: f.write(save(tensors, metadata=metadata)))


def read_safetensors(path: str | Path) -> dict[str, Any]:
    """A safetensors export read back into the checkpoint layout: {model, config, tokenizer}."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            model = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(err).splitlines()[0][:120]})") from err
    if meta.get("format") != "crossmatch":
        return {"model": model}  # plain weights (e.g. for --init-from)
    return {"model": model, "config": json.loads(meta["config"]), "tokenizer": meta["tokenizer"]}


def read_weights(path: str | Path) -> dict[str, Any]:
    """A .pt checkpoint or a .safetensors export, in the checkpoint layout."""
    return read_safetensors(path) if str(path).endswith(".safetensors") else load_checkpoint(path)


def partial_load(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Load the tensors whose name and shape match; report the rest (never drop them silently).

    Returns:
        {"loaded": [...], "missing": model keys absent from `weights`, "mismatched": "key: ckpt -> model"
        shapes, "unexpected": `weights` keys the model does not have}.
    """
    own = model.state_dict()
    report: dict[str, list[str]] = {"loaded": [], "missing": [], "mismatched": [], "unexpected": []}
    take = {}
    for k, v in weights.items():
        if k not in own:
            report["unexpected"].append(k)
        elif own[k].shape != v.shape:
            report["mismatched"].append(f"{k}: {tuple(v.shape)} -> {tuple(own[k].shape)}")
        else:
            take[k] = v
            report["loaded"].append(k)
    report["missing"] = [k for k in own if k not in weights]
    model.load_state_dict(take, strict=False)
    return report


class Checkpointer:
    """Saves and finds the checkpoints of one run directory."""

    def __init__(self, run_dir: str | Path, keep_last: int = 3, enabled: bool = True):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.enabled = enabled  # False on non-main ranks

    def save(self, state: dict[str, Any], epoch_tag: int | None = None, is_best: bool = False) -> None:
        """Write last.pt (always), epoch_XXXX.pt when `epoch_tag` is given, best.pt when `is_best`.
        At epoch ends the weights are also exported as last.safetensors (and best.safetensors)."""
        if not self.enabled:
            return
        atomic_save(state, self.dir / "last.pt")
        if epoch_tag is not None:
            atomic_save(state, self.dir / f"epoch_{epoch_tag:04d}.pt")
            export_safetensors(state, self.dir / "last.safetensors")
            self._prune()
        if is_best:
            atomic_save(state, self.dir / "best.pt")
            export_safetensors(state, self.dir / "best.safetensors")

    def _prune(self) -> None:
        epochs = sorted(self.dir.glob("epoch_*.pt"))
        for old in epochs[: max(0, len(epochs) - self.keep_last)]:
            old.unlink(missing_ok=True)

    def candidates(self) -> list[Path]:
        """Files to resume from, newest first: last.pt, then epoch files from the newest."""
        epochs = sorted(self.dir.glob("epoch_*.pt"), key=lambda p: int(re.findall(r"\d+", p.name)[0]), reverse=True)
        return [p for p in [self.dir / "last.pt", *epochs] if p.is_file()]

    def load_latest(self) -> tuple[dict[str, Any], Path] | None:
        """The newest readable checkpoint, skipping (and reporting) corrupt ones; None if there is none."""
        errors = []
        for path in self.candidates():
            try:
                return load_checkpoint(path), path
            except CheckpointError as err:
                if "refusing" in str(err):
                    raise
                log.warning("%s; trying an older checkpoint", err)
                errors.append(str(err))
        if errors:
            raise CheckpointError(f"no readable checkpoint in {self.dir}: {errors[0]}")
        return None
