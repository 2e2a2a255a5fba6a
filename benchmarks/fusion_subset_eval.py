"""Two-stage retrieval of a fusion checkpoint on the first N images of a split, for each re-ranking depth k.

Re-ranking with a width-384 fusion model (albef_minilm, vilt_minilm) costs one pass through its fusion layers
per candidate pair: ~85k pairs for the top-16 of the 1000 x 5000 shapes test split, hours on a shared 2-core
CPU. This script evaluates the split's first N images and their captions (the cut `eval.max_images` makes for
validation: twin pairs are kept when both images remain) with the same Evaluator as `crossmatch evaluate`, and
prints the metrics of every k, the wall time of each and the machine load.

    python benchmarks/fusion_subset_eval.py RUN/checkpoints/best.pt --images 100 --rerank-k 0 16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch

from crossmatch.files import write_text
from crossmatch.runs import load_run, make_evaluator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--split", default="test")
    ap.add_argument("--images", type=int, default=100, help="first N images of the split (0: all)")
    ap.add_argument("--rerank-k", type=int, nargs="+", default=[0, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="", help="also write the metrics of every k here")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.root=/path/to/shapes")
    args = ap.parse_intermixed_args()
    torch.set_num_threads(args.threads)
    model, cfg, tokenizer = load_run(args.checkpoint, args.overrides)
    out = {}
    for k in args.rerank_k:
        run_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, rerank_k=k))
        evaluator = make_evaluator(run_cfg, args.split, tokenizer, model, torch.device("cpu"), max_images=args.images)
        start, load = time.perf_counter(), os.getloadavg()[0]
        metrics = evaluator(model)
        wall = time.perf_counter() - start
        out[k] = {**metrics, "wall_s": wall, "load_start": load, "load_end": os.getloadavg()[0]}
        keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "twin_acc")
        shown = " ".join(f"{key}={metrics[key]:.1f}" for key in keys if key in metrics)
        print(f"rerank_k={k}: {shown}  ({wall:.0f} s, load {load:.1f} -> {os.getloadavg()[0]:.1f})", flush=True)
    if args.json:
        write_text(args.json, json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
