"""Blocks shared by the model families: image towers, the GRU text tower, normalisation and masking.

Legend: B batch, C channels, h/w feature-map height/width, R regions (h*w grid cells or boxes),
L tokens, D width, E embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from crossmatch.errors import ModelError


def l2norm(x: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """x / (||x|| + eps) along `dim` (the SCAN/VSE++ convention: eps added to the norm)."""
    return x / (x.pow(2).sum(dim, keepdim=True).sqrt() + eps)


class SmallCNN(nn.Module):
    """The classic small CNN of the VSE++ toy setups: 3 x (conv5x5 -> ReLU -> maxpool 2) -> (B, C, h, w)."""

    def __init__(self, channels: tuple[int, ...] = (32, 32, 64), batch_norm: bool = True):
        super().__init__()
        layers, c_in = [], 3
        for c in channels:
            norm = nn.BatchNorm2d(c) if batch_norm else nn.Identity()
            layers += [nn.Conv2d(c_in, c, 5, padding=2), norm, nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.out_channels = c_in

    def forward(self, x: Tensor) -> Tensor:
        # channels_last (NHWC) lets oneDNN on CPU (and cuDNN) use their faster kernels: 12-20% of this CNN's
        # forward + backward on 2 CPU cores (benchmarks/train_throughput.py); same numbers to float rounding.
        return self.body(x.contiguous(memory_format=torch.channels_last))  # (B, C, H/8, W/8), NHWC strides


class ResNetTower(nn.Module):
    """torchvision ResNet-18/50 without its pooling and classifier: (B, 3, H, W) -> (B, C, H/32, W/32)."""

    def __init__(self, name: str, pretrained: bool = False):
        super().__init__()
        weights = {"resnet18": "IMAGENET1K_V1", "resnet50": "IMAGENET1K_V2"}[name] if pretrained else None
        net = getattr(torchvision.models, name)(weights=weights)  # downloads weights when pretrained
        self.body = nn.Sequential(*list(net.children())[:-2])
        self.out_channels = net.fc.in_features

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def build_image_tower(
    name: str, pretrained: bool = False, cnn_channels: tuple[int, ...] = (32, 32, 64), batch_norm: bool = True
) -> nn.Module:
    """Image backbone by name: `cnn` (SmallCNN), `resnet18`, `resnet50`. Output: a (B, C, h, w) map."""
    if name == "cnn":
        return SmallCNN(tuple(cnn_channels), batch_norm)
    if name in ("resnet18", "resnet50"):
        return ResNetTower(name, pretrained)
    raise ModelError(f"unknown image tower {name!r}; known: cnn, resnet18, resnet50")


class GRUTextEncoder(nn.Module):
    """Word embedding -> (bi)GRU. Returns per-word states (B, L, D) and the sentence state (B, D).

    A bidirectional GRU averages its two directions (SCAN's convention), so D = hidden either way.
    Padded positions are never read: the sequence is packed by its true lengths. (A forward-only GRU run on
    the padded batch, with padded states zeroed, gives the same numbers and measured no faster on CPU:
    680.8 vs 687.4 ms for forward + backward of a 128-caption batch, `benchmarks/train_throughput.py --fixes`.)
    """

    def __init__(self, vocab_size: int, word_dim: int = 300, hidden: int = 1024, bidirectional: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.gru = nn.GRU(word_dim, hidden, batch_first=True, bidirectional=bidirectional)
        self.bidirectional = bidirectional
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        B, L = input_ids.shape
        lengths = attention_mask.sum(1).clamp(min=1).cpu()  # (B,)
        x = self.embed(input_ids)  # (B, L, word_dim)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, h_n = self.gru(packed)  # h_n: (num_dirs, B, D)
        words, _ = pad_packed_sequence(out, batch_first=True, total_length=L)  # (B, L, num_dirs*D)
        if self.bidirectional:
            D = words.shape[-1] // 2
            words = (words[..., :D] + words[..., D:]) / 2  # (B, L, D)
        sentence = h_n.mean(0)  # (B, D): last state of each direction, averaged
        return words, sentence


def feature_map_to_regions(fmap: Tensor) -> Tensor:
    """(B, C, h, w) grid -> (B, R=h*w, C) region features."""
    return fmap.flatten(2).transpose(1, 2)


def pool_boxes(fmap: Tensor, boxes: Tensor, image_size: int | tuple[int, int] | list[int], out: int = 2) -> Tensor:
    """Bilinear box pooling (RoIAlign-like) with `affine_grid` + `grid_sample`.

    Args:
        fmap: (B, C, h, w) feature map of images of `image_size`: a side S, or (H, W) for non-square inputs
            (x is scaled by W, y by H).
        boxes: (B, K, 4) boxes as (x0, y0, x1, y1) in pixels of the input image.
        out: each box is sampled on an (out x out) grid and averaged.
    Returns:
        (B, K, C) one feature per box.
    """
    B, C, h, w = fmap.shape
    K = boxes.shape[1]
    H, W = (image_size, image_size) if isinstance(image_size, (int, float)) else image_size
    frame = boxes.new_tensor([W, H, W, H])  # (4,) the x0, y0, x1, y1 extents
    b = boxes.reshape(B * K, 4) / frame * 2 - 1  # (B*K, 4) in [-1, 1]
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    sx, sy = (b[:, 2] - b[:, 0]) / 2, (b[:, 3] - b[:, 1]) / 2
    theta = torch.zeros(B * K, 2, 3, device=fmap.device, dtype=fmap.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, sy, cy
    grid = F.affine_grid(theta, [B * K, C, out, out], align_corners=False)  # (B*K, out, out, 2)
    grid = grid.view(B, K * out, out, 2)  # all boxes of an image sampled in one call, no copy of fmap
    sampled = F.grid_sample(fmap, grid, mode="bilinear", align_corners=False)  # (B, C, K*out, out)
    return sampled.view(B, C, K, out * out).mean(-1).transpose(1, 2)  # (B, K, C)
