"""Text-based person search datasets: CUHK-PEDES (Li et al., "Person Search with Natural Language
Description", CVPR 2017), ICFG-PEDES (Ding et al., SSAN, arXiv 2107.12666) and RSTPReid (Zhu et al., DSSL,
ACM MM 2021), as distributed and as read by IRRA (Jiang & Ye, CVPR 2023).

Each is one JSON list of image records with the person identity in "id":

    CUHK-PEDES  {root}/reid_raw.json       {"file_path", "id", "captions", "split": train|val|test, ...}
    ICFG-PEDES  {root}/ICFG-PEDES.json     {"file_path", "id", "captions", "split": train|test}
    RSTPReid    {root}/data_captions.json  {"img_path", "id", "captions", "split": train|val|test}

A record may name a *twin* identity in "twin_pid" (an integer: `crossmatch data people` writes it for
identity pairs that differ in one detail); the split then lists its twin identity pairs in `twin_pids` and
evaluation reports twin accuracy by identity.

Images lie under `{root}/imgs/` (or `data.image_dir`). ICFG-PEDES has no val split: train with
`data.val_split=test`. The image id is its path (unique); `pid` is the record's integer "id" (CUHK-PEDES ids
start at 1; evaluation only compares them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from crossmatch.config import DataConfig
from crossmatch.data.datasets import ImageCaptionDataset, check_entry, dataset_from_entries, load_json
from crossmatch.data.formats import register_format
from crossmatch.errors import DataError
from crossmatch.files import MAX_ANNOTATION_BYTES

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
    """Person-search records -> canonical entries {"image", "captions", "split", "id" (= path), "pid",
    "twin_pid"?}.

    The other path key ("img_path" / "file_path") is accepted too, since re-packaged copies mix them.

    Raises:
        DataError: a record that is not an object, or lacks the image path or an integer "id" (a string,
            a float or a list is refused, as `check_entry` refuses such a "pid" in every format).
    """
    if not isinstance(records, list):
        raise DataError(f"{spec.title} file {source} must hold a JSON list of image records")
    other = "img_path" if spec.path_key == "file_path" else "file_path"
    entries = []
    for n, rec in enumerate(records):
        path = rec.get(spec.path_key, rec.get(other)) if isinstance(rec, dict) else None
        if not isinstance(path, str):
            raise DataError(f"{spec.title} record {n} of {source} has no '{spec.path_key}': {str(rec)[:80]}")
        where = f"{spec.title} record {n} ({path}) of {source}"
        if "id" not in rec:
            raise DataError(f"{where} has no integer 'id' (the person identity)")
        captions = rec.get("captions", [])
        if not isinstance(captions, (str, list)):
            raise DataError(f"{where}: 'captions' must be a list of strings")
        captions = [captions] if isinstance(captions, str) else list(captions)
        entry = {"image": path, "captions": captions, "split": rec.get("split"), "id": path, "pid": rec["id"]}
        if "twin_pid" in rec:
            entry["twin_pid"] = rec["twin_pid"]
        check_entry(entry, where, pid_key="id")
        entries.append(entry)
    return entries


def read_pedes(path: str | Path, fmt: str, max_bytes: int = MAX_ANNOTATION_BYTES) -> list[dict]:
    """The annotation file of format `fmt` (a key of PEDES) -> canonical entries."""
    path, spec = Path(path), PEDES[fmt]
    return pedes_to_entries(load_json(path, f"{spec.title} annotation file", max_bytes), spec, path)


def _reader(fmt: str):
    def read(cfg: DataConfig, split: str) -> ImageCaptionDataset:
        root = Path(cfg.root)
        path = root / (cfg.json_name or PEDES[fmt].file)
        image_dir = Path(cfg.image_dir) if cfg.image_dir else root / IMAGE_DIR
        entries = read_pedes(path, fmt, cfg.max_annotation_bytes)
        return dataset_from_entries(entries, split, image_dir, path, root, cfg.allow_outside_root)

    read.__doc__ = f"{PEDES[fmt].title}: {{root}}/{PEDES[fmt].file}, images under {{root}}/{IMAGE_DIR}/."
    return read


for _fmt in PEDES:
    register_format(_fmt)(_reader(_fmt))
