"""Person search on a split of the people data (`crossmatch data people`), with twin accuracy by twin kind:
a trained run's scores, or a training-free floor that shows how hard the data is.

    python scripts/people_report.py --data data/people               # the training-free colour floor
    python scripts/people_report.py --data data/people --run RUN     # a trained run (its best checkpoint)

The floor reads the caption's colour words and matches each to the colour histogram of the part of the crop
where its garment is: a top, dress, cap, stripes or logo to the crop's upper half; trousers, shorts, a skirt
or shoes to its lower half; a bag or a carried item to the whole crop (hair colours are skipped: their words
overlap the garment palette). A pixel counts for the palette colour nearest to it, when nearer than
`MAX_DISTANCE` in RGB. score(image, caption) = sum over the caption's colour mentions of
log(EPS + the fraction of that region's pixels with that colour).

Prints the metrics as one JSON object: t2i / i2t R@1/5/10, mAP, mINP (identity-level, as `crossmatch evaluate`
reports them), t2i_twin_acc over all twin pairs and `t2i_twin_acc_<kind>` per twin kind (swap_colors: the
same two colours on the top and the bottom, swapped; shoes; handbag), with the number of pairs of each kind.

Legend: N_img images, N_txt captions, R regions (upper, lower, whole), P palette colours.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from crossmatch.config import load_config
from crossmatch.data.people import ANNOTATION_FILE, COLORS, TWIN_KINDS, twin_kind
from crossmatch.data.transforms import load_image
from crossmatch.metrics import twin_identity_accuracy
from crossmatch.retrieval.evaluate import compute_scores
from crossmatch.retrieval.person import TWIN_KEY, image_pids, person_metrics
from crossmatch.runs import build_eval_data, load_run, open_split

REGIONS = ("upper", "lower", "whole")
PALETTE = list(COLORS)  # P colour names
WORD_TO_COLOR = {word: name for name, (_, words) in COLORS.items() for word in words}
# The noun a colour word describes -> where it is in the crop (upper / lower half), or None (skip: hair).
NOUN_REGION = {
    **dict.fromkeys(("t-shirt", "shirt", "top", "tee", "sweater", "jacket", "coat", "dress"), "upper"),
    **dict.fromkeys(("striped", "stripes", "logo", "cap", "hat"), "upper"),
    **dict.fromkeys(("trousers", "pants", "shorts", "skirt", "shoes", "sneakers", "trainers"), "lower"),
    **dict.fromkeys(("backpack", "rucksack", "handbag", "purse", "bag", "umbrella", "bottle", "book"), "whole"),
    "folder": "whole",
    "hair": None,
}
MAX_DISTANCE = 70.0  # RGB distance under which a pixel counts for its nearest palette colour (casts shift it)
EPS = 1e-3  # floor of a fraction inside the log: a colour that is absent costs log(EPS), not -inf


def colour_mentions(caption: str) -> list[tuple[str, str]]:
    """(region, palette colour) of each colour word of a caption: the region of the first noun after it."""
    words = re.findall(r"[a-z-]+", caption.lower())
    out = []
    for i, word in enumerate(words):
        if word not in WORD_TO_COLOR:
            continue
        noun = next((w for w in words[i + 1 :] if w in NOUN_REGION), None)
        if noun is not None and NOUN_REGION[noun] is not None:
            out.append((NOUN_REGION[noun], WORD_TO_COLOR[word]))
    return out


def colour_fractions(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB image -> (R, P) fraction of each region's pixels nearest to each palette colour (within
    MAX_DISTANCE)."""
    rgb = image.astype(np.float32)  # (H, W, 3)
    palette = np.array([COLORS[name][0] for name in PALETTE], dtype=np.float32)  # (P, 3)
    dist = np.linalg.norm(rgb[:, :, None, :] - palette[None, None], axis=-1)  # (H, W, P)
    nearest = np.where(dist.min(-1) < MAX_DISTANCE, dist.argmin(-1), -1)  # (H, W), -1: no palette colour
    half = rgb.shape[0] // 2
    regions = {"upper": nearest[:half], "lower": nearest[half:], "whole": nearest}
    return np.stack(
        [np.bincount(regions[r][regions[r] >= 0], minlength=len(PALETTE)) / regions[r].size for r in REGIONS]
    )


def floor_scores(images: Sequence[np.ndarray], captions: Sequence[str]) -> torch.Tensor:
    """(N_img, N_txt) training-free scores: sum over each caption's colour mentions of log(EPS + fraction)."""
    logs = np.log(EPS + np.stack([colour_fractions(im) for im in images])).reshape(len(images), -1)  # (N_img, R*P)
    counts = np.zeros((len(captions), len(REGIONS) * len(PALETTE)))  # (N_txt, R*P)
    for t, cap in enumerate(captions):
        for region, colour in colour_mentions(cap):
            counts[t, REGIONS.index(region) * len(PALETTE) + PALETTE.index(colour)] += 1
    return torch.from_numpy(logs @ counts.T)  # (N_img, N_txt), float64


def report(scores: torch.Tensor, ds, kinds: dict[int, str]) -> dict:
    """Identity-level metrics of a (N_img, N_txt) score matrix on split `ds`, with twin accuracy by kind."""
    pids = image_pids(ds)  # (N_img,)
    txt_to_img = torch.tensor(ds.txt_to_img)
    out = person_metrics(scores, txt_to_img, pids, twin_pids=ds.twin_pids)
    query_pids = pids[txt_to_img]  # (N_txt,)
    for kind in TWIN_KINDS:
        pairs = [(a, b) for a, b in ds.twin_pids if kinds[a] == kind]
        if pairs:
            out[f"{TWIN_KEY}_{kind}"] = twin_identity_accuracy(scores.t(), query_pids, pids, pairs)
            out[f"twin_pairs_{kind}"] = len(pairs)
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def twin_kinds(root: Path) -> dict[int, str]:
    """pid -> twin kind of every twin identity of the people data at `root`."""
    records = json.loads((root / ANNOTATION_FILE).read_text())
    return {r["id"]: twin_kind(r["twin_differs"]) for r in records if "twin_pid" in r}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="the people data's folder (crossmatch data people --out)")
    p.add_argument("--run", help="a trained run (folder or checkpoint); without it, the training-free floor")
    p.add_argument("--split", default="test")
    args = p.parse_args(argv)
    if args.run:
        model, cfg, tokenizer = load_run(args.run, [f"data.root={args.data}"], need_data=True)
        ds = open_split(cfg, args.split)
        scores = compute_scores(model, build_eval_data(cfg, ds, tokenizer, model), torch.device("cpu"))
    else:
        ds = open_split(load_config(None, ["data.format=cuhk_pedes", f"data.root={args.data}"]), args.split)
        images = [load_image(rec.path).permute(1, 2, 0).numpy() for rec in ds.images]  # (H, W, 3) each
        scores = floor_scores(images, ds.captions)
    print(
        json.dumps(
            {"scorer": args.run or "colour floor", "split": args.split, **report(scores, ds, twin_kinds(args.data))}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
