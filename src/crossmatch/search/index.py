"""Search at scale: embed a folder of images once into an on-disk index, then answer text queries by exact
inner-product search over it (the first stage of dense retrieval, as in VSE++, Faghri et al., BMVC 2018,
and the FAISS library, Johnson et al., IEEE TBD 2019).

An index is a folder:
- `embeddings.npy`: (N, E) float32, l2-normalised image embeddings, written batch by batch through a
  memory map, so neither building nor searching holds the whole matrix in memory twice.
- `paths.json`: N image paths relative to the image folder, row i <-> path i.
- `meta.json`: checkpoint, model name, E, count, the image folder, the images skipped as unreadable and,
  while a build runs, the progress (`done` files) written atomically after each flushed batch, so an
  interrupted build resumes where it stopped and ends with the same file as an uninterrupted one.
- `index.faiss` (optional): a faiss `IndexFlatIP` over the same rows.

Only models whose `encode_image` returns exactly {"embed": (B, E)} l2-normalised can be indexed: the
score of a pair must be the inner product of two single vectors.

Legend: N indexed images, B batch, E embedding, Q queries, C rows per search chunk, k results per query.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from crossmatch.data.loaders import build_eval_loader, pad_sequences
from crossmatch.data.transforms import MAX_IMAGE_PIXELS, build_image_transform, load_image
from crossmatch.errors import ConfigError, DataError, ModelError
from crossmatch.files import write_text

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
EMBEDDINGS, PATHS, META, FAISS_FILE = "embeddings.npy", "paths.json", "meta.json", "index.faiss"
BACKENDS = ("torch", "faiss")
SEARCH_CHUNK = 65536  # index rows scored at once: a (Q, C) block, never the whole (N, E) as a copy


def list_images(image_dir: str | Path) -> list[Path]:
    """Every image file under `image_dir` (recursive, by extension), sorted by relative path."""
    root = Path(image_dir)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
    return files


def embed_dim_of(model: nn.Module, image_size: int, name: str, device: str | torch.device = "cpu") -> int:
    """E of a single-vector model (in eval mode), checked on two blank images; other models are a ModelError."""
    with torch.no_grad():
        out = model.encode_image({"image": torch.zeros(2, 3, image_size, image_size, device=device)})
    if set(out) != {"embed"} or out["embed"].ndim != 2:
        shapes = {k: tuple(v.shape) for k, v in out.items()}
        raise ModelError(
            f"model {name} cannot be indexed: encode_image must return only {{'embed': (B, E)}}, got {shapes}"
        )
    norms = out["embed"].float().norm(dim=-1)  # (2,)
    if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
        raise ModelError(f"model {name} cannot be indexed: its image embeddings are not l2-normalised")
    return int(out["embed"].shape[1])


class _ImageFiles(Dataset):
    """Item i: {"image": (3, S, S), "image_idx": i}, or {"skipped": (i, reason)} for an unreadable file."""

    def __init__(
        self, files: list[Path], image_size: int, max_pixels: int = MAX_IMAGE_PIXELS, preprocess: dict | None = None
    ):
        self.files, self.transform = files, build_image_transform(image_size, train=False, **(preprocess or {}))
        self.max_pixels = max_pixels  # larger files are skipped as unreadable (decompression bombs)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        try:
            return {"image": self.transform(load_image(self.files[i], self.max_pixels)), "image_idx": i}
        except DataError as err:
            return {"skipped": (i, str(err))}


def _write_json(path: Path, obj: Any) -> None:
    """Write-then-rename, so a reader (or a resumed build) never sees half a file."""
    write_text(path, json.dumps(obj, indent=2))


def _fingerprint(checkpoint: Path, root: Path, rel: list[str]) -> str:
    """Identity of a build's inputs: the checkpoint file (path, size, mtime) and the list of images."""
    st = checkpoint.stat()
    h = hashlib.sha1(f"{checkpoint.resolve()}|{st.st_size}|{st.st_mtime_ns}|{root.resolve()}".encode())
    h.update("\n".join(rel).encode())
    return h.hexdigest()


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not an index's meta.json ({str(err).splitlines()[0][:80]})") from err
    if not isinstance(meta, dict):
        raise DataError(f"{path} is not an index's meta.json")
    return meta


def _start_or_resume(out: Path, meta: dict[str, Any]) -> tuple[dict[str, Any], np.memmap]:
    """The progress record and the open (N_files, E) memmap: a fresh one, or the ones of an unfinished
    build of the same inputs. A folder holding another build is an error, not silently overwritten."""
    old_path = out / META
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not an index folder; choose another --out")
    if old_path.is_file():
        old = _read_meta(old_path)
        if old.get("fingerprint") != meta["fingerprint"]:
            raise DataError(
                f"{out} holds an index of another checkpoint or image set ({old.get('checkpoint')}, "
                f"{old.get('image_dir')}); remove it or choose another --out"
            )
        if (out / EMBEDDINGS).is_file():
            emb = np.load(out / EMBEDDINGS, mmap_mode="r+")
            if old.get("complete") or emb.shape == (meta["files"], meta["embed_dim"]):
                return old, emb
        log.warning("%s: unfinished build without a usable %s; starting over", out, EMBEDDINGS)
    out.mkdir(parents=True, exist_ok=True)
    emb = np.lib.format.open_memmap(out / EMBEDDINGS, "w+", np.float32, (meta["files"], meta["embed_dim"]))
    meta = {**meta, "done": 0, "rows": 0, "skipped": [], "complete": False}
    _write_json(old_path, meta)
    return meta, emb


@torch.no_grad()
def build_index(
    model: nn.Module,
    image_dir: str | Path,
    out: str | Path,
    *,
    checkpoint: str | Path,
    model_name: str,
    image_size: int,
    preprocess: dict | None = None,
    batch_size: int = 64,
    backend: str = "torch",
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = False,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> dict[str, Any]:
    """Embed every image under `image_dir` into the index folder `out` (see the module docstring).

    Running it again on an unfinished `out` with the same checkpoint and images continues the build;
    on a finished one it returns at once. Unreadable images are logged, recorded in meta["skipped"] and
    left out of the index.

    Returns:
        The meta.json dict (count = N indexed images).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}")
    if backend == "faiss":
        _import_faiss()  # fail before the long part
    root, checkpoint = Path(image_dir), Path(checkpoint)
    files = list_images(root)
    rel = [p.relative_to(root).as_posix() for p in files]
    model = model.eval().to(device)
    meta = {
        "checkpoint": str(checkpoint.resolve()),
        "model": model_name,
        "image_dir": str(root.resolve()),
        "image_size": image_size,
        "embed_dim": embed_dim_of(model, image_size, model_name, device),
        "files": len(files),
        "fingerprint": _fingerprint(checkpoint, root, rel),
        "max_image_pixels": max_image_pixels,
        **({"preprocess": preprocess} if preprocess else {}),  # the model's mean/std/resize (data.* of its run)
    }
    out = Path(out)
    meta, emb = _start_or_resume(out, meta)
    if not meta["complete"]:
        _embed_files(model, files, emb, meta, out, batch_size, device, num_workers, progress)
        meta = _finish(out, emb, meta, rel)
    if backend == "faiss" and not (out / FAISS_FILE).is_file():
        write_faiss(load_index(out), out / FAISS_FILE)
    return meta


def _embed_files(
    model: nn.Module,
    files: list[Path],
    emb: np.memmap,
    meta: dict[str, Any],
    out: Path,
    batch_size: int,
    device: str | torch.device,
    num_workers: int,
    progress: bool,
) -> None:
    """Fill rows meta["rows"]: of `emb` from files meta["done"]:, recording progress after every batch.
    Valid rows are packed (a skipped file takes no row), so rows <= done."""
    images = _ImageFiles(
        files, meta["image_size"], meta.get("max_image_pixels", MAX_IMAGE_PIXELS), meta.get("preprocess")
    )
    view = Subset(images, range(meta["done"], len(files)))
    bar = tqdm(total=len(files), initial=meta["done"], desc="index images", unit="img", disable=not progress)
    for batch in build_eval_loader(view, batch_size, num_workers):
        for i, reason in batch.get("skipped", []):
            log.warning("skipped: %s", reason)  # the reason names the file
            meta["skipped"].append({"path": str(files[i]), "index": i, "error": reason})
        n_ok = len(batch["image"]) if "image" in batch else 0
        if n_ok:
            vecs = model.encode_image({"image": batch["image"].to(device)})["embed"]  # (B, E)
            emb[meta["rows"] : meta["rows"] + n_ok] = vecs.float().cpu().numpy()
            emb.flush()  # rows reach the file before meta.json says they exist
        meta["rows"] += n_ok
        meta["done"] += n_ok + len(batch.get("skipped", []))
        _write_json(out / META, meta)
        bar.update(n_ok + len(batch.get("skipped", [])))
    bar.close()


def _finish(out: Path, emb: np.memmap, meta: dict[str, Any], rel: list[str]) -> dict[str, Any]:
    """Write paths.json, shrink embeddings.npy to the indexed rows when images were skipped, mark done."""
    skipped = {s["index"] for s in meta["skipped"]}
    kept = [r for i, r in enumerate(rel) if i not in skipped]
    rows = meta["rows"]
    if rows == 0:
        raise DataError(f"no readable image under {meta['image_dir']} ({len(skipped)} skipped)")
    if rows < emb.shape[0]:  # copy the packed rows into a file of the right shape, chunk by chunk
        tmp = out / (EMBEDDINGS + ".tmp")
        small = np.lib.format.open_memmap(tmp, "w+", np.float32, (rows, emb.shape[1]))
        for s in range(0, rows, SEARCH_CHUNK):
            small[s : s + SEARCH_CHUNK] = emb[s : min(s + SEARCH_CHUNK, rows)]
        small.flush()
        del small
        os.replace(tmp, out / EMBEDDINGS)
    _write_json(out / PATHS, kept)
    meta = {**meta, "count": rows, "complete": True}
    _write_json(out / META, meta)
    return meta


@dataclass
class Index:
    """An index folder opened for search: embeddings memory-mapped, never loaded whole."""

    root: Path
    embeddings: np.ndarray  # (N, E) float32 memmap
    paths: list[str]  # N paths relative to meta["image_dir"]
    meta: dict[str, Any]
    _faiss: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    def image_path(self, i: int) -> Path:
        return Path(self.meta["image_dir"]) / self.paths[i]

    def search(
        self, text_embeds: Tensor | np.ndarray, k: int, backend: str = "torch", chunk_size: int = SEARCH_CHUNK
    ) -> tuple[Tensor, Tensor]:
        """Exact inner-product top-k: text_embeds (Q, E) -> scores (Q, k) float32, ids (Q, k) long, best first
        (k is capped at N)."""
        q = torch.as_tensor(text_embeds).float().cpu()  # (Q, E)
        if q.ndim != 2 or q.shape[1] != self.embeddings.shape[1]:
            e = self.meta["embed_dim"]
            raise ModelError(f"query embeddings {tuple(q.shape)} do not fit index {self.root} (E={e})")
        k = min(k, len(self))
        if backend == "faiss":
            return self._search_faiss(q, k)
        if backend != "torch":
            raise ConfigError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}")
        best_s = torch.full((q.shape[0], 0), -torch.inf)  # (Q, <=k) running top-k over the chunks seen
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.long)
        for s in range(0, len(self), chunk_size):
            block = torch.from_numpy(self.embeddings[s : s + chunk_size])  # (C, E) a view of the map, no copy
            scores = q @ block.t()  # (Q, C)
            top = scores.topk(min(k, scores.shape[1]), dim=1)
            cand_s = torch.cat([best_s, top.values], 1)  # (Q, <=2k)
            cand_i = torch.cat([best_i, top.indices + s], 1)
            keep = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
            best_s, best_i = keep.values, cand_i.gather(1, keep.indices)
        return best_s, best_i

    def _search_faiss(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        if self._faiss is None:
            faiss = _import_faiss()
            saved = self.root / FAISS_FILE
            self._faiss = faiss.read_index(str(saved)) if saved.is_file() else faiss_flat_ip(self)
        scores, ids = self._faiss.search(np.ascontiguousarray(q.numpy(), dtype=np.float32), k)  # (Q, k) each
        return torch.from_numpy(scores), torch.from_numpy(ids).long()


def load_index(path: str | Path) -> Index:
    """Open a finished index folder; an unfinished or foreign folder is a DataError naming it."""
    root = Path(path)
    if not (root / META).is_file():
        raise DataError(f"not a crossmatch index (no {META}): {root}")
    meta = _read_meta(root / META)
    if not meta.get("complete"):
        done = f"{meta.get('done', 0)}/{meta.get('files')}"
        raise DataError(f"index {root} is unfinished ({done} images): run `crossmatch index build` again")
    # Copy-on-write map: torch.from_numpy needs a writable array; search only reads, so no page is copied.
    emb = np.load(root / EMBEDDINGS, mmap_mode="c")
    paths = json.loads((root / PATHS).read_text())
    if emb.shape != (len(paths), meta["embed_dim"]):
        raise DataError(f"index {root}: {EMBEDDINGS} {emb.shape} does not match {len(paths)} paths")
    return Index(root, emb, paths, meta)


def _import_faiss():
    try:
        import faiss
    except ImportError as err:
        raise ConfigError("--backend faiss needs the faiss package: pip install faiss-cpu") from err
    return faiss


def faiss_flat_ip(index: Index, chunk_size: int = SEARCH_CHUNK):
    """An exact faiss IndexFlatIP over the index rows, added chunk by chunk."""
    faiss = _import_faiss()
    flat = faiss.IndexFlatIP(index.embeddings.shape[1])
    for s in range(0, len(index), chunk_size):
        flat.add(np.ascontiguousarray(index.embeddings[s : s + chunk_size]))
    return flat


def write_faiss(index: Index, path: str | Path) -> Path:
    _import_faiss().write_index(faiss_flat_ip(index), str(path))
    return Path(path)


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer, texts: list[str], device: str | torch.device = "cpu") -> Tensor:
    """Sentences -> (Q, E) text embeddings with the model's own tokenizer."""
    ids, mask = pad_sequences(tokenizer.encode_batch(texts))  # (Q, L) each
    return model.encode_text({"input_ids": ids.to(device), "attention_mask": mask.to(device)})["embed"].float().cpu()
