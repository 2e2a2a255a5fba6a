"""Precompute the image features of one split with a frozen image tower, in the layout of SCAN's
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

Images go through the evaluation transform (resize to the image size; a checkpoint's own mean/std and resize
mode, ImageNet's for a tower name). The features
are the tower's own (pooled by its global pooling for `global`), not a dual encoder's projections.

Rows are written batch by batch into a resumable part (`DIR/.parts/`: run the same command again after an
interruption), then moved into place. Under `torchrun --nproc_per_node=N` each rank embeds a batch-aligned
share and rank 0 merges the parts into the same files a single process writes (crossmatch.engine.sharding).

Legend: N images, B batch, C channels, h/w feature-map height/width, K boxes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossmatch.errors import ConfigError, DataError

if TYPE_CHECKING:
    from torch import Tensor, nn

KINDS = ("global", "grid", "boxes")


def load_tower(source: str, image_size: int) -> tuple[nn.Module, str, int, dict]:
    """(frozen image tower in eval mode, its description, input side, preprocessing keywords of
    build_image_transform) from a checkpoint (its run's preprocessing) or a tower name (the tower's own)."""
    if Path(source).is_file():
        from crossmatch.data.transforms import preprocess_kwargs
        from crossmatch.models.protocols import HasImageTower
        from crossmatch.runs import load_run

        model, cfg, _ = load_run(source)
        if not isinstance(model, HasImageTower):
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
    from crossmatch.files import write_text

    counts = {len(rec.caption_ids) for rec in ds.images}
    if len(counts) == 1:
        name = f"{split}_caps.txt"
        lines = [" ".join(ds.captions[t].split()) for rec in ds.images for t in rec.caption_ids]
        write_text(out / name, "\n".join(lines) + "\n")
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
    write_text(out / name, json.dumps({"dataset": "crossmatch-features", "images": entries}))
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
    device: Any = None,
) -> dict[str, Any]:
    """Write the features of `split` of the dataset at `root` to `out` (see the module docstring); under
    torchrun, this rank's share, merged by rank 0.

    Returns:
        The features.json dict.
    """
    import hashlib

    import numpy as np
    import torch
    from torch.utils.data import Subset
    from tqdm import tqdm

    from crossmatch.config import DataConfig
    from crossmatch.data import formats
    from crossmatch.data.loaders import build_eval_loader
    from crossmatch.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_image_transform
    from crossmatch.engine.sharding import PartWriter, batch_aligned_range, part_dir
    from crossmatch.files import write_text
    from crossmatch.tensors import barrier, get_rank, get_world_size

    sizes = (("--batch-size", batch_size, 1), ("--image-size", image_size, 0), ("--max-boxes", max_boxes, 1))
    for flag, value, low in sizes:
        if value < low:
            raise ConfigError(f"{flag} {value}: must be at least {low}")
    splits = read_index(Path(out))  # a damaged index stops the command before any work
    ds = formats.open_split(DataConfig(root=root, format=data_format), split)
    tower, desc, side, preprocess = load_tower(source, image_size)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tower.to(device)
    k_boxes = _box_count(ds, max_boxes) if kind == "boxes" else 0
    view = ds.image_view(build_image_transform(side, train=False, **preprocess), k_boxes)
    out = Path(out)
    rank, world, n = get_rank(), get_world_size(), len(view)
    share = batch_aligned_range(n, batch_size, rank, world)
    stat = Path(source).stat() if Path(source).is_file() else None
    ident = f"{Path(source).resolve() if stat else source}|{stat and (stat.st_size, stat.st_mtime_ns)}|{root}|"
    key = hashlib.sha1(f"{ident}{split}|{kind}|{side}|{k_boxes}|{n}|{batch_size}|{share}".encode()).hexdigest()
    part = PartWriter(part_dir(out, f"features-{split}", rank, world), key, len(share))
    todo = Subset(view, range(share.start + part.done, share.stop))  # whole batches done: stays batch-aligned
    dtypes = {"ims": np.float16, "mask": np.bool_}
    with torch.inference_mode():
        for batch in tqdm(build_eval_loader(todo, batch_size), desc=f"features {split}", disable=not progress):
            batch = {k: v.to(device) for k, v in batch.items()}
            feats = tower_features(tower, batch, kind, side).float().cpu().numpy()  # (B, ...)
            if kind == "boxes" and feats.shape[1] < k_boxes:  # this batch's images have fewer boxes
                feats = np.pad(feats, ((0, 0), (0, k_boxes - feats.shape[1]), (0, 0)))
            rows = {"ims": feats}
            if kind == "boxes":
                m = batch["box_mask"].cpu().numpy()  # (B, K_batch)
                rows["mask"] = np.pad(m, ((0, 0), (0, k_boxes - m.shape[1])))
            part.write(rows, dtypes)
    barrier()
    feats_name, mask_name = f"{split}_ims.npy", f"{split}_ims_mask.npy" if kind == "boxes" else None
    if rank == 0:
        shape = _merge_features(out, split, n, batch_size, world, {"ims": feats_name, "mask": mask_name})
        captions_name, per_image = write_captions(ds, out, split)
        info = {
            "kind": kind,
            "shape": list(shape),
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
        write_text(out / INDEX, json.dumps({**splits, split: info}, indent=2))  # one entry per split written here
    barrier()  # the other ranks read what rank 0 wrote
    return read_index(out)[split]


INDEX = "features.json"


def read_index(out: Path) -> dict[str, dict]:
    """The `features.json` of a features folder ({} when there is none yet).

    Raises:
        DataError: the file is not a JSON object of one object per split (truncated, hand-edited), or not a
            regular file: naming it, rather than overwriting the other splits' entries.
    """
    from crossmatch.data.datasets import load_json

    path = out / INDEX
    if not path.exists() and not path.is_symlink():
        return {}
    index = load_json(path, "features index")
    if not isinstance(index, dict) or not all(isinstance(v, dict) for v in index.values()):
        expected = "expected {split: {...}}; delete it or choose another --out"
        raise DataError(f"features index {path} is damaged ({expected})")
    return index


def _merge_features(out: Path, split: str, n: int, batch_size: int, world: int, names: dict) -> tuple[int, ...]:
    """Rank 0: the ranks' parts -> `{split}_ims.npy` (+ mask); the parts are then removed. Returns the shape."""
    import shutil

    import numpy as np

    from crossmatch.engine.sharding import PARTS, batch_aligned_range, part_dir, write_npy_concat

    folders = [
        part_dir(out, f"features-{split}", r, world)
        for r in range(world)
        if len(batch_aligned_range(n, batch_size, r, world))
    ]
    shape: tuple[int, ...] = ()
    for array, name in names.items():
        if name is None:
            continue
        parts = [np.load(f / f"{array}.npy", mmap_mode="r") for f in folders]
        write_npy_concat(parts, out / name)
        shape = shape or (n, *parts[0].shape[1:])
        del parts
    for f in (out / PARTS).glob(f"features-{split}-rank*"):  # the empty shares' folders too
        shutil.rmtree(f, ignore_errors=True)
    if (out / PARTS).is_dir() and not any((out / PARTS).iterdir()):
        (out / PARTS).rmdir()
    return shape
