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

Both are an `OutputCache`, and `tower_cache` opens the one a frozen tower gets: every frozen-output cache of
the package (vse_pretrained's image and text towers, the fusion families' CNN feature maps) comes from it.
`warm_up` fills a model's image cache from a training split's files before the first epoch and swaps the
split's pixels for the files' keys (`data.datasets.KeyedImageView`).

One writer per folder at a time (a run dir's cache belongs to its run; the run lock guards it).

Legend: B batch.
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

from crossmatch.data.datasets import ImageView, KeyedImageView, PairView
from crossmatch.data.loaders import build_eval_loader
from crossmatch.errors import DataError, ModelError
from crossmatch.files import write_text
from crossmatch.models.protocols import KeyedImageCache

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


class OutputCache:
    """Per-item outputs of a frozen module under byte keys: `rows(keys, compute)` returns every item's output,
    computing (with `compute(indices)`) and keeping only the missing ones; `hits` and `misses` count items."""

    hits: int = 0
    misses: int = 0

    def __contains__(self, key: bytes) -> bool:
        raise NotImplementedError

    def rows(self, keys: list[bytes], compute: Compute) -> list[Tensor]:
        raise NotImplementedError

    def __call__(self, keys: list[bytes], compute: Compute) -> Tensor:
        """As rows(), stacked: (B, ...)."""
        return torch.stack(self.rows(keys, compute))

    def missing(self, keys: list[bytes]) -> list[int]:
        """The positions of the keys whose outputs are not kept."""
        return [i for i, k in enumerate(keys) if k not in self]

    def _count(self, n_keys: int, n_missing: int) -> None:
        self.hits, self.misses = self.hits + n_keys - n_missing, self.misses + n_missing


class MemoryOutputCache(OutputCache):
    """Per-item outputs kept in memory (exact); at most `max_items`, then items are computed as uncached."""

    def __init__(self, max_items: int = 50_000):
        self.store: dict[bytes, Tensor] = {}
        self.max_items, self.hits, self.misses = max_items, 0, 0

    def __contains__(self, key: bytes) -> bool:
        return key in self.store

    def rows(self, keys: list[bytes], compute: Compute) -> list[Tensor]:
        """keys: one per item; compute(indices) -> the outputs of those items. Returns every item's output."""
        missing = self.missing(keys)
        fresh = dict(zip(missing, [o.detach() for o in compute(missing)], strict=True)) if missing else {}
        for i, out in fresh.items():
            if len(self.store) < self.max_items:
                self.store[keys[i]] = out
        self._count(len(keys), len(missing))
        return [fresh[i] if i in fresh else self.store[k] for i, k in enumerate(keys)]


class DiskOutputCache(OutputCache):
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
        missing = self.missing(keys)
        fresh = {}
        if missing:
            outs = [o.detach().to("cpu", torch.float16).contiguous() for o in compute(missing)]
            fresh = dict(zip(missing, outs, strict=True))
            self._append({hexes[i]: fresh[i] for i in missing})
        self._count(len(keys), len(missing))
        out = []
        for i, k in enumerate(hexes):
            if i in fresh:
                out.append(fresh[i].float())
            else:
                offset, shape, _ = self.items[k]
                out.append(torch.from_numpy(self._slice(offset, shape).copy()).float())
        return out

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


def tower_cache(tower: nn.Module, name: str, root: str | Path | None = None, pooling: str = "") -> OutputCache:
    """The cache of a frozen tower's per-item outputs (or of its frozen first blocks'): exact and in memory
    without `root`; else float16 on disk under `root`, in the folder of the tower's fingerprint (its class,
    `name`, its number of trainable last blocks, `pooling` and the SHA-1 of its frozen parts' weights), so a
    disk cache is opened once the weights are final.

    Args:
        tower: a frozen tower with `unfrozen` (trainable last blocks) and `frozen_parts()`
            (`models.pretrained._FreezableTower`).
        name: the tower's configured name (e.g. efficientnet_lite0, minilm).
        root: the disk cache's folder; None keeps the outputs in memory.
        pooling: how the tower pools what the cache keeps ("" when that is fixed by the tower).
    """
    if root is None:
        return MemoryOutputCache()
    parts = tower.frozen_parts() if tower.unfrozen else [tower]
    fingerprint = {"tower": f"{type(tower).__name__}:{name}", "unfrozen": tower.unfrozen}
    fingerprint |= {"weights": weights_digest(parts), "pooling": pooling}
    return DiskOutputCache(root, fingerprint)


# --- the warm-up: a training split's images, once, keyed by their files ------------------------------------------


class _FileKeys(torch.utils.data.Dataset):
    """Item i: (i, the view's file key of image i or None, the DataError message or None); for a loader."""

    def __init__(self, view: ImageView):
        self.view = view

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, i: int) -> tuple[int, bytes | None, str | None]:
        try:
            return i, self.view.file_key(i), None
        except DataError as err:
            return i, None, str(err)


class _Decoded(torch.utils.data.Dataset):
    """The view's items at `indices`, an unreadable image as {"skipped": (i, message)} (dropped by collate)."""

    def __init__(self, view: ImageView, indices: list[int]):
        self.view, self.indices = view, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict:
        try:
            return self.view[self.indices[j]]
        except DataError as err:
            return {"skipped": (self.indices[j], str(err))}


def warm_up(model: nn.Module, pairs: PairView, batch_size: int, num_workers: int = 0) -> bool:
    """Compute the frozen image tower's outputs of every image of `pairs` once, keyed by the SHA-1 of the image
    file and its preprocessing, then feed `pairs` keys instead of pixels (KeyedImageView): no later epoch, and
    no resumed run with the same cache folder, decodes these images again; an edited file or another
    preprocessing is another key. Only for a model that caches its frozen image outputs by key
    (`KeyedImageCache`: `vse_pretrained` with `model.cache_frozen` and unaugmented images) and pairs without
    boxes; returns whether it applied. A run calls it when its epochs cover the split (no smaller
    `train.max_steps_per_epoch`): a short smoke run keeps computing only the images it meets, keyed by their
    pixels.

    An image that cannot be read raises its DataError, or with `pairs.skip_bad` is remembered and skipped (and
    counted) every epoch as before."""
    view = pairs.images
    if not (isinstance(model, KeyedImageCache) and model.caches_image_outputs):
        return False
    if view.max_boxes or type(view) is KeyedImageView:
        return False
    keys: list[bytes | None] = [None] * len(view)
    failed: dict[int, str] = {}
    loader = torch.utils.data.DataLoader(_FileKeys(view), batch_size=64, num_workers=num_workers, collate_fn=list)
    for chunk in loader:
        for i, key, error in chunk:
            keys[i] = key
            if error is not None:
                failed[i] = error
    if failed and not pairs.skip_bad:
        raise DataError(next(iter(failed.values())))
    readable = [i for i in range(len(view)) if i not in failed]
    missing = [readable[j] for j in model.missing_image_outputs([keys[i] for i in readable])]
    if missing:
        log.info("frozen image tower: computing the outputs of %d of %d images, once", len(missing), len(view))
        device = next(model.parameters()).device
        for batch in build_eval_loader(_Decoded(view, missing), batch_size, num_workers):
            for i, error in batch.get("skipped", []):
                if not pairs.skip_bad:
                    raise DataError(error)
                failed[i] = error
            if "image" in batch:  # (B, 3, H, W)
                model.fill_image_cache([keys[i] for i in batch["image_idx"].tolist()], batch["image"].to(device))
    readable = [i for i in range(len(view)) if i not in failed]
    if model.missing_image_outputs([keys[i] for i in readable]):  # an in-memory cache that is full
        log.info("the frozen image cache holds only part of the train images: decoding them every epoch")
        return False
    pairs.images = KeyedImageView(view, keys, failed)
    return True
