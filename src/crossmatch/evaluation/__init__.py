"""Retrieval evaluation: encode, score all pairs in chunks, measure; galleries."""
