"""Training-free baseline on a crossmatch dataset split (the Tux Paint one): EfficientNet-Lite0's ImageNet
classifier names each image (its top-k class names, weighted by their probabilities), MiniLM embeds those
names and the captions, and the cosine between them ranks captions for images and images for captions.
A trained model must beat this to have learned anything the two frozen towers did not already know.

    python benchmarks/tux_baseline.py --data data/tuxpaint --split test [--imagenet-stats]

`--imagenet-stats` normalises with ImageNet's mean/std instead of Lite0's own 0.5/0.5 (the bug of issue 16).
Prints R@1/5/10 both ways, rsum and chance R@1 (100 / images).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from crossmatch.config import DataConfig
from crossmatch.data.formats import open_split
from crossmatch.data.loaders import collate
from crossmatch.data.tokenizer import build_tokenizer
from crossmatch.data.transforms import build_image_transform, load_image
from crossmatch.metrics import retrieval_metrics
from crossmatch.models.class_prior import ClassNamePrior, embed_names, imagenet_class_names
from crossmatch.models.layers import l2norm
from crossmatch.models.pretrained import LITE0_PREPROCESS, HFTextTower, ImageTower, imagenet_classifier


@torch.no_grad()
def embed_texts(tower: HFTextTower, tokenizer, texts: list[str]) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), 128):
        b = collate([{"input_ids": ids} for ids in tokenizer.encode_batch(texts[i : i + 128])])
        out.append(l2norm(tower(b["input_ids"], b["attention_mask"])[1]))  # (b, D)
    return torch.cat(out)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/tuxpaint")
    ap.add_argument("--split", default="test")
    ap.add_argument("--top-k", type=int, default=5, help="class names per image")
    ap.add_argument("--resize", default="letterbox", help="squash | shortest | letterbox")
    ap.add_argument("--imagenet-stats", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    ds = open_split(DataConfig(root=args.data), args.split)
    pp = {**LITE0_PREPROCESS, "resize": args.resize}
    if args.imagenet_stats:
        pp |= {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    transform = build_image_transform(224, train=False, **pp)
    image_tower = ImageTower("efficientnet_lite0").eval()
    pixels = torch.stack([transform(load_image(r.path)) for r in ds.images])  # (N, 3, 224, 224)
    pooled = torch.cat([image_tower(pixels[i : i + 32]) for i in range(0, len(pixels), 32)])  # (N, 1280)
    tower, tokenizer = HFTextTower("minilm"), build_tokenizer("minilm", [], max_words=32)
    names = embed_names(lambda s: embed_texts(tower, tokenizer, s), imagenet_class_names())  # (1000, D)
    prior = ClassNamePrior(imagenet_classifier("efficientnet_lite0"), names, args.top_k)
    img = prior.scores(pooled)  # (N, D) probability-weighted names (the model's model.image_prior=class_names)
    txt = embed_texts(tower, tokenizer, ds.captions)  # (M, D)
    m = retrieval_metrics(img @ txt.t(), ds.txt_to_img)
    stats = "ImageNet mean/std" if args.imagenet_stats else "Lite0's own 0.5/0.5"
    print(json.dumps({k: round(v, 2) for k, v in m.items()}))
    print(
        f"{args.split}: {len(ds.images)} images, {len(ds.captions)} captions, {stats}, {args.resize}: "
        f"R@1 i2t {m['i2t_r1']:.1f} t2i {m['t2i_r1']:.1f} rsum {m['rsum']:.1f}, chance R@1 {100 / len(ds.images):.1f}"
        f" ({time.perf_counter() - t0:.0f} s)"
    )


if __name__ == "__main__":
    main()
