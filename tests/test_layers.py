"""The package's imports follow its architecture: data -> models -> losses -> tasks -> engine -> retrieval
-> runs -> search -> cli. A module may import its own layer and any layer below it, never one above; only
the CLI (and `__main__`) imports `crossmatch.cli`. Some layers also stay independent of layers below them
(INDEPENDENT). Function-level imports count too (walked with `ast`)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "crossmatch"
# Lowest first. The base holds what every layer may use: errors, config schema helpers (fields) and the run
# config, durable files, the pure metrics, tensor/collective helpers, and where offline weights live.
LAYERS = [
    {"errors", "config", "fields", "files", "metrics", "progress", "tensors", "weights"},
    {"data"},
    {"models"},
    {"losses"},
    {"tasks"},
    {"engine"},
    {"retrieval"},
    {"runs"},
    {"search", "api"},
    {"cli", "__main__"},
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}
# Lower layers a layer never imports although it may: the engine drives any loader (it knows no dataset), and
# retrieval scores any model's features (it knows no task and no training). Not (yet) in the contract: engine ->
# models (checkpoint.py takes the export file names from models/face.py, optim.py and trainer.py protocols from
# models/protocols.py) and engine -> tasks (optim.py types its argument with tasks/base.py's Task).
INDEPENDENT = {"engine": {"data"}, "retrieval": {"tasks", "engine"}}


def top_part(module: str) -> str:
    """'crossmatch.data.shapes' -> 'data'."""
    return module.split(".")[1]


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("crossmatch."):
            out.append(node.module)
        elif isinstance(node, ast.ImportFrom) and node.module == "crossmatch":
            out += [f"crossmatch.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("crossmatch.")]
    return out


def modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel == Path("__init__.py"):  # the public API facade imports lazily from every layer
            continue
        yield path, rel.parts[0].removesuffix(".py")


def test_every_module_belongs_to_a_layer():
    unknown = sorted({part for _, part in modules() if part not in LEVEL})
    assert not unknown, f"modules outside the layer table: {unknown}"


@pytest.mark.parametrize(
    "path,part", list(modules()), ids=lambda x: str(x.relative_to(SRC)) if isinstance(x, Path) else ""
)
def test_no_import_from_a_higher_or_independent_layer(path, part):
    upward = [m for m in imports_of(path) if LEVEL.get(top_part(m), -1) > LEVEL[part]]
    assert not upward, f"{path.relative_to(SRC)} ({part}) imports higher layers: {upward}"
    across = [m for m in imports_of(path) if top_part(m) in INDEPENDENT.get(part, ())]
    assert not across, f"{path.relative_to(SRC)} ({part}) imports layers it stays independent of: {across}"


def test_models_import_no_run_config(tmp_path):
    # A model's config is its own dataclass built on crossmatch.fields; the run config is the caller's business.
    in_models = [path for path, part in modules() if part == "models"]
    offenders = [str(path.relative_to(SRC)) for path in in_models if "crossmatch.config" in imports_of(path)]
    assert not offenders, f"models importing crossmatch.config: {offenders}"
    late = tmp_path / "m.py"  # the walk sees such an import inside a function too
    late.write_text("def save(self):\n    from crossmatch.config import config_to_dict\n")
    assert imports_of(late) == ["crossmatch.config"]


def test_the_layer_walk_catches_an_upward_import(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from crossmatch.cli.main import main\n")
    assert imports_of(bad) == ["crossmatch.cli.main"] and LEVEL["cli"] > LEVEL["models"]
    # a lower layer that an independent one may not import either: engine -> data, retrieval -> tasks
    bad.write_text("from crossmatch.data import loaders\nimport crossmatch.tasks.base\n")
    assert imports_of(bad) == ["crossmatch.data", "crossmatch.tasks.base"]
    assert "data" in INDEPENDENT["engine"] and "tasks" in INDEPENDENT["retrieval"]
