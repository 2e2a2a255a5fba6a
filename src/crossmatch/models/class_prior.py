"""The image tower's own classifier as a prior in the text space (ConSE: Norouzi et al., "Zero-Shot Learning by
Convex Combination of Semantic Embeddings", ICLR 2014).

An ImageNet-trained image tower already names what it sees. `ClassNamePrior` turns its pooled features into
the probability-weighted sum of the text tower's embeddings of its top-k class names ("A {name}."), a unit
vector in the text tower's space: a caption-like guess that needs no training (ranking by it alone is the
training-free row of the Tux Paint results, docs/results.md). `vse_pretrained` with `model.image_prior:
class_names` concatenates it to the pooled features before the image projection, so with few training pairs
the projection starts from what the classifier knows instead of learning every concept from the pairs. The
classifier and the name embeddings are frozen (and kept in the state dict, so a checkpoint rebuilds the same
prior).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from crossmatch.models.layers import l2norm

TEMPLATE = "A {}."  # the caption-like sentence each class name is embedded in


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order, the first synonym of each (timm's ImageNetInfo)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i).split(",")[0] for i in range(1000)]


class ClassNamePrior(nn.Module):
    """Pooled image features (B, C) -> (B, D): ConSE's top-k probability-weighted class-name embeddings,
    l2-normalised and scaled by sqrt(D) (unit mean square per dimension, the scale of the tower's pooled
    features rather than a 1/sqrt(D) sliver of them beside it).

    Args:
        classifier: the tower's frozen linear head, C -> K classes.
        names: (K, D) the text tower's embeddings of the K class names (any norm; normalised here).
        top_k: how many of the most probable classes are mixed (ConSE's T).
    """

    def __init__(self, classifier: nn.Linear, names: Tensor, top_k: int = 5):
        super().__init__()
        self.classifier, self.top_k = classifier, top_k
        self.register_buffer("names", l2norm(names.detach().float()))  # (K, D)
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        self.out_dim = names.shape[1]

    def scores(self, pooled: Tensor) -> Tensor:
        """(B, C) -> (B, D) unit vectors: sum over the top-k classes of p(class) * name embedding."""
        probs = self.classifier(pooled.to(self.classifier.weight.dtype)).softmax(-1)  # (B, K)
        top = probs.topk(self.top_k, dim=1)  # values, indices (B, k)
        return l2norm((top.values[..., None] * self.names[top.indices]).sum(1))  # (B, D)

    def forward(self, pooled: Tensor) -> Tensor:
        """(B, C) -> (B, D) with per-dimension scale ~1 (see the class doc)."""
        return self.scores(pooled) * math.sqrt(self.out_dim)

    def train(self, mode: bool = True) -> ClassNamePrior:
        return super().train(False)  # frozen: no dropout or statistics to move


@torch.no_grad()
def embed_names(embed: Callable[[list[str]], Tensor], names: list[str], batch_size: int = 128) -> Tensor:
    """`embed(list of sentences) -> (n, D)` over TEMPLATE-wrapped names, in batches: (K, D)."""
    sentences = [TEMPLATE.format(n) for n in names]
    return torch.cat([embed(sentences[i : i + batch_size]) for i in range(0, len(sentences), batch_size)])
