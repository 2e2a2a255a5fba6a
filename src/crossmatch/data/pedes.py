"""Text-based person search datasets: CUHK-PEDES (Li et al., "Person Search with Natural Language
Description", CVPR 2017), ICFG-PEDES (Ding et al., SSAN, arXiv 2107.12666) and RSTPReid (Zhu et al., DSSL,
ACM MM 2021), as distributed and as read by IRRA (Jiang & Ye, CVPR 2023).

Each is one JSON list of image records with the person identity in "id":

    CUHK-PEDES  {root}/reid_raw.json       {"file_path", "id", "captions", "split": train|val|test, ...}
    ICFG-PEDES  {root}/ICFG-PEDES.json     {"file_path", "id", "captions", "split": train|test}
    RSTPReid    {root}/data_captions.json  {"img_path", "id", "captions", "split": train|val|test}

Images lie under `{root}/imgs/` (or `data.image_dir`). ICFG-PEDES has no val split: train with
`data.val_split=test`. The image id is its path (unique); `pid` is `int(id)` as written (CUHK-PEDES ids
start at 1; evaluation only compares them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from crossmatch.config import DataConfig
from crossmatch.data.datasets import ImageCaptionDataset, dataset_from_entries, load_json
from crossmatch.data.formats import register_format
from crossmatch.errors import DataError

IMAGE_DIR = "imgs"


@dataclass(frozen=True)
class PedesSpec:
    file: str  # annotation file in the dataset root
    path_key: str  # record key of the image path (relative to imgs/)
    title: str  # the dataset's name, for messages


PEDES: dict[str, PedesSpec] = {
    "cuhk_pedes": PedesSpec("reid_raw.json", "file_path", "CUHK-PEDES"),
    "icfg_pedes": PedesSpec("ICFG-PEDES.json", "file_path", "ICFG-PEDES"),
    "rstpreid": PedesSpec("data_captions.json", "img_path", "RSTPReid"),
}


def pedes_to_entries(records: list, spec: PedesSpec, source: str | Path = "") -> list[dict]:
    """Person-search records -> canonical entries {"image", "captions", "split", "id" (= path), "pid"}.

    The other path key ("img_path" / "file_path") is accepted too, since re-packaged copies mix them.

    Raises:
        DataError: a record that is not an object, or lacks the image path or an integer "id".
    """
    if not isinstance(records, list):
        raise DataError(f"{spec.title} file {source} must hold a JSON list of image records")
    other = "img_path" if spec.path_key == "file_path" else "file_path"
    entries = []
    for n, rec in enumerate(records):
        path = rec.get(spec.path_key, rec.get(other)) if isinstance(rec, dict) else None
        if not isinstance(path, str):
            raise DataError(f"{spec.title} record {n} of {source} has no '{spec.path_key}': {str(rec)[:80]}")
        try:
            pid = int(rec["id"])
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{spec.title} record {n} ({path}) of {source} has no integer 'id'") from err
        captions = rec.get("captions", [])
        if not isinstance(captions, (str, list)):
            raise DataError(f"{spec.title} record {n} ({path}) of {source}: 'captions' must be a list of strings")
        captions = [captions] if isinstance(captions, str) else list(captions)
        entries.append({"image": path, "captions": captions, "split": rec.get("split"), "id": path, "pid": pid})
    return entries


def read_pedes(path: str | Path, fmt: str) -> list[dict]:
    """The annotation file of format `fmt` (a key of PEDES) -> canonical entries."""
    path, spec = Path(path), PEDES[fmt]
    return pedes_to_entries(load_json(path, f"{spec.title} annotation file"), spec, path)


def _reader(fmt: str):
    def read(cfg: DataConfig, split: str) -> ImageCaptionDataset:
        root = Path(cfg.root)
        path = root / (cfg.json_name or PEDES[fmt].file)
        image_dir = Path(cfg.image_dir) if cfg.image_dir else root / IMAGE_DIR
        return dataset_from_entries(read_pedes(path, fmt), split, image_dir, path, root, cfg.allow_outside_root)

    read.__doc__ = f"{PEDES[fmt].title}: {{root}}/{PEDES[fmt].file}, images under {{root}}/{IMAGE_DIR}/."
    return read


for _fmt in PEDES:
    register_format(_fmt)(_reader(_fmt))
