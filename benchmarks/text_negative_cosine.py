"""Does the text side tell a caption from its perturbed negative at all? Per perturbation type, the cosine
between the global caption embeddings (`model.encode_text` of `crossmatch.load`: a dual encoder's, or a fusion
model's stage-1 head) of each caption and its negative in a negatives file.

    python benchmarks/text_negative_cosine.py RUN/checkpoints/best.pt --negatives DATA/test_negatives.jsonl
        [--data DATA] [--per-type 500]

A type whose cosine is ~1.0 is one the text tower maps onto its caption: no image embedding can then score
the two apart, and the triple accuracy of `crossmatch evaluate --negatives` sits at chance whatever the image
side knows. The hinge or contrastive gradient that would separate them is proportional to that difference
(d loss / d image = e(negative) - e(caption)), so such a type is learned slowly, if at all.
Prints one line per type (triples, mean, 5th percentile, min of the cosine) and the load average.
"""

from __future__ import annotations

import argparse
import os

import torch

import crossmatch
from crossmatch.retrieval.compositional import read_negatives


def cosine_by_type(model, tokenizer, triples, per_type: int, batch: int = 256) -> dict[str, torch.Tensor]:
    """{type: (n,) cosine of e(caption) and e(negative)} for the first `per_type` triples of each type."""
    by_type: dict[str, list] = {}
    for t in triples:
        rows = by_type.setdefault(t.type, [])
        if len(rows) < per_type:
            rows.append(t)
    out = {}
    for kind, rows in by_type.items():
        cos = []
        for i in range(0, len(rows), batch):
            part = rows[i : i + batch]
            with torch.no_grad():
                a = model.encode_text(tokenizer([t.caption for t in part]), normalize=True)  # (b, E)
                b = model.encode_text(tokenizer([t.negative for t in part]), normalize=True)  # (b, E)
            cos.append((a * b).sum(1))  # (b,)
        out[kind] = torch.cat(cos)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--negatives", required=True, help="a negatives JSONL (crossmatch evaluate --negatives)")
    ap.add_argument("--data", help="the image root (default: the run's data.root, as crossmatch evaluate --negatives)")
    ap.add_argument("--per-type", type=int, default=500, help="first N triples of each type")
    args = ap.parse_args()
    model = crossmatch.load(args.checkpoint)
    triples = read_negatives(args.negatives, args.data or model.run_config.data.root)
    cos = cosine_by_type(model, model.tokenizer, triples, args.per_type)
    print(f"{'type':<18} {'triples':>7} {'mean':>7} {'p5':>7} {'min':>7}")
    for kind in sorted(cos):
        c = cos[kind]
        print(f"{kind:<18} {len(c):>7} {c.mean():7.4f} {c.quantile(0.05):7.4f} {c.min():7.4f}")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
