"""Checkpoints written by crossmatch 0.1.0 (before loss settings moved from model to loss config sections,
tests/fixtures/legacy_*) still load and score exactly as they did: the similarities of a fixed batch were
stored beside each checkpoint when it was written."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import crossmatch

FIXTURES = Path(__file__).parent / "fixtures"


CHECKPOINTS = [p for p in sorted(FIXTURES.glob("legacy_tiny_*")) if not p.name.endswith(".expected.safetensors")]


@pytest.mark.parametrize("path", CHECKPOINTS, ids=lambda p: p.name)
def test_a_legacy_checkpoint_loads_and_scores_as_before(path):
    model = crossmatch.load(path)
    expected = load_file(str(FIXTURES / f"{path.name.split('.')[0]}.expected.safetensors"))
    ids = expected["input_ids"]
    batch = {"image": expected["image"], "input_ids": ids, "attention_mask": ids != 0}
    with torch.no_grad():
        s = model.similarity(model.encode_image_features(batch), model.encode_text_features(batch))
    # same code path and batch shapes as when the fixture was written: equal up to BLAS kernel choice
    torch.testing.assert_close(s.float(), expected["similarity"], rtol=1e-5, atol=1e-6)
