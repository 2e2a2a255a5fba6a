"""Row-sharded builds under torchrun: each rank embeds a contiguous share of the items into its own part
file, resumably, and rank 0 concatenates the parts into the file a single process would have written.

Shares are cut at multiples of the batch size, so every batch of a sharded build is a batch of the
single-process build: with deterministic kernels at the same thread count, the merged file is the same,
byte for byte (`crossmatch features`, `crossmatch index build`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from crossmatch.files import atomic_write, write_text

PARTS = ".parts"  # folder of the per-rank parts inside the output folder


def batch_aligned_range(n: int, batch_size: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s contiguous share of n items: whole batches of `batch_size`, counted from item 0, split
    as evenly as whole batches allow (the last ranks may get fewer or none)."""
    n_batches = -(-n // batch_size)
    per = -(-n_batches // world_size)  # batches per rank
    return range(min(n, rank * per * batch_size), min(n, (rank + 1) * per * batch_size))


def part_dir(out: Path, name: str, rank: int, world_size: int) -> Path:
    return out / PARTS / f"{name}-rank{rank:03d}-of-{world_size:03d}"


def write_npy_concat(parts: list[np.ndarray], path: Path, chunk_rows: int = 65536) -> Path:
    """Concatenate arrays of one dtype and trailing shape along dim 0 into the .npy file `path`, chunk by
    chunk (memory maps stay on disk), atomically. The header is numpy's own (format 1.0, as `np.save` and
    `open_memmap` write it), so the file equals one written whole."""
    dtype, tail = parts[0].dtype, parts[0].shape[1:]
    if any(p.dtype != dtype or p.shape[1:] != tail for p in parts):
        raise ValueError(f"parts differ in dtype or shape: {[(p.dtype, p.shape) for p in parts]}")
    header = {
        "descr": np.lib.format.dtype_to_descr(dtype),
        "fortran_order": False,
        "shape": (sum(len(p) for p in parts), *tail),
    }

    def write(f) -> None:
        np.lib.format.write_array_header_1_0(f, header)
        for part in parts:
            for s in range(0, len(part), chunk_rows):
                f.write(np.ascontiguousarray(part[s : s + chunk_rows]).tobytes())

    return atomic_write(path, write)


class PartWriter:
    """A resumable (rows, *tail) part of one rank: `{dir}/rows.npy` (+ named side arrays) and `{dir}/progress.json`
    ({"done": rows written, "total", "key"}). Rows reach the file before progress.json says they exist."""

    def __init__(self, folder: Path, key: str, total: int):
        self.dir, self.key, self.total = folder, key, total
        self.arrays: dict[str, np.memmap] = {}
        self.done = 0
        progress = folder / "progress.json"
        if progress.is_file():
            state = json.loads(progress.read_text())
            if state.get("key") == key and state.get("total") == total:
                self.done = int(state["done"])
                self.arrays = {n: np.load(folder / f"{n}.npy", mmap_mode="r+") for n in state.get("arrays", [])}
            if self.done and not self.arrays:
                self.done = 0
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def complete(self) -> bool:
        return self.done >= self.total

    def write(self, rows: dict[str, np.ndarray], dtypes: dict[str, Any]) -> None:
        """Append one batch: {name: (B, ...)} arrays; files are created at the first batch (shapes known)."""
        for name, x in rows.items():
            if name not in self.arrays:
                shape = (self.total, *x.shape[1:])
                self.arrays[name] = np.lib.format.open_memmap(self.dir / f"{name}.npy", "w+", dtypes[name], shape)
            self.arrays[name][self.done : self.done + len(x)] = x
        for a in self.arrays.values():
            a.flush()
        self.done += len(next(iter(rows.values())))
        state = {"key": self.key, "total": self.total, "done": self.done, "arrays": sorted(self.arrays)}
        write_text(self.dir / "progress.json", json.dumps(state))
