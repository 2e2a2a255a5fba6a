"""Search at scale: embed a folder of images once into an on-disk index, then answer text queries by exact
inner-product search over it (the first stage of dense retrieval, as in VSE++, Faghri et al., BMVC 2018,
and the FAISS library, Johnson et al., IEEE TBD 2019).

An index is a folder:
- `embeddings.npy`: (N, E) float32 (or float16 with `dtype="float16"`: half the bytes to read per
  search), l2-normalised image embeddings, written batch by batch through a memory map, so neither
  building nor searching holds the whole matrix in memory twice.
- `paths.json`: N image paths relative to the image folder, row i <-> path i.
- `meta.json`: checkpoint, model name, E, count, the image folder, the images skipped as unreadable,
  `weights_sha256` (the image-side weights and preprocessing that made the rows: a query with a model whose
  image side differs is refused; `fingerprint` is only for resuming a build) and,
  while a build runs, the progress (`done` files) written atomically after each flushed batch, so an
  interrupted build resumes where it stopped and ends with the same file as an uninterrupted one. The
  checkpoint, the image folder and skipped files are stored relative to the index folder (so an index moved
  together with its images and checkpoint still finds them), or absolute with `absolute_paths=True`.
- `index.faiss` (optional): a faiss `IndexFlatIP` over the same rows.

Under `torchrun --nproc_per_node=N` every rank embeds a batch-aligned share of the images into
`.parts/index-rankRRR-of-NNN/` (itself a resumable build of those files), and rank 0 merges the parts into
the files a single process writes, byte for byte (`crossmatch.engine.sharding`).

Only models whose `encode_image_features` returns exactly {"embed": (B, E)} l2-normalised can be indexed: the
score of a pair must be the inner product of two single vectors.

Search is exact: one pass over the memory-mapped rows for all the queries of a call, block by block
((Q, E) @ (E, C) into a preallocated (Q, G) score buffer, one top-k per group of G rows, a final top-k over
the group winners), so its cost is one read of the index plus a GEMM, and its memory is bounded by the
buffers, not by N. Float16 rows are widened block by block into a small float32 buffer that stays in
cache; scores are then exact inner products of the stored (rounded) vectors, in float32.

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

from crossmatch.config import image_hw
from crossmatch.data.csv_folder import list_images
from crossmatch.data.loaders import build_eval_loader, pad_sequences
from crossmatch.data.transforms import MAX_IMAGE_PIXELS, build_image_transform, load_image
from crossmatch.engine.sharding import PARTS, batch_aligned_range, part_dir, write_npy_concat
from crossmatch.errors import ConfigError, DataError, ModelError
from crossmatch.files import write_text
from crossmatch.tensors import barrier, get_rank, get_world_size

log = logging.getLogger(__name__)

EMBEDDINGS, PATHS, META, FAISS_FILE = "embeddings.npy", "paths.json", "meta.json", "index.faiss"
BACKENDS = ("torch", "faiss")
DTYPES = {"float32": np.float32, "float16": np.float16}  # storage of embeddings.npy
SEARCH_CHUNK = 65536  # index rows scored at once: a (Q, C) block, never the whole (N, E) as a copy
HALF_CHUNK = 2048  # float16 rows widened at once: a (C, E) float32 buffer small enough to stay in cache
SCORE_BUFFER_BYTES = 32 << 20  # the (Q, G) score buffer; G rows share one top-k


def embed_dim_of(model: nn.Module, image_size: int, name: str, device: str | torch.device = "cpu") -> int:
    """E of a single-vector model (in eval mode), checked on two blank images; other models are a ModelError."""
    return probe_image_side(model, image_size, name, None, device)[0]


def probe_image_side(
    model: nn.Module, image_size: Any, name: str, preprocess: dict | None, device: str | torch.device = "cpu"
) -> tuple[int, str]:
    """(E, weights_sha256) of a single-vector model from one `encode_image_features` call on two blank images.

    E: the embedding width; a model whose `encode_image_features` is not exactly {"embed": (B, E)} l2-normalised is a
    ModelError. weights_sha256: sha256 of what turns an image into an index row, the image-side weights (the
    parameters and buffers of every module that `encode_image_features` calls, and every parameter its output depends
    on) and `image_size` and `preprocess`: equal for a moved or copied checkpoint, different after any
    retraining of the image side, whatever the text side did.
    """
    from crossmatch.engine.checkpoint import payload_digest

    called: set[nn.Module] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, _args: called.add(mod)) for m in model.modules()]
    params = dict(model.named_parameters())
    wanted = {n: p.requires_grad for n, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            out = model.encode_image_features({"image": torch.zeros(2, 3, *image_hw(image_size), device=device)})
            if set(out) != {"embed"} or out["embed"].ndim != 2:
                shapes = {k: tuple(v.shape) for k, v in out.items()}
                raise ModelError(
                    f"model {name} cannot be indexed: encode_image_features must return only "
                    f"{{'embed': (B, E)}}, got {shapes}"
                )
            used = [p for p in params.values()]
            grads = (
                torch.autograd.grad(out["embed"].sum(), used, allow_unused=True) if out["embed"].requires_grad else []
            )
    finally:
        for h in hooks:
            h.remove()
        for n, p in params.items():
            p.requires_grad_(wanted[n])
    norms = out["embed"].detach().float().norm(dim=-1)  # (2,)
    if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
        raise ModelError(f"model {name} cannot be indexed: its image embeddings are not l2-normalised")
    state = {n: p for (n, p), g in zip(params.items(), grads, strict=True) if g is not None}
    for prefix, module in model.named_modules():
        if module in called:
            own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            state.update({f"{prefix}.{n}" if prefix else n: t for n, t in own})
    weights = {n: state[n] for n in sorted(state)}
    digest = payload_digest({"weights": weights, "image_size": image_size, "preprocess": preprocess or {}})
    return int(out["embed"].shape[1]), digest


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


def stored_path(path: str | Path, index_dir: str | Path, absolute: bool = False) -> str:
    """How meta.json records a file or folder: relative to the index folder, or absolute with `absolute`."""
    full = Path(path).resolve()
    return str(full) if absolute else Path(os.path.relpath(full, Path(index_dir).resolve())).as_posix()


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
    dtype = DTYPES[meta["dtype"]]
    if old_path.is_file():
        old = _read_meta(old_path)
        if old.get("fingerprint") != meta["fingerprint"]:
            raise DataError(
                f"{out} holds an index of another checkpoint or image set ({old.get('checkpoint')}, "
                f"{old.get('image_dir')}); remove it or choose another --out"
            )
        if old.get("dtype", "float32") != meta["dtype"]:
            held = old.get("dtype", "float32")
            raise DataError(f"{out} holds a {held} index, not {meta['dtype']}; remove it or choose another --out")
        if (out / EMBEDDINGS).is_file():
            emb = np.load(out / EMBEDDINGS, mmap_mode="r+")
            if old.get("complete") or (emb.shape == (meta["files"], meta["embed_dim"]) and emb.dtype == dtype):
                return old, emb
        log.warning("%s: unfinished build without a usable %s; starting over", out, EMBEDDINGS)
    out.mkdir(parents=True, exist_ok=True)
    emb = np.lib.format.open_memmap(out / EMBEDDINGS, "w+", dtype, (meta["files"], meta["embed_dim"]))
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
    dtype: str = "float32",
    absolute_paths: bool = False,
) -> dict[str, Any]:
    """Embed every image under `image_dir` into the index folder `out` (see the module docstring).

    Running it again on an unfinished `out` with the same checkpoint and images continues the build;
    on a finished one it returns at once. Unreadable images are logged, recorded in meta["skipped"] and
    left out of the index. `dtype` ("float32" | "float16") is the storage of embeddings.npy. meta.json
    records paths relative to `out`, or absolute with `absolute_paths`.

    Returns:
        The meta.json dict (count = N indexed images).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}")
    if backend == "faiss":
        _import_faiss()  # fail before the long part
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    root, checkpoint = Path(image_dir), Path(checkpoint)
    files = list_images(root)
    rel = [p.relative_to(root).as_posix() for p in files]
    model = model.eval().to(device)
    out = Path(out)
    E, digest = probe_image_side(model, image_size, model_name, preprocess, device)
    meta = {
        "checkpoint": stored_path(checkpoint, out, absolute_paths),
        "model": model_name,
        "image_dir": stored_path(root, out, absolute_paths),
        "absolute_paths": absolute_paths,
        "image_size": image_size,
        "embed_dim": E,
        "files": len(files),
        "fingerprint": _fingerprint(checkpoint, root, rel),
        "max_image_pixels": max_image_pixels,
        **({"preprocess": preprocess} if preprocess else {}),  # the model's mean/std/resize (data.* of its run)
        "dtype": dtype,
        "weights_sha256": digest,  # what a query's model must match: its image-side weights and preprocessing
    }
    if get_world_size() > 1:
        meta = _build_sharded(model, files, rel, meta, out, (batch_size, device, num_workers, progress))
    else:
        meta, emb = _start_or_resume(out, meta)
        if not meta["complete"]:
            _embed_files(model, files, emb, meta, out, batch_size, device, num_workers, progress)
            meta = _finish(out, emb, meta, rel)
    if backend == "faiss" and not (out / FAISS_FILE).is_file() and get_rank() == 0:
        write_faiss(load_index(out), out / FAISS_FILE)
    barrier()
    return meta


def _build_sharded(
    model: nn.Module, files: list[Path], rel: list[str], meta: dict[str, Any], out: Path, run: tuple
) -> dict[str, Any]:
    """This rank's share into its resumable part, then rank 0 merges (see the module docstring)."""
    batch_size, device, num_workers, progress = run
    rank, world = get_rank(), get_world_size()
    final = out / META
    if final.is_file():
        old = json.loads(final.read_text())
        if old.get("complete") and old.get("fingerprint") == meta["fingerprint"]:
            return old
    share = batch_aligned_range(len(files), batch_size, rank, world)
    if len(share):
        folder = part_dir(out, "index", rank, world)
        part = {**meta, "files": len(share), "fingerprint": f"{meta['fingerprint']}:{share.start}-{share.stop}"}
        part, emb = _start_or_resume(folder, part)
        if not part["complete"]:
            mine = files[share.start : share.stop]
            _embed_files(model, mine, emb, part, folder, batch_size, device, num_workers, progress and rank == 0)
            _write_json(folder / META, {**part, "complete": True})
        del emb
    barrier()
    if rank == 0:
        _merge_parts(out, meta, rel, batch_size, world)
    barrier()
    return json.loads(final.read_text())


def _merge_parts(out: Path, meta: dict[str, Any], rel: list[str], batch_size: int, world: int) -> dict[str, Any]:
    """Concatenate the ranks' packed rows and skip lists into the single-process files, then drop the parts."""
    import shutil

    rows, skipped = [], []
    for r in range(world):
        share = batch_aligned_range(len(rel), batch_size, r, world)
        if not len(share):
            continue
        folder = part_dir(out, "index", r, world)
        part = json.loads((folder / META).read_text())
        rows.append(np.load(folder / EMBEDDINGS, mmap_mode="r")[: part["rows"]])  # (rows_r, E)
        absolute = meta.get("absolute_paths", False)
        for s in part["skipped"]:  # a part records its paths relative to its own folder: rebase them onto `out`
            path = stored_path(folder / s["path"], out, absolute)
            skipped.append({**s, "path": path, "index": s["index"] + share.start})
    count = sum(len(x) for x in rows)
    if count == 0:
        raise DataError(f"no readable image under {meta['image_dir']} ({len(skipped)} skipped)")
    write_npy_concat(rows, out / EMBEDDINGS)
    del rows
    gone = {s["index"] for s in skipped}
    _write_json(out / PATHS, [r for i, r in enumerate(rel) if i not in gone])
    final = {**meta, "done": len(rel), "rows": count, "skipped": skipped, "complete": True, "count": count}
    _write_json(out / META, final)
    shutil.rmtree(out / PARTS, ignore_errors=True)
    return final


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
            path = stored_path(files[i], out, meta.get("absolute_paths", False))
            meta["skipped"].append({"path": path, "index": i, "error": reason})
        n_ok = len(batch["image"]) if "image" in batch else 0
        if n_ok:
            vecs = model.encode_image_features({"image": batch["image"].to(device)})["embed"]  # (B, E)
            emb[meta["rows"] : meta["rows"] + n_ok] = vecs.float().cpu().numpy()  # rounded to emb.dtype
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
        small = np.lib.format.open_memmap(tmp, "w+", emb.dtype, (rows, emb.shape[1]))
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
    embeddings: np.ndarray  # (N, E) float32 or float16 memmap
    paths: list[str]  # N paths relative to meta["image_dir"]
    meta: dict[str, Any]
    _faiss: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    def resolve(self, stored: str) -> Path:
        """A path of meta.json as a usable path: an absolute one as is, a relative one joined to the index
        folder (relative to the current folder when the index folder was given so)."""
        return Path(os.path.normpath(self.root / stored))

    def image_path(self, i: int) -> Path:
        return self.resolve(self.meta["image_dir"]) / self.paths[i]

    @property
    def checkpoint(self) -> Path:
        """The checkpoint the index was built with."""
        return self.resolve(self.meta["checkpoint"])

    def search(
        self, text_embeds: Tensor | np.ndarray, k: int, backend: str = "torch", chunk_size: int = 0
    ) -> tuple[Tensor, Tensor]:
        """Exact inner-product top-k of every query in one pass over the index: text_embeds (Q, E) ->
        scores (Q, k) float32, ids (Q, k) long, best first (k is capped at N). `chunk_size` rows are read
        per GEMM (0: SEARCH_CHUNK for float32 rows, HALF_CHUNK for float16)."""
        q = torch.as_tensor(text_embeds).detach().float().cpu().contiguous()  # (Q, E)
        if q.ndim != 2 or q.shape[1] != self.embeddings.shape[1]:
            e = self.meta["embed_dim"]
            raise ModelError(f"query embeddings {tuple(q.shape)} do not fit index {self.root} (E={e})")
        k = min(k, len(self))
        if backend == "faiss":
            return self._search_faiss(q, k)
        if backend != "torch":
            raise ConfigError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}")
        return exact_topk(self.embeddings, q, k, chunk_size)

    def _search_faiss(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        if self._faiss is None:
            faiss = _import_faiss()
            saved = self.root / FAISS_FILE
            self._faiss = faiss.read_index(str(saved)) if saved.is_file() else faiss_flat_ip(self)
        scores, ids = self._faiss.search(np.ascontiguousarray(q.numpy(), dtype=np.float32), k)  # (Q, k) each
        return torch.from_numpy(scores), torch.from_numpy(ids).long()


def exact_topk(rows: np.ndarray, q: Tensor, k: int, chunk_size: int = 0) -> tuple[Tensor, Tensor]:
    """Top-k inner products of queries q (Q, E) float32 over rows (N, E) float32/float16 (a memory map is
    read once, block by block): scores (Q, k) float32 and ids (Q, k) long, best first; k <= N."""
    N, E = rows.shape
    Q = q.shape[0]
    widen = rows.dtype != np.float32
    chunk = max(1, min(N, chunk_size or (HALF_CHUNK if widen else SEARCH_CHUNK)))
    group = min(N, max(chunk, SCORE_BUFFER_BYTES // (4 * Q) // chunk * chunk))  # rows per top-k, whole chunks
    scores = torch.empty(Q, group)  # (Q, G) reused for every group
    wide = torch.empty(chunk, E) if widen else None  # (C, E) float32
    top_s, top_i = [], []
    for g0 in range(0, N, group):
        g1 = min(N, g0 + group)
        for s in range(g0, g1, chunk):
            e = min(g1, s + chunk)
            block = torch.from_numpy(rows[s:e])  # (C, E) a view of the map, no copy
            if wide is not None:
                block = wide[: e - s].copy_(block)  # float16 -> float32, in cache
            torch.matmul(q, block.t(), out=scores[:, s - g0 : e - g0])  # (Q, C) written in place
        top = scores[:, : g1 - g0].topk(min(k, g1 - g0), dim=1)  # (Q, k)
        top_s.append(top.values)
        top_i.append(top.indices + g0)
    if len(top_s) == 1:
        return top_s[0], top_i[0]
    cand_s, cand_i = torch.cat(top_s, 1), torch.cat(top_i, 1)  # (Q, n_groups * k)
    keep = cand_s.topk(k, dim=1)
    return keep.values, cand_i.gather(1, keep.indices)


def load_index(path: str | Path) -> Index:
    """Open a finished index folder; an unfinished, foreign or damaged folder (a truncated embeddings.npy, a
    missing or broken paths.json, a meta.json without embed_dim) is a DataError naming it."""
    root = Path(path)
    if not (root / META).is_file():
        raise DataError(f"not a crossmatch index (no {META}): {root}")
    meta = _read_meta(root / META)
    if not meta.get("complete"):
        done = f"{meta.get('done', 0)}/{meta.get('files')}"
        raise DataError(f"index {root} is unfinished ({done} images): run `crossmatch index build` again")
    E = meta.get("embed_dim")
    if not isinstance(E, int) or isinstance(E, bool) or E < 1 or not isinstance(meta.get("image_dir"), str):
        raise DataError(f"index {root}: {META} has no valid embed_dim and image_dir (damaged; rebuild the index)")
    try:  # copy-on-write map: torch.from_numpy needs a writable array; search only reads, so no page is copied
        emb = np.load(root / EMBEDDINGS, mmap_mode="c")
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"index {root}: {EMBEDDINGS} is missing or damaged ({_first_line(err)}); rebuild it") from err
    try:
        paths = json.loads((root / PATHS).read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise DataError(f"index {root}: {PATHS} is missing or damaged ({_first_line(err)}); rebuild it") from err
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise DataError(f"index {root}: {PATHS} is not a list of image paths; rebuild the index")
    if emb.ndim != 2 or emb.shape != (len(paths), E):
        raise DataError(f"index {root}: {EMBEDDINGS} {emb.shape} does not match {len(paths)} paths of E={E}")
    if emb.dtype != DTYPES.get(meta.get("dtype", "float32")):
        raise DataError(f"index {root}: {EMBEDDINGS} is {emb.dtype}, meta.json says {meta.get('dtype', 'float32')}")
    return Index(root, emb, paths, meta)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:100] if text else type(err).__name__


def check_index_model(index: Index, digest: str, checkpoint: str | Path) -> None:
    """Refuse a model whose image side did not build `index` (its rows would be ranked by a text tower that
    did not make them). An index built before the digest was recorded is searched with a warning."""
    built = index.meta.get("weights_sha256")
    if built is None:
        log.warning("index %s records no weights_sha256 (an older build): its model is not checked", index.root)
    elif built != digest:
        raise ModelError(
            f"index {index.root} was not built by the image weights and preprocessing of {checkpoint} (built from "
            f"{index.meta.get('checkpoint')}, since retrained or another model?): rebuild the index with it"
        )


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
        flat.add(np.ascontiguousarray(index.embeddings[s : s + chunk_size], dtype=np.float32))
    return flat


def write_faiss(index: Index, path: str | Path) -> Path:
    _import_faiss().write_index(faiss_flat_ip(index), str(path))
    return Path(path)


def load_index_model(
    index: Index, checkpoint: str | Path | None = None, overrides: list[str] | None = None
) -> tuple[nn.Module, Any, Any]:
    """(model, config, tokenizer) that searches `index`: the checkpoint that built it, or `checkpoint` (a moved
    or copied one), refused in one line when its image side did not build the index (`check_index_model`).
    Every reader of an index (query, eval, serve) loads its model here."""
    from crossmatch.data.transforms import preprocess_kwargs
    from crossmatch.runs import load_run

    source = checkpoint or index.checkpoint
    model, cfg, tokenizer = load_run(source, overrides)
    _, digest = probe_image_side(model.eval(), cfg.data.image_size, cfg.model["name"], preprocess_kwargs(cfg.data))
    check_index_model(index, digest, source)
    return model, cfg, tokenizer


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer, texts: list[str], device: str | torch.device = "cpu") -> Tensor:
    """Sentences -> (Q, E) text embeddings with the model's own tokenizer."""
    ids, mask = pad_sequences(tokenizer.encode_batch(texts))  # (Q, L) each
    return (
        model.encode_text_features({"input_ids": ids.to(device), "attention_mask": mask.to(device)})["embed"]
        .float()
        .cpu()
    )
