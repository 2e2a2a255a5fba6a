"""Can a fusion model's ITM head learn binding when it is shown binding directly (issue 13)? From an ALBEF-family
checkpoint, the unimodal halves are frozen and their features computed once (image tokens of the first N train
and val images, text-half tokens of their captions and of each caption's exact negatives from the dataset JSON);
then only the fusion encoder and the ITM head (and pooler) train, on balanced pairs: (image, own caption) -> 1,
(image, an exact negative of that caption) -> 0, (another image, the caption) -> 0. Every `--eval-every` steps it
prints the held-out pairwise accuracy P(ITM(image, caption) > ITM(image, negative)) on the val captions'
negatives, per perturbation type (0.5 = chance).

    python benchmarks/itm_twin_probe.py CKPT [--train-images 2000] [--val-images 200] [--steps 300] [--lr 3e-4]
        [--start checkpoint|init|random] [--eval-every 100] [--threads 2] [data.root=DIR] [model.KEY=VALUE ...]

`--start` says where the trained part starts: `checkpoint` (its trained fusion half, the default), `init` (the
fusion half as the model starts training: for `albef_minilm` MiniLM's layers 3-5 with new cross-attention and
BERT's pooler, built again from the run's config) or `random` (`--fresh`: every layer re-initialised, the same
architecture without the pretrained fusion half). Each report also gives how far the fused [CLS] moves when the
caption is replaced by its negative, the image kept: cos(fused[CLS](image, caption), fused[CLS](image, negative))
(1.0 = the fused [CLS] cannot tell them apart, whatever the ITM head does).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from crossmatch.data.loaders import pad_sequences
from crossmatch.models.fusion_pretrained import ImageTokens
from crossmatch.retrieval.evaluate import encode_split
from crossmatch.runs import build_eval_data, build_model, load_run, open_split
from crossmatch.tensors import slice_features

TRAINED = ("fusion_encoder.", "itm_pooler.", "itm_head.")


def split_features(model, cfg, tok, split: str, n: int) -> tuple[dict, list[int], list[tuple[int, int, str]], dict]:
    """Image features of the first n images of `split`; each caption's owner row; the exact negatives as
    (caption row, negative row, type); the text features of the captions and then of the negatives."""
    data = build_eval_data(cfg, open_split(cfg, split).first_images(n), tok, model)
    with torch.no_grad():
        img, _ = encode_split(model, data, torch.device("cpu"))
    entries = [im for im in json.loads((Path(cfg.data.root) / "dataset.json").read_text())["images"]]
    entries = [im for im in entries if im["split"] == split][:n]
    raws, owner, negs, neg_raws = [], [], [], []
    for row, im in enumerate(entries):
        for sent in im["sentences"]:
            for neg in sent.get("negatives", []):
                negs.append((len(raws), len(neg_raws), neg["type"]))
                neg_raws.append(neg["raw"])
            raws.append(sent["raw"])
            owner.append(row)
    both = text_features(model, tok, raws + neg_raws)  # one padded length L for captions and negatives
    captions = {k: v[: len(raws)] for k, v in both.items()}
    negatives = {k: v[len(raws) :] for k, v in both.items()}
    return img, owner, negs, {"cap": captions, "neg": negatives}


@torch.no_grad()
def text_features(model, tok, raws: list[str], batch: int = 256) -> dict:
    """The text half's tokens (N, L, D) and mask (N, L) of the captions, padded to one length L."""
    ids, mask = pad_sequences([tok.encode(r) for r in raws])
    out = [model.encode_text_features({"input_ids": ids[s : s + batch], "attention_mask": mask[s : s + batch]}) for s in
           range(0, len(raws), batch)]  # fmt: skip
    return {k: torch.cat([o[k] for o in out]) for k in ("tokens", "mask")}


def rows(feats: dict, idx: torch.Tensor) -> dict:
    return slice_features({k: feats[k] for k in ("tokens", "mask")}, idx)


@torch.no_grad()
def pairwise(model, img: dict, owner: list[int], negs: list, txt: dict, batch: int = 128) -> dict[str, float]:
    """P(ITM(image, caption) > ITM(image, its negative)), ties half, over all negatives and per type."""
    model.eval()
    cap = torch.tensor([c for c, _, _ in negs])
    neg = torch.tensor([n for _, n, _ in negs])
    own = torch.tensor(owner)[cap]
    wins = []
    for s in range(0, len(negs), batch):
        i = own[s : s + batch]
        pos = model.itm_logits(rows(img, i), rows(txt["cap"], cap[s : s + batch]))[:, 1]
        bad = model.itm_logits(rows(img, i), rows(txt["neg"], neg[s : s + batch]))[:, 1]
        wins.append((pos > bad).float() + 0.5 * (pos == bad).float())  # a tie is half a win
    win = torch.cat(wins)
    types = [t for _, _, t in negs]
    out = {"all": win.mean().item()}
    for t in sorted(set(types)):
        out[t] = win[torch.tensor([x == t for x in types])].mean().item()
    return out


@torch.no_grad()
def cls_cosine(model, img: dict, owner: list[int], negs: list, txt: dict, n: int = 256) -> float:
    """Mean cos(fused[CLS](image, caption), fused[CLS](image, negative)) over the first n negatives."""
    model.eval()
    cap = torch.tensor([c for c, _, _ in negs[:n]])
    neg = torch.tensor([m for _, m, _ in negs[:n]])
    i = rows(img, torch.tensor(owner)[cap])
    a = model.fuse(i, txt["cap"]["tokens"][cap], txt["cap"]["mask"][cap])[:, 0]  # (n, D)
    b = model.fuse(i, txt["neg"]["tokens"][neg], txt["neg"]["mask"][neg])[:, 0]  # (n, D)
    return F.cosine_similarity(a, b, dim=1).mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--train-images", type=int, default=2000)
    ap.add_argument("--val-images", type=int, default=200)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32, help="captions per step (3 pairs each)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument(
        "--start",
        choices=("checkpoint", "init", "random"),
        default="checkpoint",
        help="the trained part starts as the checkpoint's, as the model starts training, or random",
    )
    ap.add_argument("--fresh", dest="start", action="store_const", const="random", help="= --start random")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.root=/path/to/shapes")
    args = ap.parse_intermixed_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start, load = time.perf_counter(), os.getloadavg()[0]
    model, cfg, tok = load_run(args.checkpoint, args.overrides)  # in eval mode: the features carry no dropout
    cells = model.visual_encoder if isinstance(model.visual_encoder, ImageTokens) else None  # albef_minilm
    content: list[float] = []  # mean norm of the projected cells, per batch (what the learned positions add to)
    if cells is not None:
        hook = cells.proj.register_forward_hook(lambda m, i, out: content.append(out[:, 1:].norm(dim=-1).mean().item()))
    tr_img, tr_owner, tr_negs, tr_txt = split_features(model, cfg, tok, "train", args.train_images)
    va_img, va_owner, va_negs, va_txt = split_features(model, cfg, tok, "val", args.val_images)
    if cells is not None:
        hook.remove()
        pos = cells.pos[0, 1:].norm(dim=-1).mean().item()
        print(f"image tokens: learned cell positions of mean norm {pos:.2f} added to projected cells of mean norm "
              f"{sum(content) / len(content):.2f} (model.image_pos_init={model.config.image_pos_init})")  # fmt: skip
    print(f"features: {len(tr_owner)} train captions with {len(tr_negs)} negatives, {len(va_negs)} val negatives;"
          f" {time.perf_counter() - start:.0f} s, load {load:.1f}", flush=True)  # fmt: skip
    if args.start == "random":
        fresh = [m for name, m in model.named_modules() if name.startswith(TRAINED) or name + "." in TRAINED]
        for m in fresh:
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    elif args.start == "init":  # the same tensors as a new training run would start them (pretrained + new)
        start_model, _ = build_model(cfg, tok, load_weights=True)
        init = {k: v for k, v in start_model.state_dict().items() if k.startswith(TRAINED)}
        model.load_state_dict(init, strict=False)
    params = [p for n, p in model.named_parameters() if n.startswith(TRAINED)]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.02)

    def report(step: int) -> None:
        acc = pairwise(model, va_img, va_owner, va_negs, va_txt)
        per = " ".join(f"{k} {v:.3f}" for k, v in acc.items())
        cos = cls_cosine(model, va_img, va_owner, va_negs, va_txt)
        print(f"step {step}: val pairwise {per}; fused [CLS] cos(caption, negative) {cos:.5f}"
              f" ({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip

    report(0)
    negs_of: dict[int, list[int]] = {}
    for c, n, _ in tr_negs:
        negs_of.setdefault(c, []).append(n)
    captions, rng, B = sorted(negs_of), random.Random(0), args.batch
    n_img = len(tr_img["tokens"])
    labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long()  # (3B,)
    weight = torch.cat([torch.ones(B), torch.full((2 * B,), 0.5)])  # positives and negatives weigh the same
    for step in range(1, args.steps + 1):
        model.train()
        cap = torch.tensor(rng.sample(captions, B))  # (B,)
        neg = torch.tensor([rng.choice(negs_of[c]) for c in cap.tolist()])  # (B,)
        own = torch.tensor(tr_owner)[cap]
        other = (own + torch.randint(1, n_img, (B,))) % n_img  # (B,) another image
        txt = {k: torch.cat([tr_txt["cap"][k][cap], tr_txt["neg"][k][neg], tr_txt["cap"][k][cap]]) for k in
               ("tokens", "mask")}  # fmt: skip
        logits = model.itm_logits(rows(tr_img, torch.cat([own, own, other])), txt)  # (3B, 2)
        loss = (F.cross_entropy(logits, labels, reduction="none") * weight).sum() / weight.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            print(f"step {step}: train loss {loss.item():.3f}", flush=True)
            report(step)


if __name__ == "__main__":
    main()
