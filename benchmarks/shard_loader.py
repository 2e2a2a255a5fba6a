"""Training-loader throughput: WebDataset shards (`data.format: webdataset`) against the JSON-indexed folder
holding the same images, side by side in one run, with 0 and 2 loader workers.

    python benchmarks/shard_loader.py                       # 2000 generated 64 px shapes images
    python benchmarks/shard_loader.py --data data/shapes    # an existing Karpathy-JSON dataset

Both loaders decode, augment (the train transform), tokenize and collate the same pairs into batches; the
time to draw `--batches` batches (iterator start-up included) is taken, best of `--repeats`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from crossmatch.config import DataConfig
from crossmatch.data.check import convert, resolve_source
from crossmatch.data.datasets import PairView
from crossmatch.data.formats import open_split
from crossmatch.data.loaders import build_train_loader
from crossmatch.data.shard_stream import build_shard_loader
from crossmatch.data.tokenizer import CaptionTokenizer
from crossmatch.data.transforms import build_image_transform


def draw(loader, n: int) -> float:
    t = time.perf_counter()
    loader.set_epoch(0, 0)
    it = iter(loader)
    for _ in range(n):
        next(it)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="a Karpathy-JSON dataset folder (default: generate shapes)")
    p.add_argument("--images", type=int, default=2000, help="generated train images (without --data)")
    p.add_argument("--size", type=int, default=64, help="image side")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    data = Path(args.data) if args.data else tmp / "shapes"
    if not args.data:
        from crossmatch.data.shapes import generate_shapes

        generate_shapes(data, args.images, 10, 10, seed=0, size=args.size, workers=2)
    convert(resolve_source(data), tmp / "shards", "webdataset", args.shard_size)
    folder = open_split(DataConfig(root=str(data)), "train")
    shards = open_split(DataConfig(root=str(tmp / "shards"), format="webdataset"), "train")
    tok = CaptionTokenizer.train(folder.captions)
    transform = build_image_transform(args.size, train=True)
    n_pairs = args.batches * args.batch_size
    print(
        f"{len(folder.images)} images, {len(folder.captions)} pairs, {len(shards.shards)} shards; drawing "
        f"{args.batches} batches of {args.batch_size} ({n_pairs} pairs), best of {args.repeats}; "
        f"{torch.get_num_threads()} torch thread per process, {os.cpu_count()} CPUs"
    )
    for workers in (0, 2):
        loaders = {
            "json folder": build_train_loader(PairView(folder, tok, transform), args.batch_size, 0, workers),
            "shards": build_shard_loader(
                shards, tok, transform, batch_size=args.batch_size, seed=0, num_workers=workers
            ),
        }
        best = {name: float("inf") for name in loaders}
        for _ in range(args.repeats):
            for name, loader in loaders.items():
                best[name] = min(best[name], draw(loader, args.batches))
        ratio = best["json folder"] / best["shards"]
        print(
            f"workers={workers} (load {os.getloadavg()[0]:.2f}): json folder {n_pairs / best['json folder']:7.0f} "
            f"pairs/s, shards {n_pairs / best['shards']:7.0f} pairs/s: shards {ratio:.2f}x the folder's throughput"
        )


if __name__ == "__main__":
    main()
