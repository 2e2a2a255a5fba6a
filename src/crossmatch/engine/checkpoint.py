"""Checkpoints: a plain dict of state_dicts plus counters, RNG states, config and tokenizer, written
atomically (temp file in the same folder, fsync, os.replace) and read with `weights_only=True`.

Layout of a run's `checkpoints/`: `last.pt` (newest, the full state: what `--resume` reads) and `best.pt`
(best validation metric: weights, config, tokenizer and counters, no optimiser state: what evaluate, search
and export read); opt-in, `epoch_XXXX.pt` (the last `keep_last` epochs, full state) and `last.safetensors` /
`best.safetensors` (weights, config and tokenizer; `safetensors=True`). A crash during a save leaves the
previous file intact; the best files are written before `last.pt`, which records the best epoch, and a
resumed run repairs them if an older run left them stale.

Integrity: every `.pt` holds a `sha256` entry (`payload_digest` of the rest) and every `.safetensors` one in
its metadata; loading checks the zip records' CRC-32s, then the digest. An empty, truncated or corrupt file
is a `CheckpointError` (a resume falls back to the newest readable one); a file that needs arbitrary
unpickling is an `UnsafeCheckpointError`, never skipped. Files written before the digest load unchecked.

Format: every `.pt` holds `format_version` (FORMAT_VERSION, the layout this code writes). A file without
one is version 1 (written before the number was stored; the same layout) and loads; a file of a newer
version is a `NewerCheckpointError` naming both versions, never skipped by a resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import random
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossmatch.errors import CheckpointError, UnsafeCheckpointError
from crossmatch.files import atomic_write
from crossmatch.models.face import CONFIG_NAME, OPEN_CLIP_TOKENIZER_NAME, TOKENIZER_NAME, WEIGHTS_NAME

log = logging.getLogger(__name__)
FORMAT_VERSION = 2  # the checkpoint layout this code writes, and the newest it reads
FORMAT_KEY = "format_version"  # checkpoint entry of the layout version; absent: version 1
EPOCH_FILE = re.compile(r"epoch_(\d{1,12})\.pt")  # the per-epoch checkpoints a Checkpointer writes and prunes
DIGEST_KEY = "sha256"  # checkpoint entry / safetensors metadata key of the payload digest


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


def payload_digest(obj: Any) -> str:
    """sha256 of everything a checkpoint holds: every tensor's dtype, shape and bytes and every other
    value's type and repr, walked in order (dict keys included). Equal digests mean equal contents."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, x: Any) -> None:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().resolve_conj().resolve_neg().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, no copy for a CPU tensor
    elif isinstance(x, dict):
        h.update(f"D{len(x)};".encode())
        for k, v in x.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(x, (list, tuple)):  # alike: a pickle round trip may turn one into the other
        h.update(f"L{len(x)};".encode())
        for v in x:
            _feed(h, v)
    else:  # int, float (repr is exact), str, bool, None
        h.update(f"{type(x).__name__}:{x!r};".encode())


class NewerCheckpointError(CheckpointError):
    """A checkpoint written in a newer format than this code reads: not damaged, so never skipped."""


def atomic_save(obj: dict[str, Any], path: str | Path) -> None:
    """torch.save to `path` so that readers only ever see a complete file; the dict gets a `format_version`
    entry (FORMAT_VERSION) and a `sha256` entry (`payload_digest` of the rest) that `load_checkpoint` verifies."""
    versioned = {**obj, FORMAT_KEY: FORMAT_VERSION}
    stamped = {**versioned, DIGEST_KEY: payload_digest(versioned)}
    atomic_write(path, lambda f: torch.save(stamped, f))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:120] if text else type(err).__name__


def _check_archive(path: Path) -> None:
    """A torch checkpoint is a zip archive whose records carry CRC-32s: read every record once and
    check them, so that a damaged file is told apart from one that was written unsafe on purpose."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (truncated by an interrupted write?)")
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.CRC == 0 and info.file_size:
                    continue  # written with torch.serialization.set_crc32_options(False): nothing to check
                with zf.open(info) as rec:  # zipfile compares the CRC-32 when a record is read to its end
                    while rec.read(1 << 20):
                        pass
    except Exception as err:  # a damaged archive fails in many ways (BadZipFile, EOFError, zlib, ...)
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt (not a complete torch zip archive: {_first_line(err)})"
        ) from err


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint safely. Raises CheckpointError (one line naming the file) for missing, empty,
    truncated or corrupt files (archive CRCs and the stored sha256 are checked), and its subclass
    UnsafeCheckpointError for a file that needs arbitrary unpickling, refused before anything in it runs,
    and NewerCheckpointError for a format newer than FORMAT_VERSION. Checkpoints written before the sha256
    was stored load without that check; those written before `format_version` are version 1. The returned
    dict holds neither entry."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    _check_archive(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # the records are intact (CRCs checked): it was written this way
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it needs arbitrary unpickling, which could run code "
            "(only weights_only checkpoints are accepted)"
        ) from err
    except Exception as err:  # torch's reader fails in many ways on a damaged archive
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({_first_line(err)})") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a crossmatch checkpoint (no 'model' entry)")
    expected = ckpt.pop(DIGEST_KEY, None)
    if expected is not None and expected != payload_digest(ckpt):
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents do not match their stored sha256")
    check_format(ckpt.pop(FORMAT_KEY, 1), path)  # versions 1 and 2 share one layout: nothing to convert
    return check_entries(ckpt, path)


def check_format(version: Any, path: str | Path) -> None:
    """Refuse a `format_version` this code does not read, in one line naming the file and both versions.

    Raises:
        NewerCheckpointError: a version above FORMAT_VERSION.
        CheckpointError: a version that is not a positive integer.
    """
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"checkpoint {path}: format_version {version!r} is not a format version (1, 2, ...)")
    if version > FORMAT_VERSION:
        raise NewerCheckpointError(
            f"checkpoint {path} is format_version {version}, newer than this crossmatch reads "
            f"(format_version {FORMAT_VERSION}): upgrade crossmatch to load it"
        )


def check_entries(ckpt: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """`ckpt` itself if its entries have the types crossmatch writes and its weights are finite.

    Raises:
        CheckpointError: `model` is not a dict of named tensors, `config` not a dict, `tokenizer` not a
            string, or a floating-point weight holds NaN or infinity (naming it).
    """
    model = ckpt.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{path}: its 'model' entry is a {type(model).__name__}, not a dict of named tensors")
    bad = next(((k, v) for k, v in model.items() if not (isinstance(k, str) and torch.is_tensor(v))), None)
    if bad is not None:
        raise CheckpointError(f"{path}: its 'model' entry holds {bad[0]!r}, a {type(bad[1]).__name__}, not a tensor")
    for key, kind in (("config", dict), ("tokenizer", str)):
        if key in ckpt and not isinstance(ckpt[key], kind):
            raise CheckpointError(f"{path}: its '{key}' entry is a {type(ckpt[key]).__name__}, not a {kind.__name__}")
    for name, w in model.items():
        if w.is_floating_point() and not bool(torch.isfinite(w).all()):
            raise CheckpointError(f"{path}: weight {name} holds NaN or infinite values (saved from a diverged run?)")
    return ckpt


def _tensors_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 of a safetensors file's tensors (by name) and its other metadata entries."""
    meta = {k: v for k, v in sorted(metadata.items()) if k != DIGEST_KEY}
    return payload_digest({"metadata": meta, "tensors": dict(sorted(tensors.items()))})


def export_safetensors(state: dict[str, Any], path: str | Path) -> None:
    """The model weights as safetensors, with the config and tokenizer (JSON), the epoch and a sha256 of
    the rest in its metadata, so that `crossmatch.load(path)` rebuilds the model without unpickling."""
    from safetensors.torch import save

    path = Path(path)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state["model"].items()}  # no shared storage
    metadata = {
        "format": "crossmatch",
        "config": json.dumps(state.get("config", {})),
        "tokenizer": state.get("tokenizer", ""),
    }
    if "trainer" in state:
        metadata["epoch"] = str(state["trainer"]["epoch"])  # lets a resumed run see whether best.* is current
    metadata[DIGEST_KEY] = _tensors_digest(tensors, metadata)
    atomic_write(path, lambda f: f.write(save(tensors, metadata=metadata)))


def _read_safetensors_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            model = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # SafetensorError, a bad header, a size that does not fit the file, ...
        raise CheckpointError(f"{path} is not a readable safetensors file ({_first_line(err)})") from err
    if DIGEST_KEY in meta and meta[DIGEST_KEY] != _tensors_digest(model, meta):
        raise CheckpointError(f"{path} is corrupt: its tensors do not match their stored sha256")
    return model, meta


def read_safetensors(path: str | Path) -> dict[str, Any]:
    """A safetensors export read back into the checkpoint layout: {model, config, tokenizer}."""
    path = Path(path)
    model, meta = _read_safetensors_file(path)
    if meta.get("format") != "crossmatch":
        return check_entries({"model": model}, path)  # plain weights (e.g. for --init-from)
    try:
        config = json.loads(meta["config"])
    except (KeyError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{path} says format=crossmatch but has no readable config JSON in its metadata") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: the config in its metadata is not a JSON object")
    if not isinstance(meta.get("tokenizer"), str) or not meta["tokenizer"]:
        raise CheckpointError(f"{path} says format=crossmatch but has no tokenizer in its metadata")
    return check_entries({"model": model, "config": config, "tokenizer": meta["tokenizer"]}, path)


def is_pretrained_dir(path: str | Path) -> bool:
    """Whether `path` is a folder written by `model.save_pretrained` (model.safetensors + config.json)."""
    path = Path(path)
    return (path / WEIGHTS_NAME).is_file() and (path / CONFIG_NAME).is_file()


def read_pretrained_dir(path: str | Path) -> dict[str, Any]:
    """A save_pretrained folder read back into the checkpoint layout: {model, config, tokenizer}."""
    path = Path(path)
    model, _ = _read_safetensors_file(path / WEIGHTS_NAME)
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{path / CONFIG_NAME} is not readable JSON ({_first_line(err)})") from err
    if not isinstance(config, dict) or "model" not in config:
        raise CheckpointError(f"{path / CONFIG_NAME} is not a crossmatch run config (no 'model' section)")
    for name in (TOKENIZER_NAME, OPEN_CLIP_TOKENIZER_NAME):
        if (path / name).is_file():
            return {"model": model, "config": config, "tokenizer": (path / name).read_text()}
    raise CheckpointError(
        f"{path} has no {TOKENIZER_NAME} (nor {OPEN_CLIP_TOKENIZER_NAME}): save_pretrained writes one"
    )


def read_weights(path: str | Path) -> dict[str, Any]:
    """A .pt checkpoint, a .safetensors export or a save_pretrained folder, in the checkpoint layout."""
    if Path(path).is_dir():
        return read_pretrained_dir(path)
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


# What best.pt keeps of a training state: the model and what rebuilds and describes it. The optimiser,
# scheduler, scaler, RNG and loader states (two thirds of an Adam run's bytes) only serve a resume: last.pt.
WEIGHTS_KEYS = ("model", "loss", "trainer", "config", "tokenizer", "data_root_from_run")


def weights_state(state: dict[str, Any]) -> dict[str, Any]:
    """The part of a training state that best.pt stores (WEIGHTS_KEYS)."""
    return {k: state[k] for k in WEIGHTS_KEYS if k in state}


class Checkpointer:
    """Saves and finds the checkpoints of one run directory."""

    def __init__(self, run_dir: str | Path, keep_last: int = 0, enabled: bool = True, safetensors: bool = False):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last  # full-state epoch_XXXX.pt files kept besides last.pt (0: none)
        self.enabled = enabled  # False on non-main ranks
        self.safetensors = safetensors  # also write best.safetensors and last.safetensors
        self.on_first_save: Callable[[], None] | None = None  # called once, after the first last.pt is written

    def save(self, state: dict[str, Any], epoch_tag: int | None = None, is_best: bool = False) -> None:
        """Write best.pt (weights_state) and best.safetensors when `is_best`, then last.pt (always), then
        epoch_XXXX.pt (when keep_last > 0) and last.safetensors when `epoch_tag` is given (epoch ends); the
        .safetensors files only with `safetensors`.

        The best files go first: last.pt records the best epoch, so a run killed between the two
        resumes from the previous last.pt, redoes the epoch and writes the best files again, instead of
        claiming a best epoch whose file was never written (`repair_best` fixes older runs)."""
        if not self.enabled:
            return
        if is_best:
            atomic_save(weights_state(state), self.dir / "best.pt")
            if self.safetensors:
                export_safetensors(state, self.dir / "best.safetensors")
        atomic_save(state, self.dir / "last.pt")
        if self.on_first_save is not None:
            hook, self.on_first_save = self.on_first_save, None
            hook()
        if epoch_tag is not None:
            if self.keep_last > 0:
                atomic_save(state, self.dir / f"epoch_{epoch_tag:04d}.pt")
            if self.safetensors:
                export_safetensors(state, self.dir / "last.safetensors")
            self._prune()

    def epoch_files(self) -> list[Path]:
        """The `epoch_<number>.pt` files, oldest first; other names (a user's `epoch_best.pt`) are not ours."""
        tagged = [(int(m[1]), p) for p in self.dir.glob("epoch_*.pt") if (m := EPOCH_FILE.fullmatch(p.name))]
        return [p for _, p in sorted(tagged)]

    def _prune(self) -> None:
        epochs = self.epoch_files()
        for old in epochs[: max(0, len(epochs) - self.keep_last)]:
            old.unlink(missing_ok=True)

    def candidates(self) -> list[Path]:
        """Files to resume from, newest first: last.pt, then epoch files from the newest."""
        return [p for p in [self.dir / "last.pt", *reversed(self.epoch_files())] if p.is_file()]

    def load_latest(self) -> tuple[dict[str, Any], Path] | None:
        """The newest readable checkpoint, skipping (and reporting) empty, truncated or corrupt ones;
        None if there is none. An unsafe file stops the search (UnsafeCheckpointError): it was not damaged
        by a crash, someone put it there; so does a newer format (NewerCheckpointError): a newer crossmatch
        wrote it, and resuming from an older file would overwrite its progress."""
        errors = []
        for path in self.candidates():
            try:
                return load_checkpoint(path), path
            except (UnsafeCheckpointError, NewerCheckpointError):
                raise
            except CheckpointError as err:
                log.warning("%s; trying an older checkpoint", err)
                errors.append(str(err))
        if errors:
            raise CheckpointError(f"no readable checkpoint in {self.dir}: {errors[0]}")
        return None

    def repair_best(self, state: dict[str, Any]) -> list[Path]:
        """Make best.pt (and best.safetensors, when written) hold the epoch that `state` (the checkpoint a run
        resumes from) records as best: a missing, unreadable or stale file is rewritten from the checkpoint of
        that epoch (`state` itself or epoch_XXXX.pt). Returns the files rewritten."""
        best = state.get("trainer", {}).get("best_epoch", -1)
        if not self.enabled or best < 1:
            return []
        pt, st = self.dir / "best.pt", self.dir / "best.safetensors"
        pt_ok = _epoch_of(pt, load_checkpoint) == best
        st_ok = not self.safetensors or _epoch_of(st, _safetensors_epoch) == best
        if pt_ok and st_ok:
            return []
        source = self._state_of_epoch(best, state)
        if source is None:
            names = " and ".join(p.name for p, ok in ((pt, pt_ok), (st, st_ok)) if not ok)
            log.warning("%s: not the best epoch %d, and no checkpoint of that epoch is left to rewrite it", names, best)
            return []
        written = []
        if not pt_ok:
            atomic_save(weights_state(source), pt)
            written.append(pt)
        if not st_ok:
            export_safetensors(source, st)
            written.append(st)
        log.warning("rewrote %s from the checkpoint of epoch %d", " and ".join(p.name for p in written), best)
        return written

    def _state_of_epoch(self, epoch: int, state: dict[str, Any]) -> dict[str, Any] | None:
        """The state saved at the end of `epoch`: `state` itself, else a readable epoch_XXXX.pt."""
        if _is_end_of(state, epoch):
            return state
        try:
            other = load_checkpoint(self.dir / f"epoch_{epoch:04d}.pt")
        except CheckpointError:
            return None
        return other if _is_end_of(other, epoch) else None


def _is_end_of(state: dict[str, Any], epoch: int) -> bool:
    t = state.get("trainer", {})
    return t.get("epoch") == epoch and t.get("step_in_epoch") == 0


def _safetensors_epoch(path: Path) -> dict[str, Any]:
    _, meta = _read_safetensors_file(path)  # verifies the sha256
    return {"trainer": {"epoch": int(meta["epoch"])}} if "epoch" in meta else {}


def _epoch_of(path: Path, read) -> int | None:
    """The finished-epoch count recorded in a best file; None when it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        return read(path).get("trainer", {}).get("epoch")
    except (CheckpointError, ValueError):
        return None
