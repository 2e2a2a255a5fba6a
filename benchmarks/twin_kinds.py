"""Twin accuracy by what the twins swap, and how far apart each side embeds them (shapes data).

The shapes generator makes each val/test twin by swapping the colours, the sizes or the positions of two objects
of a scene (`crossmatch.data.shapes._twin`). `twin_acc` pools all three; this splits it, with the same cases
(`crossmatch.metrics.twin_counts`), and for a model with global embeddings (dual encoders, a fusion model's
stage 1) prints the mean cosine between the two twins' image embeddings and between their captions (every
caption of one twin against every caption of the other). A kind at chance (50) whose image and caption
cosines are both ~1 is one that neither tower has learned to tell apart.

    python benchmarks/twin_kinds.py RUN/checkpoints/best.pt [--data DATA] [--split test] [--threads 2]

Scores are `crossmatch.score` (fusion models: stage 1 re-ranked by the run's eval.rerank_k); models that read
object boxes are scored by `crossmatch evaluate` only and are refused here.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch

import crossmatch
from crossmatch.data.datasets import ImageCaptionDataset
from crossmatch.errors import ModelError
from crossmatch.metrics import twin_counts

KINDS = ("colour", "size", "position")


def kind_of(a: Sequence[dict], b: Sequence[dict]) -> str:
    """What a twin pair swaps: its objects (same order, as the generator lists them) differ in colour or size,
    else only their boxes (positions) differ."""
    if [o["color"] for o in a] != [o["color"] for o in b]:
        return "colour"
    if [o["size"] for o in a] != [o["size"] for o in b]:
        return "size"
    return "position"


def accuracy_by_kind(
    scores: torch.Tensor, txt_to_img: torch.Tensor, twins: Sequence[tuple[int, int]], kinds: Sequence[str]
) -> dict[str, tuple[int, int, int]]:
    """{kind: (pairs, successful cases, cases)} of `twin_counts` over the pairs of each kind, plus "all"."""
    out = {}
    for kind in sorted(set(kinds), key=KINDS.index):
        pairs = [p for p, k in zip(twins, kinds, strict=True) if k == kind]
        out[kind] = (len(pairs), *twin_counts(scores, txt_to_img, pairs))
    out["all"] = (len(twins), *twin_counts(scores, txt_to_img, twins))
    return out


def twin_cosines(
    img: torch.Tensor, txt: torch.Tensor, txt_to_img: torch.Tensor, twins: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """(n_pairs, 2): per twin pair, the cosine of its two image embeddings and the mean cosine of every caption
    of one twin with every caption of the other. img (N_img, E), txt (N_txt, E), both l2-normalised."""
    rows = []
    for a, b in twins:
        ta, tb = txt[txt_to_img == a], txt[txt_to_img == b]  # (n_a, E), (n_b, E)
        rows.append(torch.stack([img[a] @ img[b], (ta @ tb.t()).mean()]))
    return torch.stack(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--data", help="the dataset root (default: the run's data.root)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = crossmatch.load(args.checkpoint)
    ds = ImageCaptionDataset(args.data or model.run_config.data.root, args.split)
    if not ds.twins:
        raise SystemExit(f"split {args.split} of {ds.root} has no twins (the shapes data has them in val and test)")
    if any(ds.images[i].objects is None for pair in ds.twins for i in pair):
        raise SystemExit(f"{ds.root}: twin images without their objects: not a shapes dataset")
    kinds = [kind_of(ds.images[a].objects, ds.images[b].objects) for a, b in ds.twins]
    t2i = torch.as_tensor(ds.txt_to_img)
    pixels = [model.preprocess(str(r.path)) for r in ds.images]  # decoded once, for both uses below
    scores = crossmatch.score(model, pixels, ds.captions, direction="i2t")  # (N_img, N_txt), as twin_acc ranks
    report = accuracy_by_kind(scores, t2i, ds.twins, kinds)
    cos = None
    try:
        with torch.no_grad():
            img = model.encode_image(torch.stack(pixels), normalize=True)  # (N_img, E)
            txt = model.encode_text(model.tokenizer(ds.captions), normalize=True)  # (N_txt, E)
        cos = twin_cosines(img, txt, t2i, ds.twins)  # (n_pairs, 2)
    except ModelError:  # models that read object boxes: accuracies only
        pass
    print(f"{'twins swap':<10} {'pairs':>6} {'cases':>6} {'twin_acc':>9} {'image cos':>10} {'caption cos':>12}")
    for kind, (n, wins, total) in report.items():
        sel = [k == kind or kind == "all" for k in kinds]
        extra = "" if cos is None else f" {cos[sel, 0].mean():10.4f} {cos[sel, 1].mean():12.4f}"
        print(f"{kind:<10} {n:>6} {total:>6} {100 * wins / total:9.2f}{extra}")
    if cos is not None:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randint(len(img), (1000,), generator=g), torch.randint(len(img), (1000,), generator=g)
        keep = a != b
        print(f"random image pairs: image cos {(img[a[keep]] * img[b[keep]]).sum(1).mean():.4f}")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
