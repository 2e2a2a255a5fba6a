"""Which stage-2 score makes an ALBEF-family re-ranking pay (issue 13)? One ITM pass over the pairs of the ITC top-k,
then the same candidates ranked by several scores built from the ITM logits and the ITC cosine, each measured on
the first N images of a split with the library's two-stage merge (`crossmatch.retrieval.rerank`):

- `itc`: no re-ranking (stage 1 alone);
- `itm`: the ITM match logit, ALBEF's score (`model.rerank_score=itm`, what `crossmatch evaluate ...
  eval.rerank_k=K` ranks by);
- `itm+cos`: the match logit plus the ITC cosine, BLIP's (`model.rerank_score=itm+itc`);
- `logp+cos/t`: ITM log p(match) plus the ITC cosine over the learned temperature (the two softmaxes multiplied);
- `diff+cos/t`: the ITM logit difference (match minus no-match) plus the cosine over the temperature.

    python benchmarks/rerank_scores.py RUN/checkpoints/best.pt [--k 16] [--images 0] [--split test]
        [--threads 2] [data.root=DIR]

Prints a row per score (i2t / t2i R@1, rsum, twin_acc), the number of re-scored pairs, the wall time of the ITM
pass and the machine load. Scores are chunked and batched as `crossmatch evaluate` does them (eval.chunk_size,
eval.rerank_batch), so the `itc` and `itm` rows are its figures at eval.rerank_k=0 and =K.

Legend: P candidate pairs, N_img images, N_txt captions.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import Tensor

from crossmatch.retrieval.evaluate import EvalData, encode_split, score_all_pairs, split_metrics
from crossmatch.retrieval.rerank import below_candidates, candidate_pairs, topk_masks
from crossmatch.runs import build_eval_data, load_run, open_split
from crossmatch.tensors import slice_features


def stage2_scores(logits: Tensor, cos: Tensor, temp: float) -> dict[str, Tensor]:
    """The stage-2 scores compared: ITM logits (P, 2) (index 1 = match), ITC cosines (P,) -> name: (P,)."""
    match, diff = logits[:, 1], logits[:, 1] - logits[:, 0]
    return {
        "itm": match,
        "itm+cos": match + cos,
        "logp+cos/t": torch.log_softmax(logits, -1)[:, 1] + cos / temp,
        "diff+cos/t": diff + cos / temp,
    }


@torch.no_grad()
def itm_logits(model, img: dict, txt: dict, pairs: Tensor, batch: int) -> Tensor:
    """ITM logits of the (image, caption) index pairs (P, 2), `batch` pairs per call, in the order (and so the
    batches) of the library's `rerank`: (P, 2)."""
    out = [torch.zeros(0, 2)]
    for start in range(0, len(pairs), batch):
        i, t = pairs[start : start + batch].unbind(1)
        out.append(model.itm_logits(slice_features(img, i), slice_features(txt, t)).float())
    return torch.cat(out)


@torch.no_grad()
def score_rows(model, data: EvalData, k: int, chunk_size: int, batch: int) -> tuple[int, dict[str, dict[str, float]]]:
    """(P, the metrics of every stage-2 score and of `itc`): the ITC top-k of each query re-scored once by ITM,
    with the chunking and pair batches of `crossmatch evaluate` (eval.chunk_size, eval.rerank_batch)."""
    img, txt = encode_split(model, data, torch.device("cpu"))
    model.eval()
    itc = score_all_pairs(model, img, txt, chunk_size)  # (N_img, N_txt) cosines
    in_i2t, in_t2i = topk_masks(itc, k)  # (N_img, N_txt) each
    pairs = candidate_pairs(in_i2t, in_t2i)  # (P, 2)
    logits = itm_logits(model, img, txt, pairs, batch)  # (P, 2)
    rows = {"itc": split_metrics(itc, itc, data.txt_to_img, data.twins)}
    for name, score in stage2_scores(logits, itc[pairs[:, 0], pairs[:, 1]], model.temp.item()).items():
        full = torch.zeros_like(itc)
        full[pairs[:, 0], pairs[:, 1]] = score
        s_i2t, s_t2i = below_candidates(full, itc, in_i2t), below_candidates(full, itc, in_t2i)
        rows[name] = split_metrics(s_i2t, s_t2i, data.txt_to_img, data.twins)
    return len(pairs), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--split", default="test")
    ap.add_argument("--images", type=int, default=0, help="first N images of the split (0: all)")
    ap.add_argument("--k", type=int, default=16, help="ITC candidates re-scored per query, each direction")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.root=/path/to/shapes")
    args = ap.parse_intermixed_args()
    torch.set_num_threads(args.threads)
    model, cfg, tokenizer = load_run(args.checkpoint, args.overrides)
    data = build_eval_data(cfg, open_split(cfg, args.split).first_images(args.images), tokenizer, model)
    start, load = time.perf_counter(), os.getloadavg()[0]
    n_pairs, rows = score_rows(model, data, args.k, cfg.eval.chunk_size, cfg.eval.rerank_batch)
    print(
        f"{n_pairs} pairs of the ITC top-{args.k}, {time.perf_counter() - start:.0f} s, temperature"
        f" {model.temp.item():.4f}, load {load:.1f} -> {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    for name, m in rows.items():
        twin = f" twin_acc {m['twin_acc']:.1f}" if "twin_acc" in m else ""
        print(f"{name:11s} i2t R@1 {m['i2t_r1']:.1f} t2i R@1 {m['t2i_r1']:.1f} rsum {m['rsum']:.1f}{twin}", flush=True)


if __name__ == "__main__":
    main()
