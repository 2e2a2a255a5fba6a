"""SCAN's precomputed-feature format (`data.format: scan_precomputed`), as released with SCAN (Lee et al.,
"Stacked Cross Attention for Image-Text Matching", ECCV 2018; kuanghuei/SCAN `data.py::PrecompDataset`) and
written by `crossmatch features`.

Files in `data.root`, per split:
- `{split}_ims.npy`: (N, R, C) region features (bottom-up attention: R = 36, C = 2048), float32 or float16,
  opened with `np.load(mmap_mode="r")`: rows are read from disk when an item is asked for, never all at once.
- `{split}_caps.txt`: one caption per line. Caption j belongs to row j // im_div, with SCAN's rule
  im_div = 5 if N != n_captions else 1. Some public test files repeat each image 5 times (N == n_captions):
  when the rows of a group of 5 are identical, each group is read as one image with its 5 captions, so
  every image is counted once in retrieval metrics (the reference evaluation keeps every 5th row likewise).
- or `{split}_karpathy.json` instead of the captions file (written by `crossmatch features` when the number
  of captions per image varies): a Karpathy-split JSON whose entries carry `"feature_row"`.

Legend: N feature rows, R regions, C feature width.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from crossmatch.config import DataConfig
from crossmatch.data.datasets import ImageRecord, first_images, read_karpathy_json, read_text
from crossmatch.data.formats import register_format
from crossmatch.errors import DataError
from crossmatch.files import open_regular

log = logging.getLogger(__name__)

CAPTIONS_PER_IMAGE = 5  # SCAN's im_div when the counts of rows and captions differ


class PrecomputedFeatures:
    """One split of SCAN's precomputed features, with the `ImageCaptionDataset` interface.

    Attributes:
        features: the (N, R, C) memory-mapped array.
        rows: (n_img,) feature row of each image.
        images: one ImageRecord per image (`path` = the .npy file, `imgid` = its feature row).
        captions, txt_to_img, img_to_txt, twins (always empty): as in `ImageCaptionDataset`.
    """

    def __init__(self, root: str | Path, split: str):
        self.root = Path(root)
        path = self.root / f"{split}_ims.npy"
        open_regular(path, "feature file").close()  # missing, a FIFO or a device: one line, never a hang
        try:
            self.features = np.load(path, mmap_mode="r")  # (N, R, C), memory-mapped
        except ValueError as err:
            raise DataError(f"cannot read {path} as a .npy array: {err}") from err
        if self.features.ndim != 3:
            raise DataError(f"{path} has shape {self.features.shape}; expected (N, regions, feature_dim)")
        if (self.root / f"{split}_ims_mask.npy").is_file():
            log.warning("%s_ims_mask.npy is ignored: SCAN scores every stored region, padded ones too", split)
        caps, json_path = self.root / f"{split}_caps.txt", self.root / f"{split}_karpathy.json"
        if caps.is_file():
            rows, groups, self.captions = self._read_caps_txt(caps)
        elif json_path.is_file():
            rows, groups, self.captions = self._read_karpathy(json_path, split)
        else:
            raise DataError(f"no captions for split {split!r}: neither {caps} nor {json_path} exists")
        self.rows = np.asarray(rows, dtype=np.int64)  # (n_img,)
        self.images = [ImageRecord(path, int(r), list(g)) for r, g in zip(rows, groups, strict=True)]
        self.txt_to_img = [0] * len(self.captions)
        for i, g in enumerate(groups):
            for t in g:
                self.txt_to_img[t] = i
        self.twins: list[tuple[int, int]] = []

    def _read_caps_txt(self, path: Path) -> tuple[list[int], list[range], list[str]]:
        """SCAN's captions file -> (feature row per image, caption ids per image, captions)."""
        captions = [line.strip() for line in read_text(path, "captions file").splitlines()]
        while captions and not captions[-1]:
            captions.pop()  # trailing blank lines
        empty = [j + 1 for j, c in enumerate(captions) if not c]
        if empty:
            raise DataError(f"{path} line {empty[0]} is an empty caption")
        n_rows, n_caps = len(self.features), len(captions)
        im_div = CAPTIONS_PER_IMAGE if n_rows != n_caps else 1  # SCAN's rule
        if im_div == 1 and self._repeated_groups():
            im_div = CAPTIONS_PER_IMAGE  # each image stored 5 times: keep one row per image
            rows = list(range(0, n_rows, CAPTIONS_PER_IMAGE))
        else:
            if n_caps != n_rows * im_div:
                raise DataError(
                    f"{path.name} has {n_caps} captions for {n_rows} feature rows: expected "
                    f"{CAPTIONS_PER_IMAGE} per row, or one per row"
                )
            rows = list(range(n_rows))
        groups = [range(i * im_div, (i + 1) * im_div) for i in range(len(rows))]
        return rows, groups, captions

    def _repeated_groups(self) -> bool:
        """True when the rows come in groups of 5 identical ones (checked on the first and last group)."""
        n, k = len(self.features), CAPTIONS_PER_IMAGE
        if n < k or n % k:
            return False
        for start in (0, n - k):
            group = np.asarray(self.features[start : start + k])  # (5, R, C): a few rows read
            if not all(np.array_equal(group[0], g) for g in group[1:]):
                return False
        return True

    def _read_karpathy(self, path: Path, split: str) -> tuple[list[int], list[range], list[str]]:
        """`{split}_karpathy.json` entries with "feature_row" -> (rows, caption ids per image, captions)."""
        rows, groups, captions = [], [], []
        for entry in read_karpathy_json(path)["images"]:
            if entry.get("split", split) != split:
                continue
            row = entry.get("feature_row")
            if not isinstance(row, int) or not 0 <= row < len(self.features):
                raise DataError(f"{path.name}: entry {str(entry)[:60]} has no valid 'feature_row'")
            sents = [s.get("raw") if isinstance(s, dict) else s for s in entry.get("sentences", [])]
            if not sents or any(not isinstance(s, str) or not s.strip() for s in sents):
                raise DataError(f"{path.name}: feature row {row} has no captions or an empty one")
            groups.append(range(len(captions), len(captions) + len(sents)))
            captions += [s.strip() for s in sents]
            rows.append(row)
        if not rows:
            raise DataError(f"{path} has no entries of split {split!r}")
        return rows, groups, captions

    @property
    def img_to_txt(self) -> list[list[int]]:
        return [r.caption_ids for r in self.images]

    def image_view(self, transform=None, max_boxes: int = 0) -> Dataset:
        """Item i: {"image": (R, C) float32 features of image i, "image_idx": i}; `transform` and `max_boxes`
        do not apply to features."""
        return FeatureView(self.features, self.rows)

    def first_images(self, n: int) -> PrecomputedFeatures:
        """The split cut to its first `n` images and their captions (see `datasets.first_images`)."""
        sub = first_images(self, n)
        if sub is not self:
            sub.rows = self.rows[: len(sub.images)]  # (n,)
        return sub

    def __repr__(self) -> str:
        shape = tuple(self.features.shape)
        return f"PrecomputedFeatures({self.root}, {len(self.images)} images {shape}, {len(self.captions)} captions)"


class FeatureView(Dataset):
    """Item i: {"image": torch (R, C) float32, "image_idx": i}, read from the memory-mapped rows."""

    def __init__(self, features: np.ndarray, rows: np.ndarray):
        self.features, self.rows = features, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        feats = np.array(self.features[self.rows[i]], dtype=np.float32)  # (R, C): one row read, copied
        return {"image": torch.from_numpy(feats), "image_idx": i}


@register_format("scan_precomputed")
def scan_precomputed(cfg: DataConfig, split: str) -> PrecomputedFeatures:
    """SCAN's `{root}/{split}_ims.npy` + `{split}_caps.txt` (or `{split}_karpathy.json`)."""
    return PrecomputedFeatures(cfg.root, split)
