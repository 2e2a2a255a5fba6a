"""What a fusion checkpoint's ITM head tells apart (issue 13), on the first N images of a split and their captions:
for each caption, its own image against a random other image, against the other image that ITC ranks highest for
it, and against its image's twin (shapes data: the same objects with swapped attributes or relations).

    python benchmarks/fusion_itm_probe.py RUN/checkpoints/best.pt [--images 100] [--split val] [data.root=DIR]

Prints the mean ITM match probability of each kind of pair, the share of pairs on the right side of 0.5, and the
pairwise accuracy P(ITM(own) > ITM(negative)) of each kind (0.5 = chance), beside ITC's pairwise accuracy against
its own hardest negative. When the dataset JSON holds exact negatives of the captions (`crossmatch data shapes`),
also ITM's pairwise accuracy P(ITM(image, caption) > ITM(image, negative)) per perturbation type and the mean
cos(fused[CLS](image, caption), fused[CLS](image, negative)): near 1.0 the fused [CLS], which ITM reads, hardly
depends on how the caption binds its words. With the wall time and the machine load.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from itm_twin_probe import cls_cosine, pairwise, split_features  # benchmarks/, the script's own folder

from crossmatch.retrieval.evaluate import encode_split
from crossmatch.runs import build_eval_data, load_run, open_split
from crossmatch.tensors import slice_features


def match_prob(model, img: dict, txt: dict, img_rows: torch.Tensor, txt_rows: torch.Tensor, batch: int = 128):
    """ITM p(match) of the row-aligned pairs (image img_rows[k], caption txt_rows[k]): (K,)."""
    out = []
    for s in range(0, len(img_rows), batch):
        i, t = img_rows[s : s + batch], txt_rows[s : s + batch]
        out.append(model.itm_logits(slice_features(img, i), slice_features(txt, t)).softmax(1)[:, 1])  # (b,)
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--split", default="val")
    ap.add_argument("--images", type=int, default=100, help="first N images of the split")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.root=/path/to/shapes")
    args = ap.parse_intermixed_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start, load = time.perf_counter(), os.getloadavg()[0]
    model, cfg, tok = load_run(args.checkpoint, args.overrides)
    data = build_eval_data(cfg, open_split(cfg, args.split).first_images(args.images), tok, model)
    with torch.no_grad():
        img, txt = encode_split(model, data, torch.device("cpu"))
        owner = data.txt_to_img  # (N_txt,)
        sim = txt["embed"] @ img["embed"].t()  # (N_txt, N_img) ITC
        N, M = sim.shape
        rows = torch.arange(N)
        own = torch.zeros_like(sim, dtype=torch.bool)
        own[rows, owner] = True
        hard = sim.masked_fill(own, float("-inf")).argmax(1)  # (N_txt,) ITC's top other image
        rand = (owner + torch.randint(1, M, (N,))) % M  # (N_txt,) a random other image
        twin_of = {a: b for a, b in data.twins} | {b: a for a, b in data.twins}
        tw = torch.tensor([t for t in range(N) if int(owner[t]) in twin_of], dtype=torch.long)
        p_pos = match_prob(model, img, txt, owner, rows)
        negs = {
            "random": match_prob(model, img, txt, rand, rows),
            "ITC-hardest": match_prob(model, img, txt, hard, rows),
        }
        if len(tw):
            twins = torch.tensor([twin_of[int(owner[t])] for t in tw])
            negs["twin"] = match_prob(model, img, txt, twins, tw)
        itc_ok = (sim[rows, owner] > sim[rows, hard]).float().mean()
    print(f"{args.split}: {M} images, {N} captions ({len(tw)} of images with a twin)")
    print(f"ITM p(match): own image {p_pos.mean():.3f} (> 0.5: {(p_pos > 0.5).float().mean():.3f})")
    for name, p in negs.items():
        pos = p_pos[tw] if name == "twin" else p_pos
        print(
            f"  {name:12s} image {p.mean():.3f} (<= 0.5: {(p <= 0.5).float().mean():.3f}); "
            f"pairwise ITM(own) > ITM({name}) {(pos > p).float().mean():.3f}"
        )
    print(f"ITC pairwise own > its hardest other image: {itc_ok:.3f}")
    img_n, owner_n, negs_n, txt_n = split_features(model, cfg, tok, args.split, args.images)
    if negs_n:
        acc = pairwise(model, img_n, owner_n, negs_n, txt_n)
        cos = cls_cosine(model, img_n, owner_n, negs_n, txt_n)
        print(
            f"exact negatives ({len(negs_n)}): pairwise ITM(caption) > ITM(negative) "
            + " ".join(f"{k} {v:.3f}" for k, v in acc.items())
            + f"; fused [CLS] cos(caption, negative) {cos:.5f}"
        )
    wall = time.perf_counter() - start
    print(f"{wall:.0f} s, load {load:.1f} -> {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
