"""Write the config-key tables of the docs from the config dataclasses and the comment on each field.

A page asks for a table with a pair of markers; everything between them is rewritten:

    <!-- BEGIN config-keys crossmatch.config.TrainConfig train -->
    <!-- END config-keys -->

The first word after `config-keys` is the dataclass (module.Class), the second the key prefix shown in the
table (`train` gives `train.epochs`; `model` for a model's config). A field's meaning is the comment on its
line, else the comment lines right above it. `python scripts/config_docs.py` rewrites every page of docs/;
`--check` only reports the pages that are out of date (exit 1), as tests/test_docs.py does.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import io
import re
import sys
import textwrap
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REGION = re.compile(r"(<!-- BEGIN config-keys (\S+) (\S+) -->\n)(.*?)(<!-- END config-keys -->)", re.S)


def field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment} read from the class source: the comment on the field's line(s), else the
    full-line comments right above it."""
    text = textwrap.dedent(inspect.getsource(cls))
    lines = text.splitlines()
    comments: dict[int, str] = {}  # line number (1-based) -> trailing or full-line comment
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out = {}
    for node in ast.parse(text).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        above, n = [], node.lineno - 1
        while n >= 1 and lines[n - 1].strip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        out[node.target.id] = " ".join(trailing or above)
    return out


def _value(value: object) -> str:
    """A default as it is written in a YAML config."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("*", "\\*")


def table(cls: type, prefix: str) -> str:
    """The markdown table of a config dataclass: key, default, meaning. Nested dataclasses (sections such as
    `loss.albef`) are left to tables of their own."""
    comments: dict[str, str] = {}
    for base in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):  # inherited fields too
        comments.update({k: v for k, v in field_comments(base).items() if v})
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = f.default
        if dataclasses.is_dataclass(default):
            continue
        rows.append(f"| `{prefix}.{f.name}` | `{_cell(_value(default))}` | {_cell(comments.get(f.name, ''))} |")
    return "\n".join(rows) + "\n"


def _class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def render(text: str) -> str:
    """The page with every config-keys region rewritten."""
    return REGION.sub(lambda m: m[1] + table(_class(m[2]), m[3]) + m[5], text)


def pages() -> list[Path]:
    return sorted(p for p in DOCS.glob("*.md") if REGION.search(p.read_text()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="report out-of-date pages instead of writing them")
    args = p.parse_args(argv)
    stale = []
    for page in pages():
        text = page.read_text()
        new = render(text)
        if new != text:
            stale.append(page.relative_to(ROOT))
            if not args.check:
                page.write_text(new)
    verb = "out of date" if args.check else "rewritten"
    for page in stale:
        print(f"{page}: {verb}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
