"""Every ```python block of the README runs, in order, in a folder holding the tiny run that the README's
quick start would have trained at runs/vse (a shorter one: same commands, tiny data)."""

import os
import re
from pathlib import Path

import pytest

from crossmatch.cli.main import main
from tests.conftest import ROOT, train_args

BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_the_readme_has_python_blocks():
    assert BLOCKS and all("import crossmatch" in b or "crossmatch." in b for b in BLOCKS)


@pytest.mark.slow
def test_every_python_block_of_the_readme_runs(shapes_root, tmp_path, monkeypatch, capsys):
    assert main(train_args(shapes_root, tmp_path / "runs" / "vse", "train.epochs=1")) == 0
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in BLOCKS:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README is ours
    assert Path(os.getcwd()) == tmp_path
