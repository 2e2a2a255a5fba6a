"""How often a trained model prefers a caption to its perturbed negatives (crossmatch.data.negatives), per
perturbation type, on one split: the SugarCrepe-style accuracy of (image, caption, negative) triples that
`loss.text_negatives` trains for (50 = chance for a model blind to the change).

    python benchmarks/text_negative_accuracy.py RUN/checkpoints/best.pt [--split test] [--captions 2000]

Triples: for each of the first `--captions` captions of the split, one negative of each type the perturber
can make (seed = caption index); accuracy = 100 * fraction with s(image, caption) > s(image, negative).
Scored by `crossmatch evaluate --negatives`'s own code (runs.evaluate_negatives). Prints one line per type and
the load average (`os.getloadavg()`).
"""

from __future__ import annotations

import argparse
import os

import torch

from crossmatch.data.negatives import TYPES, candidates, pick
from crossmatch.retrieval.compositional import Triple, format_accuracy_table
from crossmatch.runs import evaluate_negatives, load_run, open_split


def perturbed_triples(ds, n_captions: int) -> list[Triple]:
    """(image, caption, negative) for each of the first n captions: one negative of each type the perturber
    can make, seed = caption index ("line" = caption index + 1)."""
    out = []
    for t in range(min(n_captions, len(ds.captions))):
        cands = candidates(ds.captions[t])
        image = ds.images[ds.txt_to_img[t]].path
        for kind in TYPES:
            for n in pick([c for c in cands if c.type == kind], 1, seed=t):
                out.append(Triple(str(image), image, ds.captions[t], n.text, n.type, t + 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--split", default="test")
    ap.add_argument("--captions", type=int, default=2000, help="first N captions of the split")
    args = ap.parse_args()
    model, cfg, tok = load_run(args.checkpoint)
    triples = perturbed_triples(open_split(cfg, args.split), args.captions)
    with torch.no_grad():
        report = evaluate_negatives(cfg, model, tok, triples, torch.device("cpu"))
    print(format_accuracy_table(report))
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
