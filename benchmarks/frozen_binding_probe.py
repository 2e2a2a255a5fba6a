"""Does a frozen image tower's output carry attribute binding and relations (issue 13)? A linear probe, trained on
the tower's frozen features of shapes train images, predicts which (colour, shape) conjunctions a scene holds
(multi-hot, from the dataset's `objects`). On val twins (the same objects with swapped attributes, e.g. a yellow
disc and a blue pyramid against a blue disc and a yellow pyramid), binding accuracy is how often the probe, reading
image A, scores A's own conjunctions above the ones only its twin has (0.5: the features hold the objects' colours
and shapes but not which goes with which).

A second linear probe reads one cell of the h x w map at a time (shared by all cells, as the fusion's
cross-attention reads cells) and says which conjunctions have their box centre in it. Localisation accuracy: how
often an object's own cell is where the probe scores its conjunction highest (chance 1 / (h * w)). Each
conjunction's predicted centre is the softmax-weighted mean of the cell centres. Relation accuracy: over every
clear relation the captions may state between two val objects ("a left of b", "a above b": the generator's own
`relations`, with its margin), how often the predicted centres put a and b the same way round (0.5: the map says
nothing of position). Position-twin accuracy: over the val twin pairs with the same conjunctions (the twins that
differ only in where the objects are), how often the centres predicted from image A are nearer A's true centres
than its twin's (0.5: chance).

    python benchmarks/frozen_binding_probe.py --data DIR [--train 3000] [--val 800] [--sizes 128] [--threads 1]

Prints, per input size and pooling (the global average, and the flattened h x w grid), the feature shape and the
binding accuracy over the val twin pairs whose conjunctions differ; then the cell probe's localisation, relation
and position-twin accuracies; each with the probe's final train loss and the wall time, with the machine load.
The tower is the packaged EfficientNet-Lite0 with its own preprocessing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from crossmatch.data.shapes import relations
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


def centres(images: list[dict], col: dict[tuple[str, str], int], side: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each conjunction's box centre in [0, 1] (a scene holds each at most once): (N, K, 2) with x, y, and the
    mask of the conjunctions present (N, K)."""
    xy, mask = torch.zeros(len(images), len(col), 2), torch.zeros(len(images), len(col))
    for i, im in enumerate(images):
        for o, (x0, y0, x1, y1) in zip(im["objects"], im["boxes"], strict=True):
            k = col[(o["color"], o["shape"])]
            xy[i, k] = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2]) / side
            mask[i, k] = 1.0
    return xy, mask


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


def fit_probe(x: torch.Tensor, y: torch.Tensor, steps: int = 300, lr: float = 1e-3) -> tuple[torch.nn.Linear, float]:
    """Logistic regression (one sigmoid per conjunction, full batch Adam, small L2): x (N, F), y (N, K)."""
    probe = torch.nn.Linear(x.shape[1], y.shape[1])
    torch.nn.init.zeros_(probe.weight)
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(probe(x), y) + 1e-4 * probe.weight.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return probe, loss.item()


def relation_accuracy(pred: torch.Tensor, images: list[dict], col: dict, side: float) -> tuple[float, int]:
    """Share of the clear relations between two objects of a scene ("left", "above", ...) that the predicted
    centres (N, K, 2) reproduce: a's predicted x (or y) on the right side of b's."""
    axis = {"left": (0, -1), "right": (0, 1), "above": (1, -1), "below": (1, 1)}  # centre of a minus b: its sign
    wins, n = 0, 0
    for i, im in enumerate(images):
        keys = [col[(o["color"], o["shape"])] for o in im["objects"]]
        for a, b in itertools.permutations(range(len(keys)), 2):
            for rel in relations(im["boxes"][a], im["boxes"][b], side):
                dim, sign = axis[rel]
                wins += int(sign * (pred[i, keys[a], dim] - pred[i, keys[b], dim]) > 0)
                n += 1
    return wins / max(n, 1), n


def position_twin_accuracy(
    pred: torch.Tensor, xy: torch.Tensor, mask: torch.Tensor, twins: list[tuple[int, int]]
) -> tuple[float, int]:
    """Share of (image, twin) with the same conjunctions where the centres predicted from the image (N, K, 2) are
    nearer its own true centres than the twin's (summed squared distance over its objects); both ways per pair."""
    wins, n = 0, 0
    for a, b in twins:
        if torch.equal(mask[a], mask[b]):
            m = mask[a].bool()
            for u, v in ((a, b), (b, a)):
                own, other = ((pred[u][m] - xy[w][m]).pow(2).sum() for w in (u, v))
                wins += int(own < other)
                n += 1
    return wins / max(n, 1), n


def cell_targets(xy: torch.Tensor, mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Which conjunctions have their centre in each cell of an h x w grid: (N, h * w, K) from centres (N, K, 2)."""
    row = (xy[..., 1] * h).long().clamp(0, h - 1)
    cell = row * w + (xy[..., 0] * w).long().clamp(0, w - 1)  # (N, K), row-major as flatten(2) orders the cells
    y = F.one_hot(cell, h * w).float() * mask[..., None]  # (N, K, h * w)
    return y.transpose(1, 2)


def localisation_accuracy(scores: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """Share of objects whose own cell is where the cell probe scores their conjunction highest: scores, y
    (N, h * w, K)."""
    present = y.sum(1) > 0  # (N, K)
    hit = scores.argmax(1) == y.argmax(1)  # (N, K)
    return hit[present].float().mean().item(), int(present.sum())


def soft_centres(scores: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Where the cell probe puts each conjunction: the centres of the h x w cells (row-major) weighted by the
    softmax of its scores over the cells. scores (N, h * w, K) -> (N, K, 2) x, y in [0, 1]."""
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    cells = torch.stack([xs.flatten(), ys.flatten()], -1)  # (h * w, 2)
    return torch.einsum("nrk,rc->nkc", scores.softmax(1), cells)


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
    y_all, col = conjunctions(train + val)
    y_tr, y_va = y_all[: len(train)], y_all[len(train) :]
    with Image.open(root / "images" / train[0]["filename"]) as im:
        side = float(im.width)  # the generator's square canvas, which its boxes and relation margin are in
    xy_all, m_all = centres(train + val, col, side)
    xy_tr, xy_va, m_tr, m_va = xy_all[: len(train)], xy_all[len(train) :], m_all[: len(train)], m_all[len(train) :]
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
        # Cell by cell, what the fusion's cross-attention reads: one probe shared by all cells, on a cell's
        # features alone, says which conjunctions are centred in it. Chance: 1 / (h * w).
        (n_tr, c, h, w), n_va = f_tr.shape, f_va.shape[0]
        x_tr, x_va = (f.flatten(2).transpose(1, 2).reshape(-1, c) for f in (f_tr, f_va))  # (N * h * w, C)
        mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
        y_cell_tr, y_cell_va = cell_targets(xy_tr, m_tr, h, w), cell_targets(xy_va, m_va, h, w)  # (N, h * w, K)
        probe, loss = fit_probe((x_tr - mu) / sd, y_cell_tr.reshape(n_tr * h * w, -1), lr=1e-2)  # sparse targets
        with torch.no_grad():
            scores = probe((x_va - mu) / sd).view(n_va, h * w, -1)
        loc, n_obj = localisation_accuracy(scores, y_cell_va)
        pred = soft_centres(scores, h, w)  # (N, K, 2)
        rel, n_rel = relation_accuracy(pred, val, col, side)
        pos, n_pos = position_twin_accuracy(pred, xy_va, m_va, twins)
        print(
            f"size {size} fmap {(c, h, w)} cell: localisation accuracy {loc:.3f} over {n_obj} objects (chance"
            f" {1 / (h * w):.3f}), relation accuracy {rel:.3f} over {n_rel} relations, position-twin accuracy"
            f" {pos:.3f} over {n_pos} (train loss {loss:.4f}; {time.perf_counter() - start:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
