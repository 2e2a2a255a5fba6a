"""Hard batches (`data.hard_batches`): a train sampler that puts confusable pairs in the same batch.

In-batch negatives of random scenes are easy; the pairs a bag-of-words model confuses (the same objects bound
differently, as in ARO, Yuksekgonul et al. ICLR 2023, and NegCLIP's hard negatives) rarely share a batch. This
sampler groups the captions of images that share their objects and fills each batch with whole groups:

- group key of an image: the shapes data records its objects, so the key is the multiset of its shapes (twins,
  which swap colours, sizes or positions, share it); other datasets: the nouns its captions share, by a small
  heuristic (`caption_nouns`: words that are neither function words nor colour/size/spatial words, present in more
  than half of the image's captions). Within a group, images with the same bag of words (the same colours
  and sizes, however bound: twins) come next to each other, so a group cut at a batch boundary keeps them together.
- a group of one image only is no hard group: its captions fill the gaps left by the groups, at random.
- epoch order: groups in random order, each cut into batch-sized pieces; the smaller end pieces are packed
  into batches whole (first fit decreasing), gaps are filled with the random items (what is still short of a
  batch is cut again: only there can a piece be split), the batches are shuffled. Everything is drawn from a
  generator seeded with (seed, epoch), so the stream is a pure function of (seed, epoch, position), exactly as
  `EpochSampler`'s: ranks take every world_size-th batch (then an equal share of the incomplete tail), and
  `set_epoch(epoch, start)` resumes mid-epoch.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence

import torch

from crossmatch.data.loaders import EpochSampler

# Words that are not nouns in image captions: articles, prepositions, verbs of being, colours, sizes and spatial
# words. Crude by design (no tagger): a shared word left in only makes a group a little wider.
FUNCTION_WORDS = frozenset(
    "a an the and or of to in on at by with from for is are was were be been being it its this that these those "
    "there here has have had as into onto over under above below beneath left right top bottom front behind next "
    "near far up down out off while his her their them they he she we you who which what where when how some "
    "each every one two three four five six seven eight nine ten many several other another just only also very "
    "picture image photo showing shows shown sits sitting stands standing lies lying than higher lower well "
    "red green blue yellow purple orange white black grey gray brown pink crimson scarlet emerald cobalt golden "
    "violet tangerine snowy ebony small little tiny large big huge tall short long wide".split()
)


def caption_nouns(caption: str) -> set[str]:
    """The words of a caption that may be nouns: lower-cased, at least 3 letters, not in FUNCTION_WORDS, not
    ending in -ing or -ly."""
    words = re.findall(r"[a-z]+", caption.lower())
    return {w for w in words if len(w) >= 3 and w not in FUNCTION_WORDS and not w.endswith(("ing", "ly"))}


def image_keys(ds) -> list[tuple[Hashable, Hashable]]:
    """(group key, sub key) per image of a split (an `ImageCaptionDataset`): see the module docstring."""
    keys = []
    for i, rec in enumerate(ds.images):
        objects = getattr(rec, "objects", None)
        if objects:
            shapes = tuple(sorted(str(o.get("shape")) for o in objects))
            colours, sizes = (tuple(sorted(str(o.get(k)) for o in objects)) for k in ("color", "size"))
            bag = (colours, sizes)
            keys.append((shapes, bag))  # twins swap colours, sizes or positions: the same shapes, the same bag
            continue
        counts = Counter(w for t in rec.caption_ids for w in caption_nouns(ds.captions[t]))
        shared = frozenset(w for w, c in counts.items() if 2 * c > len(rec.caption_ids))
        keys.append((shared or ("image", i), i))  # no noun: a group of its own (random fill)
    return keys


def item_keys(ds) -> tuple[list[Hashable], list[Hashable], list[int]]:
    """Per caption (a training item of `PairView`): its image's group key, sub key, and image index."""
    per_image = image_keys(ds)
    image_of = list(ds.txt_to_img)
    return [per_image[i][0] for i in image_of], [per_image[i][1] for i in image_of], image_of


class HardBatchSampler(EpochSampler):
    """`EpochSampler`'s interface and guarantees, with batches of confusable items (see the module docstring).

    Yields (index, item_seed). Args: groups, subgroups, images: per item its group key, sub key and image
    (`item_keys`); batch_size: the loader's batch size (batches are cut at its multiples); seed, rank,
    world_size as for `EpochSampler`.
    """

    def __init__(
        self,
        groups: Sequence[Hashable],
        subgroups: Sequence[Hashable],
        images: Sequence[int],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(len(groups), seed, rank, world_size)  # n, per_rank, and set_epoch(epoch, start)
        self.batch_size = batch_size
        members: dict[Hashable, list[int]] = defaultdict(list)
        for k, g in enumerate(groups):
            members[g].append(k)
        hard = [m for m in members.values() if len({images[k] for k in m}) > 1]
        self.groups = sorted(hard)  # (in item order: the group list is a function of the dataset only)
        self.loose = sorted(k for m in members.values() if len({images[k] for k in m}) == 1 for k in m)
        self.subgroup = list(subgroups)
        self._cache: tuple[int, list[int]] | None = None

    def epoch_order(self, epoch: int) -> list[int]:
        """The whole epoch's items (n of them), batch after batch: batches of `batch_size` first, then the rest."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        B = self.batch_size
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        rank_of = torch.randperm(self.n, generator=g).tolist()  # a random rank of every item: tie-breaks below
        pieces = []
        for gi in torch.randperm(len(self.groups), generator=g).tolist():
            group = self.groups[gi]
            sub_rank = {}  # sub-groups (exact twins) in random order, items randomly inside them
            for k in sorted(group, key=lambda k: rank_of[k]):
                sub_rank.setdefault(self.subgroup[k], len(sub_rank))
            ordered = sorted(group, key=lambda k: (sub_rank[self.subgroup[k]], rank_of[k]))
            pieces += [ordered[i : i + B] for i in range(0, len(ordered), B)]
        fill = sorted(self.loose, key=lambda k: rank_of[k])
        batches = [p for p in pieces if len(p) == B]
        bins: list[list[int]] = []  # first fit decreasing: the cut ends of groups share batches
        open_bins: list[list[int]] = []
        for piece in sorted((p for p in pieces if len(p) < B), key=len, reverse=True):  # stable: random among ties
            target = next((b for b in open_bins if len(b) + len(piece) <= B), None)
            if target is None:
                target = []
                bins.append(target)
                open_bins.append(target)
            target += piece
            if len(target) == B:
                open_bins.remove(target)
        for b in bins:  # gaps take the random items
            take = min(B - len(b), len(fill))
            b += fill[:take]
            fill = fill[take:]
        batches += bins
        flat = [k for b in batches if len(b) < B for k in b] + fill  # partly filled batches: cut again
        full = [b for b in batches if len(b) == B] + [flat[i : i + B] for i in range(0, len(flat) - B + 1, B)]
        tail = flat[len(flat) - len(flat) % B :] if len(flat) % B else []
        order = [k for j in torch.randperm(len(full), generator=g).tolist() for k in full[j]] + tail
        self._cache = (epoch, order)
        return order

    def __iter__(self):
        B, ws = self.batch_size, self.world_size
        order = self.epoch_order(self.epoch)
        total = self.per_rank * ws
        stream = (order * (total // max(1, self.n) + 1))[:total]  # pad with the first items, as EpochSampler does
        q = self.per_rank // B  # full batches per rank: rank r takes batches r, r + ws, ...
        rem = self.per_rank - q * B  # then an equal share of what is left
        mine = [p for j in range(q) for p in range((j * ws + self.rank) * B, (j * ws + self.rank + 1) * B)]
        mine += list(range(q * ws * B + self.rank * rem, q * ws * B + (self.rank + 1) * rem))
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        for pos in range(self.start, len(mine)):
            yield stream[mine[pos]], base + mine[pos]
