"""How often a trained model prefers a caption to its perturbed negatives (crossmatch.data.negatives), per
perturbation type, on one split: the SugarCrepe-style accuracy of (image, caption, negative) triples that
`loss.text_negatives` trains for (50 = chance for a model blind to the change).

    python benchmarks/text_negative_accuracy.py RUN/checkpoints/best.pt [--split test] [--captions 2000]

Triples: for each of the first `--captions` captions of the split, one negative of each type the perturber
can make (seed = caption index); accuracy = 100 * fraction with s(image, caption) > s(image, negative).
Prints one line per type and the load average (`os.getloadavg()`).
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict

import torch

from crossmatch.data.loaders import collate
from crossmatch.data.negatives import TYPES, candidates, pick
from crossmatch.runs import build_eval_data, load_run, open_split
from crossmatch.tasks.text_negatives import encode_negatives, paired_scores
from crossmatch.tensors import cat_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--split", default="test")
    ap.add_argument("--captions", type=int, default=2000, help="first N captions of the split")
    args = ap.parse_args()
    model, cfg, tok = load_run(args.checkpoint)
    ds = open_split(cfg, args.split)
    data = build_eval_data(cfg, ds, tok, model)
    with torch.no_grad():
        img = cat_features([model.encode_image(b) for b in data.image_loader])  # each (N_img, ...)
        rows = []  # (caption t, its negatives)
        for t in range(min(args.captions, len(ds.captions))):
            cands = candidates(ds.captions[t])
            negs = [n for kind in TYPES for n in pick([c for c in cands if c.type == kind], 1, seed=t)]  # one per type
            if negs:
                rows.append((t, negs))
        correct, total = defaultdict(int), defaultdict(int)
        for start in range(0, len(rows), 64):
            chunk = rows[start : start + 64]
            K = max(len(n) for _, n in chunk)
            items = []
            for t, negs in chunk:
                texts = [ds.captions[t]] + [n.text for n in negs] + [ds.captions[t]] * (K - len(negs))
                items.append({"input_ids": tok.encode_batch(texts)})
            ids = collate([{"input_ids": s} for it in items for s in it["input_ids"]])
            B = len(chunk)
            batch = {
                "neg_input_ids": ids["input_ids"].view(B, K + 1, -1),
                "neg_attention_mask": ids["attention_mask"].view(B, K + 1, -1),
            }
            txt = encode_negatives(model, batch)  # (B, 1+K, ...): the caption, then its negatives
            rows_img = torch.tensor([ds.txt_to_img[t] for t, _ in chunk])
            s = paired_scores(model, {k: v[rows_img] for k, v in img.items()}, txt)  # (B, 1+K)
            for b, (_, negs) in enumerate(chunk):
                for k, n in enumerate(negs):
                    total[n.type] += 1
                    correct[n.type] += int(s[b, 0] > s[b, 1 + k])
    for kind in TYPES:
        if total[kind]:
            print(f"{kind:18s} {100 * correct[kind] / total[kind]:5.1f}  ({total[kind]} triples)")
    print(f"all                {100 * sum(correct.values()) / max(1, sum(total.values())):5.1f}")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
