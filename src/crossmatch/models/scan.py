"""SCAN: Stacked Cross Attention for image-text matching (Lee et al., ECCV 2018).

The SCAN model lives here; its batched scoring function lives in `crossmatch.models.scan_scoring`.
"""

from crossmatch.models.scan_scoring import scan_similarity  # noqa: F401

__all__ = ["scan_similarity"]
