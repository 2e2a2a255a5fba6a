"""How often `data.hard_batches` puts confusable pairs together, against the random EpochSampler, on a shapes
train split (default /work/bench/shapes_neg, `crossmatch data shapes --out DIR`), and the time to plan an epoch.

    python benchmarks/hard_batches.py [DATASET_DIR] [BATCH_SIZE]

Prints: the share of different-image caption pairs within a batch whose images have the same object set, the
share of the generator's train pairs (images 8k, 8k+1: the same objects, swapped attributes or positions) that
have captions in a common batch, and the best of 3 times of `epoch_order`, with the machine load.
"""

import os
import sys
import time
from collections import Counter

from crossmatch.data.datasets import ImageCaptionDataset
from crossmatch.data.hard_batches import HardBatchSampler, item_keys
from crossmatch.data.loaders import EpochSampler


def main() -> None:
    root = sys.argv[1] if len(sys.argv) > 1 else "/work/bench/shapes_neg"
    B = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    ds = ImageCaptionDataset(root, "train")
    groups, subs, images = item_keys(ds)
    hard = HardBatchSampler(groups, subs, images, B, seed=0)
    times = []
    for epoch in range(3):
        t0 = time.perf_counter()
        hard._cache = None
        hard.epoch_order(epoch)
        times.append(time.perf_counter() - t0)
    rand = EpochSampler(len(groups), seed=0)
    pairs = [(i, i + 1) for i in range(0, len(ds.images) - 1, 8)]  # the generator's train pairs
    print(f"{len(groups)} captions of {len(ds.images)} images, {len(set(groups))} object sets, batch {B}")
    for name, sampler in (("hard_batches", hard), ("random", rand)):
        order = [k for k, _ in sampler]
        same = total = 0
        batch_of: dict[int, set[int]] = {}
        for start in range(0, len(order) - B + 1, B):
            batch = order[start : start + B]
            g, im = Counter(groups[k] for k in batch), Counter(images[k] for k in batch)
            within_image = sum(c * (c - 1) // 2 for c in im.values())
            same += sum(c * (c - 1) // 2 for c in g.values()) - within_image
            total += B * (B - 1) // 2 - within_image
            for k in batch:
                batch_of.setdefault(images[k], set()).add(start)
        together = sum(bool(batch_of.get(a, set()) & batch_of.get(b, set())) for a, b in pairs) / len(pairs)
        share = f"same-object-set pairs {100 * same / total:5.1f}%"
        print(f"{name:13} {share}   train pairs sharing a batch {100 * together:5.1f}%")
    print(f"plan one epoch: {min(times):.3f} s (best of 3), load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
