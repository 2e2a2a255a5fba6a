"""A resumable, deterministic training stream over WebDataset shards (crossmatch.data.shards), read with
the `webdataset` package's tar reader: shards split over ranks and loader workers, a seeded shuffle
buffer, and exact resume from a saved position.

The stream of epoch e on rank r:
- the shards are permuted by (seed, e); rank r takes every world-th shard of that order from position r,
  and its loader worker w (of W; one in-process stream when data.num_workers is 0) every W-th of those;
- each worker reads its shards in order, expands every sample into one pair per caption, and passes the
  pairs through a shuffle buffer of `data.shuffle_buffer` pairs: once full, each new pair replaces a
  uniformly drawn one, which is emitted (numpy PCG64 seeded by (seed, e, r, w));
- worker w makes every W-th batch of the rank (batches j with j % W == w, the DataLoader's round robin), so
  the batch stream is a pure function of (seed, e, r, W, position); a worker whose shards run out before
  its share reads them again in a new seeded order, so every rank makes the same number of steps,
  floor(pairs / (world * batch)) per epoch;
- each pair's augmentation draws from its own seed, as with the indexed loader.

Exact resume: every batch carries its worker's position after it (pass, shard, sample and caption
offsets, the buffer as (shard, sample, caption) references, the PCG64 state, pairs emitted), the loader
keeps the position of the last batch consumed from each worker, and the Trainer stores those in the
checkpoint (one per rank). Resuming re-reads only the current shard and the ones the buffer refers to.
Without a stored position (another worker count, an older checkpoint) the worker replays its stream from
the epoch start without decoding images: exact too, only slower.

Legend: B batch, S side, L tokens, R ranks (world), W workers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from crossmatch.data.loaders import collate
from crossmatch.data.shards import ShardTrainSet, decode_image, iter_shard, sample_split
from crossmatch.data.transforms import apply_transform
from crossmatch.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


class _Pair:
    """A buffered pair: its reference (shard, sample position, caption, image_idx, text_idx) + the sample."""

    __slots__ = ("ref", "sample")

    def __init__(self, ref: tuple[int, int, int, int, int], sample):
        self.ref, self.sample = ref, sample


class WorkerStream:
    """The pair stream of one logical worker of one rank in one epoch (see the module docstring)."""

    def __init__(self, data: ShardTrainSet, seed: int, epoch: int, rank: int, world: int, worker: int, workers: int):
        self.data, self.key = data, (seed, epoch, rank, worker)
        order = _rng(seed, epoch).permutation(len(data.shards))
        self.shards = [int(s) for s in order[rank::world][worker::workers]]  # pass 0 order, shard indices
        if not self.shards:
            raise ConfigError(
                f"{len(data.shards)} shard(s) cannot feed {world} rank(s) x {workers} loader worker(s): "
                "write smaller shards (crossmatch data convert --shard-size) or use fewer workers"
            )
        self.rng = _rng(seed, epoch, rank, worker, 1)
        self.pos = {"pass": 0, "shard": 0, "sample": 0, "caption": 0}  # the next pair to read
        self.buffer: list[_Pair] = []
        self.emitted = 0  # pairs emitted this epoch (names each pair's augmentation seed)

    # ---- position -----------------------------------------------------------------------------------
    def order(self, p: int) -> list[int]:
        """Shard order of pass p: the rank's share, then reshuffled for every extra pass."""
        if p == 0:
            return self.shards
        return [self.shards[i] for i in _rng(*self.key, 2, p).permutation(len(self.shards))]

    def state(self) -> dict[str, Any]:
        return {
            **self.pos,
            "buffer": [list(b.ref) for b in self.buffer],
            "rng": self.rng.bit_generator.state,
            "emitted": self.emitted,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state()`: the buffered samples are re-read from their shards."""
        self.pos = {k: int(state[k]) for k in ("pass", "shard", "sample", "caption")}
        self.rng.bit_generator.state = state["rng"]
        self.emitted = int(state["emitted"])
        refs = [tuple(int(x) for x in r) for r in state["buffer"]]
        wanted: dict[int, set[int]] = {}
        for s, position, *_ in refs:
            wanted.setdefault(s, set()).add(position)
        found: dict[tuple[int, int], Any] = {}
        for s, positions in wanted.items():
            last = max(positions)
            for sample in iter_shard(self.data.shards[s].path, max_member_bytes=self.data.max_member_bytes):
                if sample.position in positions:
                    found[(s, sample.position)] = sample
                if sample.position >= last:
                    break
        self.buffer = [_Pair(r, found[(r[0], r[1])]) for r in refs]

    # ---- pairs --------------------------------------------------------------------------------------
    def _read(self) -> Iterator[_Pair]:
        """Pairs from the current position on, forever (passes over the worker's shards)."""
        data, split = self.data, self.data.split
        while True:
            order, fed = self.order(self.pos["pass"]), False
            whole = self.pos["shard"] == 0 and self.pos["sample"] == 0 and self.pos["caption"] == 0
            while self.pos["shard"] < len(order):
                s = order[self.pos["shard"]]
                img_idx, txt_idx = data.image_offsets[s], data.text_offsets[s]  # counted up to the position
                for sample in data.read(s):  # checked against sizes.json when read to the end
                    if sample_split(sample, data.default_split) != split:
                        continue
                    if sample.position >= self.pos["sample"]:
                        for c in range(
                            self.pos["caption"] if sample.position == self.pos["sample"] else 0, len(sample.captions)
                        ):
                            self.pos["sample"], self.pos["caption"] = sample.position, c + 1
                            fed = True
                            yield _Pair((s, sample.position, c, img_idx, txt_idx + c), sample)
                    img_idx, txt_idx = img_idx + 1, txt_idx + len(sample.captions)
                self.pos.update(shard=self.pos["shard"] + 1, sample=0, caption=0)
            if whole and not fed:
                raise DataError(f"shards {[data.shards[s].path for s in order][:3]} hold no {split!r} sample")
            self.pos.update({"pass": self.pos["pass"] + 1, "shard": 0, "sample": 0, "caption": 0})

    def pairs(self, buffer_size: int) -> Iterator[_Pair]:
        """The shuffled pairs: each incoming pair replaces a uniformly drawn buffered one, which is emitted."""
        for pair in self._read():
            if len(self.buffer) < buffer_size:
                self.buffer.append(pair)
                continue
            i = int(self.rng.integers(len(self.buffer)))
            out, self.buffer[i] = self.buffer[i], pair
            self.emitted += 1
            yield out


class ShardStream(IterableDataset):
    """Batches of this rank's epoch stream; each worker yields its own batches (see the module docstring).
    Every batch dict carries "_stream": (logical worker, its state after this batch)."""

    def __init__(self, data: ShardTrainSet, tokenizer, transform, cfg: dict[str, Any]):
        super().__init__()
        self.data, self.tokenizer, self.transform, self.cfg = data, tokenizer, transform, cfg
        self.epoch, self.first_batch, self.resume = 0, 0, {}  # resume: logical worker -> state or replay count

    def __iter__(self):
        info = get_worker_info()
        slot, W = (info.id, info.num_workers) if info is not None else (0, 1)
        c = self.cfg
        w = (slot + self.first_batch) % W  # the DataLoader starts its round robin at slot 0
        mine = [j for j in range(self.first_batch, c["n_batches"]) if j % W == w]
        if not mine:
            return
        stream = WorkerStream(self.data, c["seed"], self.epoch, c["rank"], c["world"], w, W)
        todo = self.resume.get(w)
        if isinstance(todo, dict):
            stream.restore(todo)
        pairs = stream.pairs(c["buffer"])
        if isinstance(todo, int):  # replay: the batches this worker made before, without decoding
            for _ in range(todo * c["batch_size"]):
                next(pairs)
        for _ in mine:
            chosen = [(next(pairs), stream.emitted) for _ in range(c["batch_size"])]
            ids = self.tokenizer.encode_batch([p.sample.captions[p.ref[2]] for p, _ in chosen])  # one call per batch
            batch = collate([self._item(p, emitted, tokens) for (p, emitted), tokens in zip(chosen, ids, strict=True)])
            batch["_stream"] = (w, stream.state())
            yield batch

    def _item(self, pair: _Pair, emitted: int, input_ids: list[int]) -> dict:
        c, sample = self.cfg, pair.sample
        _, _, _, img_idx, txt_idx = pair.ref
        seed = (((c["seed"] * 1_000_003 + self.epoch) * 1_009 + c["rank"]) * 10_000_019 + txt_idx) * 7 + emitted
        item = {"input_ids": input_ids, "image_idx": img_idx, "text_idx": txt_idx}
        if sample.meta.get("pid") is not None:
            item["pid"] = sample.meta["pid"]  # an int: _parse checked the sample's json
        try:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed % (2**63))  # the CPU generator only (as PairView)
                boxes = sample.meta.get("boxes")
                boxes = boxes[: c["max_boxes"]] if (c["max_boxes"] and boxes) else None
                pixels = decode_image(sample.image, sample.where(), self.data.max_image_pixels, self.data.background)
                image, boxes = apply_transform(self.transform, pixels, boxes)
        except DataError as err:
            if not c["skip_bad"]:
                raise
            return {"skipped": str(err)}
        item["image"] = image  # (3, S, S)
        if c["max_boxes"]:
            item["boxes"] = boxes if boxes is not None else torch.zeros(0, 4)
        return item


def _identity(x):
    return x


class ShardLoader:
    """The train loader of a webdataset, a `ResumableLoader` (crossmatch.models.protocols): `set_epoch(epoch,
    start)`, `steps`, `batch_size`, iteration, and `state_dict()` / `load_state_dict()` of its position."""

    def __init__(self, stream: ShardStream, num_workers: int = 0):
        self.stream, self.num_workers = stream, num_workers
        self.batch_size = stream.cfg["batch_size"]
        self.epoch, self.consumed, self.states = 0, 0, {}  # states: logical worker -> state after its last batch
        self._saved: dict[str, Any] | None = None

    @property
    def workers(self) -> int:
        return max(1, self.num_workers)

    def __len__(self) -> int:
        """Pairs per rank per epoch, whole batches only."""
        return self.stream.cfg["n_batches"] * self.batch_size

    @property
    def steps(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self.stream.cfg["n_batches"]

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Start (or resume, `start` pairs in) epoch `epoch`: from the stored position when it is this one,
        else by replaying each worker's batches from the epoch start."""
        if start % self.batch_size:
            raise ConfigError(f"resume position {start} is not a whole number of batches of {self.batch_size}")
        j0, W = start // self.batch_size, self.workers
        saved = self._saved or {}
        states = {}
        world = self.stream.cfg["world"]
        if (saved.get("epoch"), saved.get("consumed"), saved.get("workers"), saved.get("world")) == (
            epoch,
            j0,
            W,
            world,
        ):
            states = {int(w): st for w, st in saved["states"].items()}
        resume: dict[int, Any] = {}  # logical worker -> its stored state, or the batches to replay
        for w in range(W):
            done = len(range(w, j0, W))  # batches j < j0 with j % W == w
            if done:
                resume[w] = states.get(w, done)
        if any(isinstance(v, int) for v in resume.values()):
            log.warning("no stored stream position for epoch %d batch %d: replaying the shards to it", epoch + 1, j0)
        self.epoch, self.consumed = epoch, j0
        self.states = {w: st for w, st in resume.items() if isinstance(st, dict)}
        self.stream.epoch, self.stream.first_batch, self.stream.resume = epoch, j0, resume

    def __iter__(self):
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, collate_fn=_identity)
        for batch in loader:
            w, state = batch.pop("_stream")
            self.states[w] = state
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "workers": self.workers,
            "world": self.stream.cfg["world"],
            "states": self.states,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._saved = state


def build_shard_loader(
    data: ShardTrainSet,
    tokenizer,
    transform,
    *,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    buffer_size: int = 1000,
    skip_bad: bool = False,
    max_boxes: int = 0,
) -> ShardLoader:
    """The resumable train loader of a webdataset split (see the module docstring)."""
    if buffer_size < 1:
        raise ConfigError(f"data.shuffle_buffer={buffer_size}: must be at least 1")
    cfg = {
        "seed": seed,
        "rank": rank,
        "world": world_size,
        "batch_size": batch_size,
        "n_batches": data.num_pairs // (world_size * batch_size),
        "buffer": buffer_size,
        "skip_bad": skip_bad,
        "max_boxes": max_boxes,
    }
    # Fail now, not in a worker: every logical worker of every rank needs a shard.
    WorkerStream(data, seed, 0, world_size - 1, world_size, max(1, num_workers) - 1, max(1, num_workers))
    return ShardLoader(ShardStream(data, tokenizer, transform, cfg), num_workers)
