"""5-fold cross-validation of the `vse_pretrained` heads on a split (the Tux Paint train split), with and without
the class-name prior (`model.image_prior: class_names`), after a short and a full cosine schedule.

The towers are frozen, so the recipe trains only the two projections (and the temperature) on fixed features:
this script computes those features once through the model's own towers and prior, then trains the heads as
the recipe does (InfoNCE, Adam, lr 5e-4, cosine, batch 64, E = 1024, grad clip 2) on 4/5 of the pairs and
scores the held-out fifth (the last epoch; nothing is selected on it). It answers, without touching the test
split, whether the prior helps and whether the end of the schedule generalises better than an early epoch.

    OMP_NUM_THREADS=1 python benchmarks/tux_prior_cv.py --data data/tuxpaint [--split train] [--epochs 4 20]

(One thread: the heads are small, and on a shared 2-core machine two spinning threads on one free core made
the same run about 10x slower.)

Prints, per variant and epoch count, the mean over the folds of i2t / t2i R@1 and rsum.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from crossmatch.config import DataConfig
from crossmatch.data.formats import open_split
from crossmatch.data.loaders import pad_sequences
from crossmatch.data.tokenizer import build_tokenizer
from crossmatch.data.transforms import build_image_transform, load_image
from crossmatch.metrics import retrieval_metrics
from crossmatch.models.pretrained import LITE0_PREPROCESS, PretrainedDualConfig, PretrainedDualEncoder


@torch.no_grad()
def features(root: str, split: str) -> dict[str, torch.Tensor]:
    """Pooled image features (N, 1280), their class-name prior (N, 384) and caption embeddings (M, 384)."""
    ds = open_split(DataConfig(root=root), split)
    model = PretrainedDualEncoder(PretrainedDualConfig(image_prior="class_names")).eval()
    transform = build_image_transform(224, train=False, **{**LITE0_PREPROCESS, "resize": "letterbox"})
    pooled = torch.cat(
        [
            model.image_tower(torch.stack([transform(load_image(r.path)) for r in ds.images[i : i + 32]]))
            for i in range(0, len(ds.images), 32)
        ]
    )  # (N, 1280)
    tokenizer = build_tokenizer("minilm", [], max_words=32)
    ids, mask = pad_sequences(tokenizer.encode_batch(ds.captions))  # (M, L)
    text = torch.cat([model.text_tower(ids[i : i + 128], mask[i : i + 128])[1] for i in range(0, len(ids), 128)])
    return {"pooled": pooled, "prior": model.prior(pooled), "text": text, "owner": torch.tensor(ds.txt_to_img)}


def train_heads(img: torch.Tensor, txt: torch.Tensor, epochs: int, seed: int) -> tuple[torch.nn.Module, ...]:
    """img (n, C), txt (n, D), row i a pair -> the trained image and text projections and the log-scale."""
    torch.manual_seed(seed)
    ip, tp = torch.nn.Linear(img.shape[1], 1024), torch.nn.Linear(txt.shape[1], 1024)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*ip.parameters(), *tp.parameters(), log_scale]
    opt = torch.optim.Adam(params, lr=5e-4)
    steps = len(img) // 64
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps)
    for _ in range(epochs):
        perm = torch.randperm(len(img))
        for b in range(steps):
            idx = perm[b * 64 : (b + 1) * 64]
            zi, zt = F.normalize(ip(img[idx]), dim=-1), F.normalize(tp(txt[idx]), dim=-1)  # (64, E)
            logits = log_scale.exp().clamp(max=100) * zi @ zt.T  # (64, 64)
            labels = torch.arange(len(idx))
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 2.0)
            opt.step()
            sched.step()
    return ip, tp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/tuxpaint")
    ap.add_argument("--split", default="train")
    ap.add_argument("--epochs", type=int, nargs="+", default=[4, 20])
    ap.add_argument("--folds", type=int, default=5)
    args = ap.parse_args()
    t0 = time.perf_counter()
    f = features(args.data, args.split)
    pairs = len(f["text"])  # one pair per caption; its image is f["owner"][t]
    order = torch.randperm(pairs, generator=torch.Generator().manual_seed(0))
    variants = {"pooled": f["pooled"], "pooled + class-name prior": torch.cat([f["pooled"], f["prior"]], 1)}
    for name, img in variants.items():
        for epochs in args.epochs:
            scores = []
            for k in range(args.folds):
                held = order[k :: args.folds]
                keep = torch.tensor(sorted(set(range(pairs)) - set(held.tolist())))
                ip, tp = train_heads(img[f["owner"][keep]], f["text"][keep], epochs, seed=k)
                with torch.no_grad():  # the held-out pairs, each caption against the held-out pairs' images
                    zi = F.normalize(ip(img[f["owner"][held]]), dim=-1)
                    zt = F.normalize(tp(f["text"][held]), dim=-1)
                m = retrieval_metrics(zi @ zt.T, list(range(len(held))))
                scores.append([m["i2t_r1"], m["t2i_r1"], m["rsum"]])
            i2t, t2i, rsum = torch.tensor(scores).mean(0).tolist()
            print(f"{name}, {epochs} epochs: held-out R@1 i2t {i2t:.1f} t2i {t2i:.1f} rsum {rsum:.1f}", flush=True)
    print(f"{args.split}: {pairs} pairs, {args.folds} folds ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
