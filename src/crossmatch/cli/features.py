"""`crossmatch features CHECKPOINT_OR_TOWER --data ROOT --split S --out DIR [--kind global|grid|boxes]`:
precompute the image features of one split with a frozen image tower, in the layout of SCAN's
precomputed-feature files (kuanghuei/SCAN: `{split}_ims.npy` + `{split}_caps.txt`).

Outputs in DIR (rows in the split's image order):
- `{split}_ims.npy`: float16, memory-mapped and written batch by batch. global (N, C); grid (N, h*w, C),
  cells in row-major order; boxes (N, K, C), each record box pooled from the feature map with
  `pool_boxes`, padded with zeros to K = the most boxes of any image (capped by --max-boxes).
- `{split}_ims_mask.npy` (boxes only): (N, K) bool, True on real boxes.
- `{split}_caps.txt`: the captions, image by image, one per line, when every image has the same number k
  of captions (caption j belongs to row j // k, as SCAN reads it). Otherwise `{split}_karpathy.json`:
  a Karpathy-split JSON whose entry i (with "feature_row": i) lists the captions of row i.
- `features.json`: {split: {kind, shape, dtype, tower, image_size, captions_file, captions_per_image, ...}}.

Images go through the evaluation transform (resize to --image-size; a checkpoint's own mean/std and resize
mode, ImageNet's for a tower name). The features
are the tower's own (pooled by its global pooling for `global`), not a dual encoder's projections.

Legend: N images, B batch, C channels, h/w feature-map height/width, K boxes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossmatch.cli.help import add_command, add_device_option

if TYPE_CHECKING:
    from torch import Tensor, nn

KINDS = ("global", "grid", "boxes")


def add_parsers(sub: argparse._SubParsersAction, data_sub: argparse._SubParsersAction) -> None:
    f = add_command(
        sub,
        "features",
        "precompute a split's image features with a frozen image tower",
        "crossmatch features efficientnet_lite0 --data data/shapes --split test --out feats --kind grid",
        "crossmatch features runs/vse/checkpoints/best.pt --data data/shapes --split train --out feats",
    )
    f.add_argument("source", metavar="CHECKPOINT_OR_TOWER", help="a checkpoint, or an image tower name")
    f.add_argument("--data", required=True, help="dataset folder")
    f.add_argument("--format", default="karpathy", help="data.format of the dataset (default karpathy)")
    f.add_argument("--split", default="test", help="split name as written in the dataset file (default test)")
    f.add_argument("--out", required=True, help="output folder")
    f.add_argument("--kind", choices=KINDS, default="global", help="global (N, C) | grid (N, h*w, C) | boxes (N, K, C)")
    f.add_argument("--image-size", type=int, default=0, help="input side (default: the checkpoint's, or 224)")
    f.add_argument("--batch-size", type=int, default=32, help="images per batch")
    add_device_option(f)
    f.add_argument("--max-boxes", type=int, default=36, help="boxes: at most this many per image (default 36)")


def run(args: argparse.Namespace) -> bool:
    if args.command != "features":
        return False
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
        progress=sys.stderr.isatty(),
        device=args.device,
    )
    print(f"wrote {info['features_file']} {tuple(info['shape'])} and {info['captions_file']} in {args.out}")
    return True


def load_tower(source: str, image_size: int) -> tuple[nn.Module, str, int, dict]:
    """(frozen image tower in eval mode, its description, input side, preprocessing keywords of
    build_image_transform) from a checkpoint (its run's preprocessing) or a tower name (the tower's own)."""
    if Path(source).is_file():
        from crossmatch.data.transforms import preprocess_kwargs
        from crossmatch.runs import load_run

        model, cfg, _ = load_run(source)
        if not hasattr(model, "image_tower"):
            from crossmatch.errors import ModelError

            raise ModelError(f"{source}: model {cfg.model['name']} has no image_tower")
        tower, desc, side = model.image_tower, f"{cfg.model['name']} ({source})", image_size or cfg.data.image_size
        preprocess = preprocess_kwargs(cfg.data)
    else:
        from crossmatch.models.pretrained import ImageTower

        tower, desc = ImageTower(source, pretrained=True, freeze=True), source
        side = image_size or tower.preprocess.get("size", tower.preprocess["native_size"])
        preprocess = {k: v for k, v in tower.preprocess.items() if k in ("mean", "std", "resize", "interpolation")}
    for p in tower.parameters():
        p.requires_grad_(False)
    return tower.eval(), desc, side, preprocess


def tower_features(tower: nn.Module, batch: dict[str, Tensor], kind: str, image_size: int) -> Tensor:
    """One batch through the tower: global (B, C), grid (B, h*w, C) or boxes (B, K, C)."""
    from crossmatch.models.layers import feature_map_to_regions, pool_boxes

    image = batch["image"]  # (B, 3, S, S)
    fmap = tower.feature_map(image) if hasattr(tower, "feature_map") else tower(image)  # (B, C, h, w)
    if kind == "global":
        return tower.pool(fmap) if hasattr(tower, "pool") else fmap.mean((2, 3))  # (B, C)
    if kind == "grid":
        return feature_map_to_regions(fmap)  # (B, h*w, C)
    feats = pool_boxes(fmap, batch["boxes"], image_size)  # (B, K, C)
    return feats * batch["box_mask"].unsqueeze(-1).to(feats.dtype)  # padded boxes are zeros


def write_captions(ds: Any, out: Path, split: str) -> tuple[str, int | None]:
    """`{split}_caps.txt` (k per image) or `{split}_karpathy.json` when the count varies. Returns
    (file name, k or None)."""
    counts = {len(rec.caption_ids) for rec in ds.images}
    if len(counts) == 1:
        name = f"{split}_caps.txt"
        lines = [" ".join(ds.captions[t].split()) for rec in ds.images for t in rec.caption_ids]
        (out / name).write_text("\n".join(lines) + "\n")
        return name, counts.pop()
    name = f"{split}_karpathy.json"
    entries = [
        {
            "filename": rec.path.name,
            "imgid": rec.imgid,
            "split": split,
            "feature_row": i,
            "sentences": [{"raw": ds.captions[t], "tokens": ds.captions[t].split()} for t in rec.caption_ids],
        }
        for i, rec in enumerate(ds.images)
    ]
    (out / name).write_text(json.dumps({"dataset": "crossmatch-features", "images": entries}))
    return name, None


def _box_count(ds: Any, max_boxes: int) -> int:
    from crossmatch.errors import DataError

    k = min(max_boxes, max((len(rec.boxes or []) for rec in ds.images), default=0))
    if k == 0:
        raise DataError("--kind boxes: no image of the split has boxes in the dataset file")
    return k


def extract_features(
    source: str,
    root: str,
    split: str,
    out: str | Path,
    kind: str = "global",
    *,
    image_size: int = 0,
    batch_size: int = 32,
    max_boxes: int = 36,
    data_format: str = "karpathy",
    progress: bool = False,
    device: str = "auto",
) -> dict[str, Any]:
    """Write the features of `split` of the dataset at `root` to `out` (see the module docstring).

    Returns:
        The features.json dict.
    """
    import numpy as np
    import torch
    from tqdm import tqdm

    from crossmatch.config import DataConfig
    from crossmatch.data import formats
    from crossmatch.data.loaders import build_eval_loader
    from crossmatch.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_image_transform

    ds = formats.open_split(DataConfig(root=root, format=data_format), split)
    tower, desc, side, preprocess = load_tower(source, image_size)
    from crossmatch.engine.distributed import resolve_device

    device = resolve_device(device)
    tower.to(device)
    k_boxes = _box_count(ds, max_boxes) if kind == "boxes" else 0
    view = ds.image_view(build_image_transform(side, train=False, **preprocess), k_boxes)
    loader = build_eval_loader(view, batch_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    feats_name, mask_name = f"{split}_ims.npy", f"{split}_ims_mask.npy" if kind == "boxes" else None
    array = mask = None
    n, row = len(view), 0
    with torch.inference_mode():
        for batch in tqdm(loader, desc=f"features {split}", disable=not progress, leave=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            feats = tower_features(tower, batch, kind, side).float().cpu().numpy()  # (B, ...)
            if kind == "boxes" and feats.shape[1] < k_boxes:  # this batch's images have fewer boxes
                feats = np.pad(feats, ((0, 0), (0, k_boxes - feats.shape[1]), (0, 0)))
            if array is None:  # the shape is known after the first batch
                array = np.lib.format.open_memmap(out / feats_name, "w+", np.float16, (n, *feats.shape[1:]))
                if mask_name:
                    mask = np.lib.format.open_memmap(out / mask_name, "w+", np.bool_, (n, k_boxes))
            array[row : row + len(feats)] = feats
            if mask is not None:
                m = batch["box_mask"].cpu().numpy()  # (B, K_batch)
                mask[row : row + len(feats)] = np.pad(m, ((0, 0), (0, k_boxes - m.shape[1])))
            row += len(feats)
    array.flush()
    if mask is not None:
        mask.flush()
    captions_name, per_image = write_captions(ds, out, split)
    info = {
        "kind": kind,
        "shape": list(array.shape),
        "dtype": "float16",
        "tower": desc,
        "image_size": side,
        "normalisation": {
            "mean": list(preprocess.get("mean", IMAGENET_MEAN)),
            "std": list(preprocess.get("std", IMAGENET_STD)),
        },
        "split": split,
        "features_file": feats_name,
        "mask_file": mask_name,
        "captions_file": captions_name,
        "captions_per_image": per_image,
        "n_captions": len(ds.captions),
    }
    index = out / "features.json"  # one entry per split written to this folder
    splits = json.loads(index.read_text()) if index.is_file() else {}
    index.write_text(json.dumps({**splits, split: info}, indent=2))
    return info
