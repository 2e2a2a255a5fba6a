"""Caches of a frozen tower's per-item outputs, so that epochs after the first run only the trainable parts.

A frozen tower (or the frozen first blocks of a partially unfrozen one) in eval mode gives each item an
output that depends on that item's input alone: no dropout, BatchNorm running statistics. Each item is keyed by
the SHA-1 of its exact input (`input_key`: the preprocessed pixels, or the real token ids), or, for training
images filled in before the first epoch, by the SHA-1 of the image file and its preprocessing
(`crossmatch.data.datasets.file_key`), so that later epochs need not decode the file. Either way a change of
preprocessing (mean/std, size, resize mode) or of the image file is a different key, never a stale hit.

- `MemoryOutputCache`: float32 tensors in a dict (exact), bounded by `max_items`.
- `DiskOutputCache`: float16 rows appended to one file, memory-mapped for reading, with an `index.json`
  (per item: offset, shape, SHA-1 of its bytes) in a folder named after the tower's fingerprint (its class,
  name, split point and the SHA-1 of its frozen weights and buffers), so another tower or another unfreezing
  never reads these rows. Opening verifies every row's checksum: a truncated or corrupt file, or an unreadable
  index, is reported (warning) and rebuilt, never read. What both return through a disk cache is float16-rounded
  on the first (computing) epoch too, so a cached epoch repeats the first one exactly.

One writer per folder at a time (a run dir's cache belongs to its run; the run lock guards it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from crossmatch.errors import ModelError
from crossmatch.files import write_text

log = logging.getLogger(__name__)
FORMAT = 1  # version of the on-disk layout
Compute = Callable[[list[int]], Sequence[Tensor]]  # indices of the items to compute -> one output per index


def input_key(t: Tensor) -> bytes:
    """SHA-1 of a tensor's exact bytes (its dtype and shape included)."""
    t = t.detach().contiguous().cpu()
    return hashlib.sha1(f"{t.dtype}{tuple(t.shape)}".encode() + t.numpy().tobytes()).digest()


def weights_digest(modules: Sequence[nn.Module]) -> str:
    """SHA-1 of the parameters and buffers (BatchNorm statistics) of `modules`, each tensor once, in order."""
    h, seen = hashlib.sha1(), set()
    for m in modules:
        for name, t in [*m.named_parameters(), *m.named_buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                h.update(name.encode() + t.detach().contiguous().cpu().float().numpy().tobytes())
    return h.hexdigest()


class MemoryOutputCache:
    """Per-item outputs kept in memory (exact); at most `max_items`, then items are computed as uncached."""

    def __init__(self, max_items: int = 50_000):
        self.store: dict[bytes, Tensor] = {}
        self.max_items, self.hits, self.misses = max_items, 0, 0

    def __contains__(self, key: bytes) -> bool:
        return key in self.store

    def rows(self, keys: list[bytes], compute: Compute) -> list[Tensor]:
        """keys: one per item; compute(indices) -> the outputs of those items. Returns every item's output."""
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        fresh = dict(zip(missing, [o.detach() for o in compute(missing)], strict=True)) if missing else {}
        for i, out in fresh.items():
            if len(self.store) < self.max_items:
                self.store[keys[i]] = out
        self.hits, self.misses = self.hits + len(keys) - len(missing), self.misses + len(missing)
        return [fresh[i] if i in fresh else self.store[k] for i, k in enumerate(keys)]

    def __call__(self, keys: list[bytes], compute: Compute) -> Tensor:
        """As rows(), stacked: (B, ...)."""
        return torch.stack(self.rows(keys, compute))


class DiskOutputCache:
    """Per-item float16 outputs in `root/<fingerprint digest>/` (rows.f16 + index.json); see the module doc.

    Args:
        root: the cache folder (a run's `frozen_cache/`, or a shared one).
        fingerprint: what the outputs depend on besides the item's input (JSON-able).
    """

    def __init__(self, root: str | Path, fingerprint: dict):
        self.fingerprint = {"format": FORMAT, **fingerprint}
        digest = hashlib.sha1(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = Path(root) / digest
        self.rows_path, self.index_path = self.folder / "rows.f16", self.folder / "index.json"
        self.items: dict[str, tuple[int, list[int], str]] = {}  # key hex -> (offset in elements, shape, sha1)
        self.elements, self.hits, self.misses = 0, 0, 0
        self._map: np.memmap | None = None
        self._open()

    # --- opening and checking -----------------------------------------------------------------------------

    def _open(self) -> None:
        if not self.index_path.exists():
            self._reset(None)
            return
        try:
            meta = json.loads(self.index_path.read_text(encoding="utf-8"))
            if meta["fingerprint"] != self.fingerprint:
                raise ValueError("written for another tower")
            items = {k: (int(o), [int(d) for d in s], str(h)) for k, (o, s, h) in meta["items"].items()}
            elements = int(meta["elements"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            self._reset(f"unreadable index ({err})")
            return
        size = self.rows_path.stat().st_size if self.rows_path.exists() else -1
        if size < 2 * elements:
            self._reset(f"rows.f16 holds {max(size, 0)} bytes, the index needs {2 * elements} (truncated)")
            return
        self.items, self.elements = items, elements
        for key, (offset, shape, sha) in items.items():
            inside = offset + _numel(shape) <= elements
            if not inside or hashlib.sha1(self._slice(offset, shape).tobytes()).hexdigest() != sha:
                self._reset(f"row {key[:12]} does not match its checksum (corrupt)")
                return
        if size > 2 * elements:  # rows appended by a run stopped before it wrote the index: not indexed, dropped
            with open(self.rows_path, "r+b") as f:
                f.truncate(2 * elements)
        log.info("frozen-tower cache %s: %d items", self.folder, len(items))

    def _reset(self, why: str | None) -> None:
        if why:
            log.warning("frozen-tower cache %s: %s; rebuilding it", self.folder, why)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._map, self.items, self.elements = None, {}, 0
        self.rows_path.write_bytes(b"")
        self._write_index()

    def _write_index(self) -> None:
        meta = {"fingerprint": self.fingerprint, "elements": self.elements, "items": self.items}
        write_text(self.index_path, json.dumps(meta))

    def _slice(self, offset: int, shape: list[int]) -> np.ndarray:
        if self._map is None or len(self._map) < offset + _numel(shape):
            self._map = np.memmap(self.rows_path, dtype=np.float16, mode="r", shape=(self.elements,))
        return np.asarray(self._map[offset : offset + _numel(shape)]).reshape(shape)

    # --- use ----------------------------------------------------------------------------------------------

    def __contains__(self, key: bytes) -> bool:
        return key.hex() in self.items

    def rows(self, keys: list[bytes], compute: Compute) -> list[Tensor]:
        """keys: one per item; compute(indices) -> the outputs of those items. Returns every item's output,
        float16-rounded, as float32 CPU tensors."""
        hexes = [k.hex() for k in keys]
        missing = [i for i, k in enumerate(hexes) if k not in self.items]
        fresh = {}
        if missing:
            outs = [o.detach().to("cpu", torch.float16).contiguous() for o in compute(missing)]
            fresh = dict(zip(missing, outs, strict=True))
            self._append({hexes[i]: fresh[i] for i in missing})
        self.hits, self.misses = self.hits + len(keys) - len(missing), self.misses + len(missing)
        out = []
        for i, k in enumerate(hexes):
            if i in fresh:
                out.append(fresh[i].float())
            else:
                offset, shape, _ = self.items[k]
                out.append(torch.from_numpy(self._slice(offset, shape).copy()).float())
        return out

    def __call__(self, keys: list[bytes], compute: Compute) -> Tensor:
        """As rows(), stacked: (B, ...)."""
        return torch.stack(self.rows(keys, compute))

    def _append(self, new: dict[str, Tensor]) -> None:
        """Append the rows, make them durable, then publish them in the index (atomically replaced)."""
        blobs, offset = [], self.elements
        for key, t in new.items():
            data = t.numpy().tobytes()
            self.items[key] = (offset, list(t.shape), hashlib.sha1(data).hexdigest())
            blobs.append(data)
            offset += t.numel()
        try:
            with open(self.rows_path, "r+b") as f:
                f.seek(2 * self.elements)
                f.write(b"".join(blobs))
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            raise ModelError(f"cannot write the frozen-tower cache {self.rows_path}: {err.strerror or err}") from err
        self.elements = offset
        self._write_index()


def _numel(shape: list[int]) -> int:
    return int(np.prod(shape)) if shape else 1
