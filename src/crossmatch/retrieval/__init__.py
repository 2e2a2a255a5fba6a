"""Retrieval evaluation: encode a split once, score all pairs in chunks, re-rank with fusion models, and
measure (image-text retrieval, COCO folds, twins, person search)."""
