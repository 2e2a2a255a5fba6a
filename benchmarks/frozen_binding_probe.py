"""Does a frozen image tower's output carry attribute binding (issue 13)? A linear probe, trained on the tower's
frozen features of shapes train images, predicts which (colour, shape) conjunctions a scene holds (multi-hot,
from the dataset's `objects`). On val twins (the same objects with swapped attributes, e.g. a yellow disc and a
blue pyramid against a blue disc and a yellow pyramid), binding accuracy is how often the probe, reading image A,
scores A's own conjunctions above the ones only its twin has (0.5: the features hold the objects' colours and
shapes but not which goes with which).

    python benchmarks/frozen_binding_probe.py --data DIR [--train 3000] [--val 800] [--sizes 128] [--threads 1]

Prints, per input size and pooling (the global average, and the flattened h x w grid), the feature shape, the
binding accuracy over the val twin pairs whose conjunctions differ, the probe's final train loss and the wall
time, with the machine load. The tower is the packaged EfficientNet-Lite0 with its own preprocessing.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from crossmatch.data.transforms import build_image_transform, load_image
from crossmatch.models.pretrained import ImageTower


def conjunctions(images: list[dict]) -> tuple[torch.Tensor, dict[tuple[str, str], int]]:
    """Multi-hot (colour, shape) labels: (N, n_colours * n_shapes) and the column of each conjunction."""
    colours = sorted({o["color"] for im in images for o in im["objects"]})
    shapes = sorted({o["shape"] for im in images for o in im["objects"]})
    col = {(c, s): k for k, (c, s) in enumerate((c, s) for c in colours for s in shapes)}
    y = torch.zeros(len(images), len(col))
    for i, im in enumerate(images):
        for o in im["objects"]:
            y[i, col[(o["color"], o["shape"])]] = 1.0
    return y, col


@torch.no_grad()
def features(tower: ImageTower, root: Path, images: list[dict], size: int, batch: int = 64) -> torch.Tensor:
    """The tower's frozen feature maps of the images at side `size`: (N, C, h, w)."""
    own = {k: tower.preprocess[k] for k in ("mean", "std", "interpolation", "resize")}  # the tower's preprocessing
    transform = build_image_transform(size, train=False, **own)
    out = []
    for s in range(0, len(images), batch):
        x = torch.stack([transform(load_image(root / "images" / im["filename"])) for im in images[s : s + batch]])
        out.append(tower.feature_map(x))  # (b, C, h, w)
    return torch.cat(out)


def fit_probe(x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> tuple[torch.nn.Linear, float]:
    """Logistic regression (one sigmoid per conjunction, full batch Adam, small L2): x (N, F), y (N, K)."""
    probe = torch.nn.Linear(x.shape[1], y.shape[1])
    torch.nn.init.zeros_(probe.weight)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-3)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(probe(x), y) + 1e-4 * probe.weight.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return probe, loss.item()


def binding_accuracy(scores: torch.Tensor, y: torch.Tensor, twins: list[tuple[int, int]]) -> tuple[float, int]:
    """Share of twin pairs (a, b) where the probe on image a scores a's own conjunctions above b's only ones
    (mean over each side's conjunctions): scores, y (N, K). Pairs with the same conjunctions are left out."""
    wins, n = 0, 0
    for a, b in twins:
        own, other = y[a].bool() & ~y[b].bool(), y[b].bool() & ~y[a].bool()
        if own.any() and other.any():
            wins += int(scores[a][own].mean() > scores[a][other].mean())
            n += 1
    return wins / max(n, 1), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="shapes dataset folder (dataset.json with objects, images/)")
    ap.add_argument("--train", type=int, default=3000, help="first N train images fit the probe")
    ap.add_argument("--val", type=int, default=800, help="first N val images (their twins) test it")
    ap.add_argument("--sizes", default="128", help="comma-separated input sides")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    root = Path(args.data)
    images = json.loads((root / "dataset.json").read_text())["images"]
    train = [im for im in images if im["split"] == "train"][: args.train]
    val = [im for im in images if im["split"] == "val"][: args.val]
    y_all, _ = conjunctions(train + val)
    y_tr, y_va = y_all[: len(train)], y_all[len(train) :]
    row = {im["imgid"]: i for i, im in enumerate(val)}
    twins = sorted({tuple(sorted((i, row[im["twin"]]))) for i, im in enumerate(val) if im.get("twin") in row})
    tower = ImageTower("efficientnet_lite0", pretrained=True, freeze=True)
    print(f"{len(train)} train images, {len(val)} val images, {len(twins)} twin pairs; load {os.getloadavg()[0]:.1f}")
    for size in (int(s) for s in args.sizes.split(",")):
        start = time.perf_counter()
        f_tr, f_va = features(tower, root, train, size), features(tower, root, val, size)
        for pool in ("mean", "grid"):
            x_tr, x_va = (f.mean((2, 3)) if pool == "mean" else f.flatten(1) for f in (f_tr, f_va))  # (N, F)
            mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
            probe, loss = fit_probe((x_tr - mu) / sd, y_tr)
            with torch.no_grad():
                acc, n = binding_accuracy(probe((x_va - mu) / sd), y_va, twins)
            print(
                f"size {size} fmap {tuple(f_tr.shape[1:])} {pool:4s}: binding accuracy {acc:.3f} over {n} twin pairs"
                f" (train loss {loss:.3f}; {time.perf_counter() - start:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
