"""The README and the docs say what the code does: the site builds strictly, every ```python block runs,
every `crossmatch ...` line of a ```bash block parses and its overrides load, every repository path named
exists, and no build-machine path or internal work-item reference is left in the tree. Also the claims the
docs make about the CLI itself (defaults in --help, the search example, the demo's curves, the version)."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

import crossmatch
from crossmatch.cli.help import HelpFormatter, has_default
from crossmatch.cli.main import _parser, main, parse_args
from crossmatch.config import CheckpointConfig, LossConfig, load_config
from crossmatch.models.registry import model_config
from tests.helpers import ROOT, train_args

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"<!-- skip-exec: (.*?) -->")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(page: Path, lang: str) -> list[tuple[str, str | None]]:
    """(code, skip reason or None) of every ```lang block of a page, in order; a block is skipped when the line
    right before its fence is `<!-- skip-exec: REASON -->`."""
    text, out = page.read_text(), []
    for m in FENCE.finditer(text):
        if m[1] == lang:
            before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            skip = SKIP.fullmatch(before.strip())
            out.append((m[2], skip[1] if skip else None))
    return out


# ---------------------------------------------------------------------------------------------- the site


def test_the_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "OnnxDualEncoder" in api and "create_model_and_transforms" in api  # mkdocstrings rendered the API
    config = (tmp_path / "site" / "config" / "index.html").read_text()
    assert "train.accum_steps" in config


@pytest.fixture(scope="module")
def config_docs():
    """scripts/config_docs.py as a module (in-process: torch and the model modules are loaded once)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import config_docs
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return config_docs


def test_the_config_tables_are_current(config_docs):
    pages = config_docs.pages()
    assert {p.name for p in pages} >= {"config.md", "models.md"}
    stale = [p.name for p in pages if config_docs.render(p.read_text()) != p.read_text()]
    assert not stale, f"run `python scripts/config_docs.py`: {stale} out of date"


def test_config_tables_take_each_fields_comment(config_docs):
    table = config_docs.table(CheckpointConfig, "checkpoint")
    assert table.splitlines()[2] == (
        "| `checkpoint.keep_last` | `0` | full-state per-epoch checkpoints (epoch_XXXX.pt) kept besides last.pt and "
        "best.pt |"
    )
    loss = config_docs.table(LossConfig, "loss")
    # a comment block above the field, `|` escaped, nested sections left to their own tables
    assert "| `loss.text_negatives` | `0` | K perturbed captions per pair" in loss and "loss.albef" not in loss
    assert "hinge (VSE++) \\| infonce" in loss and "| `loss.init_logit_scale` | `null` |" in loss


# -------------------------------------------------------------------------------------- the python blocks


def test_every_page_with_python_blocks_is_executed_and_skips_say_why(capsys):
    found = {p.name: blocks(p, "python") for p in PAGES}
    assert found["README.md"] and all(code for b in found.values() for code, _ in b)
    skipped = [(name, reason) for name, b in found.items() for _, reason in b if reason is not None]
    with capsys.disabled():  # the list of skipped blocks, for whoever reads the test log
        for name, reason in skipped:
            print(f"\nskipped python block in {name}: {reason}")
    assert all(reason.strip() for _, reason in skipped)


@pytest.fixture(scope="module")
def docs_workdir(shapes_root, tmp_path_factory):
    """A folder laid out as the docs assume: runs/vse (the quick start's run, trained tiny), data/shapes and
    configs/."""
    work = tmp_path_factory.mktemp("docs")
    assert main(train_args(shapes_root, work / "runs" / "vse", "train.epochs=1")) == 0
    (work / "data").mkdir()
    (work / "data" / "shapes").symlink_to(shapes_root)
    (work / "configs").symlink_to(ROOT / "configs")
    return work


EXECUTED = [p for p in PAGES if any(reason is None for _, reason in blocks(p, "python"))]


@pytest.mark.slow
@pytest.mark.parametrize("page", EXECUTED, ids=lambda p: p.name)
def test_every_python_block_runs(page, docs_workdir, monkeypatch):
    monkeypatch.chdir(docs_workdir)
    namespace: dict = {}
    for code, reason in blocks(page, "python"):
        if reason is None:
            exec(compile(code, str(page.name), "exec"), namespace)  # noqa: S102 - our own docs
    if page.name == "README.md":  # the README's comment on preprocess: a normalised float32 tensor
        pixels = namespace["preprocess"](namespace["photo"])
        assert pixels.dtype == torch.float32
        assert pixels.ndim == 3 and pixels.shape[0] == 3 and pixels.min() < 0  # mean-subtracted, not uint8


# ------------------------------------------------------------------------------------ the example files

EXAMPLE = re.compile(r"<!-- example-file: (\S+) -->")


def example_files(page: Path) -> dict[str, str]:
    """{file name: content} of the blocks that a page marks as example files."""
    text, out = page.read_text(), {}
    for m in FENCE.finditer(text):
        before = EXAMPLE.fullmatch(text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip())
        if before:
            out[before[1]] = m[2]
    return out


def test_the_example_files_of_the_data_page_read(tmp_path, capsys):
    from PIL import Image

    from crossmatch.config import DataConfig
    from crossmatch.data.formats import open_split
    from crossmatch.retrieval.compositional import read_negatives

    examples = example_files(ROOT / "docs" / "data.md")
    assert set(examples) == {
        "dataset.json",
        "dataset.jsonl",
        "train.csv",
        "reid_raw.json",
        "test_caps.txt",
        "test_negatives.jsonl",
    }
    for name, folder in (("dataset.json", "images"), ("dataset.jsonl", "images"), ("reid_raw.json", "imgs")):
        root = tmp_path / name
        (root / folder).mkdir(parents=True)
        (root / name).write_text(examples[name])
        text = examples[name]
        for image in re.findall(r'"(?:filename|image|file_path)": "([^"]+)"', text):
            (root / folder / image).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), "red").save(root / folder / image)
        assert main(["data", "validate", str(root)]) == 0, capsys.readouterr().err
        assert "no problems found" in capsys.readouterr().out
    root = tmp_path / "csv"  # a train table alone: two images, the first with two captions
    (root / "images").mkdir(parents=True)
    (root / "train.csv").write_text(examples["train.csv"])
    for image in ("000001.jpg", "000002.jpg"):
        Image.new("RGB", (16, 16), "red").save(root / "images" / image)
    split = open_split(DataConfig(root=str(root), format="csv"), "train")
    assert len(split.images) == 2 and split.txt_to_img == [0, 0, 1]
    assert main(["data", "validate", str(root), "--format", "csv"]) == 0, capsys.readouterr().err
    assert "no problems found" in capsys.readouterr().out
    root = tmp_path / "precomputed"
    root.mkdir()
    (root / "test_caps.txt").write_text(examples["test_caps.txt"])
    np.save(root / "test_ims.npy", np.zeros((1, 36, 2048), dtype=np.float16))  # one image, 5 captions
    split = open_split(DataConfig(root=str(root), format="scan_precomputed"), "test")
    assert len(split.images) == 1 and split.txt_to_img == [0] * 5
    (root / "images").mkdir()
    Image.new("RGB", (16, 16), "red").save(root / "images" / "011000.png")
    (root / "test_negatives.jsonl").write_text(examples["test_negatives.jsonl"])
    (triple,) = read_negatives(root / "test_negatives.jsonl", root)
    assert triple.type == "swap_relation"


# ------------------------------------------------------------------------------------- the command lines


def command_lines() -> list[tuple[str, list[str]]]:
    """(page, argv after `crossmatch`) of every crossmatch command line in the ```bash blocks."""
    out = []
    for page in PAGES:
        for code, _ in blocks(page, "bash"):
            for line in code.splitlines():
                words = shlex.split(line, comments=True)
                if words[:1] == ["crossmatch"]:
                    out.append((page.name, words[1:]))
                elif words[:1] == ["torchrun"] and "crossmatch" in words:
                    out.append((page.name, words[words.index("crossmatch") + 1 :]))
    return out


OVERRIDE = re.compile(r"^[a-z_]+(\.[a-z_0-9]+)+=")


def test_the_docs_show_command_lines():
    pages = {page for page, _ in command_lines()}
    assert {"README.md", "quickstart.md", "training.md", "evaluation.md", "search.md", "data.md"} <= pages


@pytest.mark.parametrize("page, argv", command_lines(), ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_every_command_line_parses_and_its_overrides_load(page, argv):
    try:
        args = parse_args(argv)
    except SystemExit as err:
        if err.code == 0 and {"--help", "-h", "--version"} & set(argv):
            return  # printed the help or the version, as asked
        pytest.fail(f"{page}: `crossmatch {' '.join(argv)}` does not parse (exit {err.code})")
    overrides = [w for w in argv if OVERRIDE.match(w)]
    config = getattr(args, "config", None) if args.command == "train" else None
    if config is not None:
        assert (ROOT / config).is_file(), f"{page}: config file {config} does not exist"
        config = ROOT / config
    cfg = load_config(config, overrides)  # unknown keys and wrong types raise ConfigError
    name = getattr(args, "model", None) or cfg.model["name"]
    model_keys = {k: v for k, v in cfg.model.items() if k != "name"}
    model_config(name, **model_keys)  # model.* keys are fields of that model's config


# ---------------------------------------------------------------------------------- paths and references


def tree_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "Makefile", ROOT / "mkdocs.yml", ROOT / "pyproject.toml"]
    for folder, patterns in (
        ("docs", ["*.md"]),
        ("configs", ["*.yaml"]),
        ("src", ["**/*.py"]),
        ("tests", ["*.py"]),
        ("benchmarks", ["*.py", "*.sh"]),
        ("scripts", ["*.py"]),
    ):
        for pattern in patterns:
            files += sorted((ROOT / folder).glob(pattern))
    return [f for f in files if f.resolve() != Path(__file__).resolve()]


REPO_PATH = re.compile(r"(?<![\w./-])((?:configs|src|benchmarks|docs|scripts|tests)/[A-Za-z0-9_./-]*[A-Za-z0-9_])")


def test_every_repository_path_named_exists():
    # docs/results.md is left out: its historical rows quote commands as they ran at their commit (scripts
    # since removed included); tests/test_results.py checks the paths of the rows measured at the current tree.
    docs = [f for f in sorted((ROOT / "docs").glob("*.md")) if f.name != "results.md"]
    named = [ROOT / "README.md", ROOT / "CHANGELOG.md", *docs]
    named += sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "src").glob("**/*.py"))
    missing = []
    for f in named:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            for path in REPO_PATH.findall(line):
                if not (ROOT / path).exists():
                    missing.append(f"{f.relative_to(ROOT)}:{n}: {path}")
    assert not missing, "\n".join(missing)


FORBIDDEN = {
    "a build machine's path": re.compile(r"/wor[k]/|/tm[p]/bench|/home/\w|/Users/\w|/root/"),
    # "#N" but not a CSS colour ("#222;") or a rank ("match #6"); "round 1/3" is a fraction
    "a work-item number": re.compile(
        r"\bissues? ?#?\d+|(?<![\w&/#])(?<!match )#\d+\b(?!;)|\b(session|turn|round)s? \d+\b(?![/.])", re.I
    ),
    "a file not in the repository": re.compile(r"\b(FIELD|STYLE)\.md\b"),
    "an unpublished distribution": re.compile(r"pip install crossmatch\["),
    "the released version's values as if older": re.compile(r"0\.1\.0's values|written by 0\.1\.0"),
}


def forbidden_hits(files: list[Path]) -> list[str]:
    hits = []
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            hits += [
                f"{f.relative_to(ROOT)}:{n}: {what}: {line.strip()[:100]}"
                for what, rx in FORBIDDEN.items()
                if rx.search(line)
            ]
    return hits


def test_no_machine_paths_or_work_item_references_in_the_tree():
    hits = forbidden_hits([f for f in tree_files() if f.parent.name != "benchmarks"])
    assert not hits, "\n".join(hits)


def test_no_machine_paths_or_work_item_references_in_the_benchmarks():
    hits = forbidden_hits([f for f in tree_files() if f.parent.name == "benchmarks"])
    assert not hits, "\n".join(hits)


def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert not re.search(r"\b\d+ (tests|passed)\b", text)  # no test count: it is stale by the next commit
    links = re.findall(r"\]\(([^)#]+)", text)
    assert links and all(not link.startswith(("http", "/")) for link in links)
    assert all((ROOT / link).exists() for link in links), [link for link in links if not (ROOT / link).exists()]
    results = text.split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in results.splitlines() if ln.startswith("| ") and not ln.startswith("| model")]
    assert 1 <= len(rows) <= 8 and "docs/results.md" in results


# ----------------------------------------------------------------------------- claims about the CLI itself


def subparsers(parser: argparse.ArgumentParser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subparsers(sub, (*path, name))


def test_help_shows_every_meaningful_default_once():
    seen = 0
    for path, parser in subparsers(_parser()):
        for action in parser._actions:
            if not action.option_strings or not action.help or action.help is argparse.SUPPRESS:
                continue
            meaningful = has_default(action)
            if meaningful:  # the formatter adds it; a help that states it too would print it twice
                assert "(default" not in action.help, (path, action.option_strings)
            text = HelpFormatter("crossmatch")._get_help_string(action)
            assert text.count("%(default)s") == (1 if meaningful else 0), (path, action.option_strings, text)
            seen += meaningful
    assert seen > 20
    for argv, shown in (
        (["data", "shapes"], "(default: 0)"),  # --seed
        (["index", "build"], "(default: 0)"),  # --workers
        (["features"], "(default: 0)"),  # --image-size
        (["data", "convert"], "(default: 1000)"),  # --shard-size, once
    ):
        page = dict(subparsers(_parser()))[tuple(argv)].format_help()
        assert shown in " ".join(page.split()), argv
        assert "(default 1000)" not in page


def test_the_search_help_example_names_an_image_data_shapes_writes():
    parsers = dict(subparsers(_parser()))
    shapes = {a.dest: a.default for a in parsers[("data", "shapes")]._actions}
    example = re.search(r"--image data/shapes/images/(\S+)", parsers[("search",)].epilog)[1]
    # image ids run train, val, test: the first test image of the default dataset
    assert example == f"{shapes['train'] + shapes['val']:06d}.png" == "011000.png"


def test_the_demo_curves_title_counts_the_val_images_used(shapes_root):
    from crossmatch.cli.demo import DEMO_OVERRIDES, curves_title

    cfg = load_config(None, [*DEMO_OVERRIDES, f"data.root={shapes_root}"])
    assert cfg.eval.max_images == 250
    assert curves_title(cfg).endswith("\nvalidation on 12 val images")  # the fixture's val split has 12
    cfg = load_config(None, [*DEMO_OVERRIDES, f"data.root={shapes_root}", "eval.max_images=5"])
    assert curves_title(cfg).endswith("\nvalidation on 5 val images")


def test_the_version_has_one_home(capsys):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "crossmatch.__version__"}
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"crossmatch {crossmatch.__version__}\n"
    released = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", (ROOT / "CHANGELOG.md").read_text(), flags=re.M)
    assert released[0] == crossmatch.__version__  # the newest released entry of the changelog


def test_install_hints_name_the_clone_install():
    from crossmatch.errors import install_hint

    assert install_hint("export") == 'the crossmatch[export] extra: pip install -e ".[export]" in the crossmatch clone'


def test_every_reliability_promise_names_a_test_that_exists():
    page = (ROOT / "docs" / "reliability.md").read_text()
    names = [n for n in re.findall(r"`([a-z0-9_]+)`", page) if n.count("_") >= 3]  # test names, not functions
    files = re.findall(r"`(tests/(?:\w+/)?test_reliability\.py)`", page.split("\n\n")[1])
    assert files == ["tests/test_reliability.py", "tests/runs/test_reliability.py", "tests/data/test_reliability.py"]
    tests = {n for f in files for n in re.findall(r"^def test_(\w+)\(", (ROOT / f).read_text(), flags=re.M)}
    assert len(names) >= 30 and [n for n in names if n not in tests] == []
