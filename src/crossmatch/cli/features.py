"""`crossmatch features CHECKPOINT_OR_TOWER --data ROOT --split S --out DIR [--kind global|grid|boxes]`:
precompute a split's image features with a frozen tower, in SCAN's precomputed-feature layout (see
`crossmatch.search.features`); under `torchrun --nproc_per_node=N` each rank embeds its share and rank 0
merges. Top-level imports stay light (no torch): this module is imported to build every command's parser.
"""

from __future__ import annotations

import argparse
import sys

from crossmatch.cli.help import add_command, add_device_option

KINDS = ("global", "grid", "boxes")  # mirrors crossmatch.search.features.KINDS, without importing torch here


def add_parsers(sub: argparse._SubParsersAction, data_sub: argparse._SubParsersAction) -> None:
    f = add_command(
        sub,
        "features",
        "precompute a split's image features with a frozen image tower",
        "crossmatch features efficientnet_lite0 --data data/shapes --split test --out feats --kind grid",
        "torchrun --nproc_per_node=2 -m crossmatch features runs/vse/checkpoints/best.pt --data data/shapes --out f",
    )
    f.add_argument("source", metavar="CHECKPOINT_OR_TOWER", help="a checkpoint, or an image tower name")
    f.add_argument("--data", required=True, help="dataset folder")
    f.add_argument("--format", default="karpathy", help="data.format of the dataset")
    f.add_argument("--split", default="test", help="split name as written in the dataset file")
    f.add_argument("--out", required=True, help="output folder")
    f.add_argument("--kind", choices=KINDS, default="global", help="global (N, C) | grid (N, h*w, C) | boxes (N, K, C)")
    f.add_argument("--image-size", type=int, default=0, help="input side (0: the checkpoint's, or 224)")
    f.add_argument("--batch-size", type=int, default=32, help="images per batch")
    add_device_option(f)
    f.add_argument("--max-boxes", type=int, default=36, help="boxes: at most this many per image")


def run(args: argparse.Namespace) -> bool:
    if args.command != "features":
        return False
    from crossmatch.engine.distributed import init_distributed
    from crossmatch.search.features import extract_features

    dist = init_distributed(args.device)  # a process group under torchrun; nothing otherwise
    info = extract_features(
        args.source,
        args.data,
        args.split,
        args.out,
        args.kind,
        image_size=args.image_size,
        batch_size=args.batch_size,
        max_boxes=args.max_boxes,
        data_format=args.format,
        progress=sys.stderr.isatty() and dist.is_main,
        device=dist.device,
    )
    if dist.is_main:
        print(features_summary(info, args.out, args.split))
    return True


def features_summary(info: dict, out: str, split: str) -> str:
    """What `features` wrote (files, shape, size) and the next step: a model trained on them."""
    from pathlib import Path

    from crossmatch.cli.demo import format_files

    folder = Path(out)
    feats = folder / info["features_file"]
    size = feats.stat().st_size / 2**20 if feats.is_file() else 0.0
    n, shape = info["shape"][0], " x ".join(str(d) for d in info["shape"])
    lines = [f"wrote the {info['kind']} features of {n} {split} images ({shape}, {size:.1f} MB) into {folder}:"]
    lines.append(
        format_files(
            [
                ("features", feats),
                ("captions", folder / info["captions_file"]),
                ("description", folder / "features.json"),
            ]
        )
    )
    if info["kind"] == "global":  # one vector per image: for other tools, not a region model
        lines.append(
            f"next: numpy.load('{feats}', mmap_mode='r') (row i: image i of the split); --kind grid or boxes "
            "writes the region features that SCAN trains on"
        )
    else:
        lines.append(
            f"next: the other splits into {folder} too (--split train, --split val), then "
            f"crossmatch train configs/scan_t2i_lse.yaml data.root={folder}"
        )
    return "\n".join(lines)
