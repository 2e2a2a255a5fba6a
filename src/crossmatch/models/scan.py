"""SCAN: Stacked Cross Attention for image-text matching (Lee et al., ECCV 2018).

An image is a set of l2-normalised region vectors, a caption a sequence of l2-normalised word vectors, and
the score of a pair comes from cross attention between the two (`scan_similarity`, in
`crossmatch.models.scan_scoring`): in t2i each word attends over the regions, in i2t each region over the
words, and the relevances are pooled (LogSumExp, Mean, ...). Trained with the VSE++ hinge triplet loss on
the batch score matrix (`TripletTask`, hardest negatives).

Regions (`ScanConfig.regions`):
- `grid`: every cell of the image tower's (h, w) feature map is a region (R = h*w).
- `boxes`: a FIXED number of regions per image, R = 1 + n_boxes: region 0 is the mean of the whole feature
  map, then one region per object box (`batch["boxes"]`, pooled with `layers.pool_boxes`). An image with
  fewer than n_boxes real boxes fills empty slot k with cell k of a coarse g x g grid (g = ceil(sqrt(n_boxes)))
  instead. `scan_similarity` takes no region mask, and padding with zeros or with copies of a real region
  would change the softmax over regions, so every region is a distinct, real part of the image.
- `precomputed`: `batch["image"]` already holds (B, R, feature_dim) region features (bottom-up attention
  features in SCAN's `{split}_ims.npy`; see `crossmatch.data.precomputed`).

Legend: B batch, C channels, h/w feature-map height/width, R regions, K boxes, L tokens (words), D width
(= E), E embedding, n real words of one caption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossmatch.errors import ModelError
from crossmatch.fields import ranged
from crossmatch.models.face import ImageTextModel
from crossmatch.models.layers import (
    GRUTextEncoder,
    build_image_tower,
    feature_map_to_regions,
    l2norm,
    pool_boxes,
)
from crossmatch.models.registry import register_model
from crossmatch.models.scan_scoring import AGG_FUNCS, DIRECTIONS, RAW_FEATURE_NORMS, scan_similarity

__all__ = ["ScanConfig", "ScanModel", "scan_similarity"]

REGION_SOURCES = ("grid", "boxes", "precomputed")


@dataclass
class ScanConfig:
    vocab_size: int = 1000  # set at build time from the tokenizer
    regions: str = "grid"  # grid (feature-map cells) | boxes (whole image + object boxes) | precomputed
    image_tower: str = "cnn"  # grid/boxes: cnn (the small VSE++ CNN) | resnet18 | resnet50
    pretrained: bool = False  # ImageNet weights for the ResNet towers (needs internet the first time)
    cnn_channels: tuple[int, ...] = (32, 32, 64)  # SmallCNN conv widths
    batch_norm: bool = True  # BatchNorm after each SmallCNN conv
    # input side or [H, W] (from data.image_size); unused by precomputed regions
    image_size: int | list[int] = ranged(64, check="size")
    # precomputed: width of the stored region features (bottom-up attention: 2048)
    feature_dim: int = ranged(2048, min=1)
    # boxes: object-box slots per image (R = 1 + n_boxes); the shapes data has 1-3 objects
    n_boxes: int = ranged(3, min=0)
    box_position: bool = False  # boxes: add a learned embedding of each box's place and size to its region
    embed_dim: int = ranged(1024, min=1)  # joint width E of regions and words
    word_dim: int = ranged(300, min=1)  # word embedding width
    # GRU width; 0 = embed_dim (SCAN: the GRU states are the word vectors, no projection)
    text_hidden: int = ranged(0, min=0)
    bidirectional: bool = False  # bi-GRU, the two directions averaged (SCAN's --bi_gru)
    direction: str = "t2i"  # t2i: words attend to regions ("t-i") | i2t: regions attend to words ("i-t")
    raw_feature_norm: str = "clipped_l2norm"  # normalisation of raw scores across the query axis
    agg_func: str = "LogSumExp"  # pooling of relevances: LogSumExp | Mean (the paper's AVG) | Max | Sum
    lambda_softmax: float = ranged(9.0, above=0)  # inverse temperature of the attention softmax (t2i 9, i2t 4)
    lambda_lse: float = ranged(6.0, above=0)  # inverse temperature of LogSumExp pooling (t2i 6, i2t 5)
    score_chunk: int = ranged(0, min=0)  # images per scoring block in `similarity`; 0 = scan_similarity's own choice


def _check(cfg: ScanConfig) -> None:
    for name, value, known in (
        ("regions", cfg.regions, REGION_SOURCES),
        ("direction", cfg.direction, DIRECTIONS),
        ("raw_feature_norm", cfg.raw_feature_norm, RAW_FEATURE_NORMS),
        ("agg_func", cfg.agg_func, AGG_FUNCS),
    ):
        if value not in known:
            raise ModelError(f"unknown model.{name} {value!r}; known: {', '.join(known)}")
    if cfg.regions == "boxes" and cfg.n_boxes < 1:
        raise ModelError("model.n_boxes must be at least 1 for box regions")
    if cfg.box_position and cfg.regions != "boxes":
        raise ModelError(f"model.box_position needs model.regions=boxes, not {cfg.regions!r}")


def normalise_raw(raw: Tensor, norm: str, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """SCAN's normalisation of raw attention scores along `dim` (written plainly; for display and tests)."""
    if norm == "softmax":
        return torch.softmax(raw, dim=dim)
    x = F.leaky_relu(raw, 0.1) if norm.startswith("clipped") else raw
    if norm.endswith("l2norm"):
        return x / (x.pow(2).sum(dim, keepdim=True).sqrt() + eps)
    if norm.endswith("l1norm"):
        return x / (x.abs().sum(dim, keepdim=True) + eps)
    return x  # clipped, no_norm


class ScanModel(ImageTextModel):
    """Regions and words in one l2-normalised space, scored by stacked cross attention."""

    family = "scan"  # crossmatch.tasks: the hinge triplet loss (VSE++'s)

    def __init__(self, cfg: ScanConfig):
        super().__init__()
        _check(cfg)
        self.config = cfg
        self.needs_boxes = cfg.regions == "boxes"  # the CLI loads batch["boxes"] for such models
        if cfg.regions == "precomputed":
            in_dim = cfg.feature_dim  # no image tower: the batch holds region features
        else:
            self.image_tower = build_image_tower(cfg.image_tower, cfg.pretrained, cfg.cnn_channels, cfg.batch_norm)
            in_dim = self.image_tower.out_channels
        self.image_proj = nn.Linear(in_dim, cfg.embed_dim)
        # SCAN's Xavier init of the region projection (EncoderImagePrecomp.init_weights).
        bound = math.sqrt(6.0) / math.sqrt(in_dim + cfg.embed_dim)
        nn.init.uniform_(self.image_proj.weight, -bound, bound)
        nn.init.zeros_(self.image_proj.bias)
        if cfg.box_position:  # where a region is, which pooled CNN features barely say (a relation needs it)
            self.box_proj = nn.Linear(5, cfg.embed_dim)
        hidden = cfg.text_hidden or cfg.embed_dim
        self.text_tower = GRUTextEncoder(cfg.vocab_size, cfg.word_dim, hidden, cfg.bidirectional)
        self.text_proj = nn.Identity() if hidden == cfg.embed_dim else nn.Linear(hidden, cfg.embed_dim)

    # ---- image side -------------------------------------------------------------------------------
    def region_boxes(self, batch: dict[str, Tensor]) -> Tensor:
        """The (B, 1 + n_boxes, 4) xyxy pixel boxes of box regions: the whole image, then the first
        n_boxes real boxes of `batch["boxes"]` (mask `batch["box_mask"]`), empty slots filled by coarse
        grid cells. Works without "boxes" in the batch (every slot is then a grid cell)."""
        image = batch["image"]  # (B, 3, H, W)
        B, n = image.shape[0], self.config.n_boxes
        H, W = float(image.shape[-2]), float(image.shape[-1])
        g = math.ceil(math.sqrt(n))
        sy, sx = H / g, W / g  # a g x g grid of cells over the (possibly non-square) image
        cells = [[c * sx, r * sy, (c + 1) * sx, (r + 1) * sy] for r in range(g) for c in range(g)][:n]
        slots = torch.tensor(cells, dtype=image.dtype, device=image.device).expand(B, n, 4).clone()  # (B, n, 4)
        boxes = batch.get("boxes")
        if boxes is not None and boxes.shape[1] > 0:
            k = min(n, boxes.shape[1])
            real = batch.get("box_mask")
            real = torch.ones(boxes.shape[:2], dtype=torch.bool, device=boxes.device) if real is None else real
            slots[:, :k] = torch.where(real[:, :k, None], boxes[:, :k].to(slots), slots[:, :k])  # (B, k, 4)
        whole = torch.tensor([0.0, 0.0, W, H], dtype=image.dtype, device=image.device).expand(B, 1, 4)
        return torch.cat([whole, slots], dim=1)  # (B, 1 + n, 4)

    def region_features(self, batch: dict[str, Tensor]) -> Tensor:
        """Region features before the projection: (B, R, C) (C = feature_dim for precomputed regions)."""
        if self.config.regions == "precomputed":
            return batch["image"]  # (B, R, feature_dim)
        image = batch["image"]  # (B, 3, H, W)
        fmap = self.image_tower(image)  # (B, C, h, w)
        if self.config.regions == "grid":
            return feature_map_to_regions(fmap)  # (B, h*w, C)
        boxes = self.region_boxes(batch)  # (B, 1 + n, 4)
        pooled = pool_boxes(fmap, boxes[:, 1:], tuple(image.shape[-2:]))  # (B, n, C)
        return torch.cat([fmap.mean((2, 3))[:, None], pooled], dim=1)  # (B, 1 + n, C): whole image first

    def encode_image_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch["image"] (B, 3, S, S), or (B, R, feature_dim) features -> {"regions": (B, R, E)} l2-normalised."""
        feats = self.region_features(batch)  # (B, R, C)
        regions = self.image_proj(feats.to(self.image_proj.weight.dtype))  # (B, R, E)
        if self.config.box_position:
            regions = regions + self.box_proj(self.box_geometry(batch).to(regions.dtype))  # (B, R, E)
        return {"regions": l2norm(regions)}  # (B, R, E)

    def box_geometry(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, R, 5) per region: x0, y0, x1, y1 as fractions of the image width / height, and the box's share
        of the image area (the 5-d spatial vector bottom-up-attention regions carry)."""
        H, W = batch["image"].shape[-2:]
        boxes = self.region_boxes(batch) / torch.tensor([W, H, W, H], device=batch["image"].device)  # (B, R, 4)
        area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])  # (B, R)
        return torch.cat([boxes, area[..., None]], dim=-1)  # (B, R, 5)

    # ---- text side --------------------------------------------------------------------------------
    def encode_text_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch["input_ids"], batch["attention_mask"] (B, L) -> {"words": (B, L, E) l2-normalised (padding
        zero or garbage, never read), "lengths": (B,) long}."""
        mask = batch["attention_mask"]
        words, _ = self.text_tower(batch["input_ids"], mask)  # (B, L, hidden)
        lengths = mask.sum(1).clamp(min=1).long()  # (B,)
        return {"words": l2norm(self.text_proj(words)), "lengths": lengths}  # (B, L, E), (B,)

    # ---- scores -----------------------------------------------------------------------------------
    def similarity(self, img: dict[str, Tensor], txt: dict[str, Tensor]) -> Tensor:
        """All pairs: regions (N_img, R, E) x words (N_txt, L, E) -> (N_img, N_txt) SCAN scores.

        Under autocast (train.precision / eval.precision bf16 or fp16) only the large GEMM of raw scores runs
        in the low precision; the normalisations, exponentials and sums run in float32 (in bf16 they would
        round every attention weight to 3 significant digits)."""
        cfg = self.config
        regions, words = img["regions"], txt["words"]
        device = regions.device.type
        gemm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        work = torch.promote_types(regions.dtype, torch.float32)  # float32 (float64 stays float64)
        with torch.autocast(device, enabled=False):
            return scan_similarity(
                regions.to(work),
                words.to(work),
                txt["lengths"],
                direction=cfg.direction,
                raw_feature_norm=cfg.raw_feature_norm,
                agg_func=cfg.agg_func,
                lambda_softmax=cfg.lambda_softmax,
                lambda_lse=cfg.lambda_lse,
                img_chunk=cfg.score_chunk or None,
                gemm_dtype=gemm_dtype,
            )

    def word_attention(self, img: dict[str, Tensor], txt: dict[str, Tensor]) -> Tensor:
        """Each word's attention over the regions, for one image and one caption: (n, R), rows sum to 1.

        The t2i attention (words attend to regions), whatever `direction` the model scores with: raw scores
        regions . words^T, normalised across the words for each region (`raw_feature_norm`), then a softmax
        over the regions with `lambda_softmax`. Written plainly, for display (`crossmatch search --explain`).

        Args:
            img: {"regions": (1, R, E)} (the first image is used).
            txt: {"words": (1, L, E), "lengths": (1,)} (the first caption is used).
        """
        regions = img["regions"][0]  # (R, E)
        n = int(txt["lengths"][0])
        words = txt["words"][0, :n]  # (n, E)
        raw = regions @ words.t()  # (R, n)
        x = normalise_raw(raw, self.config.raw_feature_norm, dim=1)  # (R, n) across words, per region
        return torch.softmax(self.config.lambda_softmax * x.t(), dim=-1)  # (n, R) over regions

    def region_layout(self, batch: dict[str, Tensor]) -> tuple[int, int] | Tensor | None:
        """Where the regions of `batch["image"]` lie, for drawing: (h, w) of the grid (cells in row-major
        order), (B, R, 4) xyxy boxes as fractions of the image's width (x) and height (y), or None for
        precomputed features."""
        if self.config.regions == "precomputed":
            return None
        if self.config.regions == "boxes":
            H, W = batch["image"].shape[-2:]
            boxes = self.region_boxes(batch)  # (B, R, 4) pixels
            return boxes / boxes.new_tensor([W, H, W, H])  # (B, R, 4) fractions
        with torch.no_grad():
            h, w = self.image_tower(batch["image"][:1]).shape[-2:]
        return int(h), int(w)

    # ---- public face: SCAN ranks by cross attention, not by a dot product -------------------------------
    def image_embedding(self, feats: dict[str, Tensor]) -> Tensor:
        """`encode_image`'s vector: the mean of the l2-normalised regions (B, R, E) -> (B, E). A pooled
        summary for embedding pipelines; SCAN's own score (`similarity`) attends over the regions."""
        return feats["regions"].mean(1)  # (B, E)

    def text_embedding(self, feats: dict[str, Tensor]) -> Tensor:
        """`encode_text`'s vector: the mean of the caption's real words (B, L, E) -> (B, E)."""
        words, lengths = feats["words"], feats["lengths"]  # (B, L, E), (B,)
        real = torch.arange(words.shape[1], device=words.device)[None] < lengths[:, None]  # (B, L)
        return (words * real[..., None]).sum(1) / lengths[:, None].clamp(min=1)  # (B, E)

    def forward_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Both internal encoders and the all-pairs score of one batch (the internal face's forward)."""
        img, txt = self.encode_image_features(batch), self.encode_text_features(batch)
        return {**img, **txt, "scores": self.similarity(img, txt)}


_I2T = {"direction": "i2t", "lambda_softmax": 4.0, "lambda_lse": 5.0}  # the paper's i-t defaults (F30K)


@register_model(ScanConfig)
def scan_t2i(cfg: ScanConfig) -> ScanModel:
    """SCAN t-i LSE on the grid cells of the small CNN (the shapes setting; the paper uses 36 boxes)."""
    return ScanModel(cfg)


@register_model(ScanConfig, _I2T)
def scan_i2t(cfg: ScanConfig) -> ScanModel:
    """SCAN i-t LSE on the grid cells of the small CNN."""
    return ScanModel(cfg)


@register_model(ScanConfig, {"regions": "boxes"})
def scan_boxes(cfg: ScanConfig) -> ScanModel:
    """SCAN t-i LSE on box regions: the whole image plus `n_boxes` object boxes, pooled from the CNN map."""
    return ScanModel(cfg)


@register_model(ScanConfig, {"regions": "precomputed", "feature_dim": 2048})
def scan_precomputed(cfg: ScanConfig) -> ScanModel:
    """The paper's setup: 36 precomputed 2048-d bottom-up-attention regions per image, t-i LSE."""
    return ScanModel(cfg)


TINY = {"cnn_channels": (4, 4, 8), "image_size": 32, "word_dim": 8, "embed_dim": 16, "n_boxes": 3}


@register_model(ScanConfig, TINY)
def tiny_scan(cfg: ScanConfig) -> ScanModel:
    """A few thousand parameters, for tests (grid regions of a 32-px image: a 4 x 4 grid)."""
    return ScanModel(cfg)
