"""Batching: the collate function, a resumable seeded sampler, the resumable train loader and the DataLoader
builders.

Batch dict (B items): image (B, 3, S, S) float; input_ids (B, L) long, 0-padded; attention_mask (B, L)
bool; image_idx, text_idx (B,) long; pid (B,) long person identities when the dataset has them;
boxes (B, K, 4) and box_mask (B, K) when box regions are used; with text negatives (`PairView`
text_negatives = N > 0) neg_input_ids (B, N, L_neg) long and neg_attention_mask (B, N, L_neg) bool (padded
like captions), neg_valid (B, N) bool (False: an empty slot, filled with the positive caption).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from crossmatch.data.tokenizer import PAD_ID


def pad_sequences(seqs: list[list[int]], pad: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged id lists -> ids (B, L) and bool mask (B, L), L the longest sequence."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs])
    return ids, torch.arange(L)[None, :] < lengths[:, None]


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    skipped = [it["skipped"] for it in items if "skipped" in it]  # unreadable images (PairView skip_bad)
    items = [it for it in items if "skipped" not in it]
    if skipped:
        return {"skipped": skipped, **(collate(items) if items else {})}
    first, batch = items[0], {}
    if "image" in first:
        batch["image"] = torch.stack([it["image"] for it in items])  # (B, 3, S, S)
    if "image_key" in first:  # KeyedImageView: the model has these images' outputs cached
        batch["image_key"] = [it["image_key"] for it in items]  # B bytes
    if "input_ids" in first:
        batch["input_ids"], batch["attention_mask"] = pad_sequences([it["input_ids"] for it in items])  # (B, L)
    if "neg_input_ids" in first:
        B, N = len(items), len(first["neg_valid"])
        ids, mask = pad_sequences([seq for it in items for seq in it["neg_input_ids"]])  # (B*N, L_neg)
        batch["neg_input_ids"], batch["neg_attention_mask"] = ids.view(B, N, -1), mask.view(B, N, -1)  # (B, N, L)
        batch["neg_valid"] = torch.tensor([it["neg_valid"] for it in items], dtype=torch.bool)  # (B, N)
    for key in ("image_idx", "text_idx", "pid"):
        if key in first:
            batch[key] = torch.tensor([it[key] for it in items], dtype=torch.long)  # (B,)
    if "boxes" in first:
        K = max(1, max(len(it["boxes"]) for it in items))
        boxes, mask = torch.zeros(len(items), K, 4), torch.zeros(len(items), K, dtype=torch.bool)
        for b, it in enumerate(items):
            boxes[b, : len(it["boxes"])], mask[b, : len(it["boxes"])] = it["boxes"], True
        batch["boxes"], batch["box_mask"] = boxes, mask  # (B, K, 4), (B, K)
    return batch


class EpochSampler(Sampler):
    """A seeded shuffle that depends only on (seed, epoch), sharded over ranks, resumable mid-epoch.

    Yields (index, item_seed): the dataset seeds the item's augmentation with item_seed, so the stream
    of batches is a pure function of (seed, epoch, position) whatever the workers or restarts.
    `start` skips this rank's first items (a resumed epoch); it applies to the next iteration only.
    """

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.n, self.seed, self.rank, self.world_size, self.shuffle = n, seed, rank, world_size, shuffle
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(n / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        """Items left in the epoch from `start` (`per_rank` is the whole epoch's)."""
        return self.per_rank - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        order = torch.cat([order, order[: self.per_rank * self.world_size - self.n]])  # pad like DistributedSampler
        mine = order[self.rank :: self.world_size].tolist()
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        for pos in range(self.start, len(mine)):
            yield mine[pos], base + pos * self.world_size + self.rank


class EpochLoader(DataLoader):
    """The train loader of an indexed split: a DataLoader over an `EpochSampler` (or `HardBatchSampler`) that is a
    `ResumableLoader` (crossmatch.models.protocols). Its position needs no state of its own: the batch stream is
    a pure function of (seed, epoch, position), and the Trainer's step is the position."""

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Order epoch `epoch`; the next iteration skips this rank's first `start` items (a resumed epoch)."""
        self.sampler.set_epoch(epoch, start)

    @property
    def steps(self) -> int:
        """Whole batches per epoch on this rank, counted from the epoch start (whatever `start`)."""
        return self.sampler.per_rank // self.batch_size

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def build_train_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    sampler: EpochSampler | None = None,
) -> EpochLoader:
    """Per-rank batches of `batch_size`; the last incomplete batch is dropped (hinge losses need negatives).
    The items come from `sampler` when given (an `EpochSampler`, e.g. `HardBatchSampler`), else from an
    `EpochSampler`.

    Workers persist across epochs (no new processes and no empty pipeline at each epoch start; the
    sampler lives in the main process, so `set_epoch` still applies). `pin_memory` (for a CUDA device)
    lets the copy of each batch to the device overlap with compute."""
    sampler = sampler if sampler is not None else EpochSampler(len(dataset), seed, rank, world_size)
    # A private generator: creating an iterator must not consume the global torch RNG, whose state the
    # checkpoint restores (a resumed run creates its iterator at another moment than the original).
    return EpochLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        drop_last=True,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )


def build_eval_loader(dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Batches in index order; workers persist between passes (a run validates every epoch)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
