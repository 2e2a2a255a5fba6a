"""results/runs.jsonl: every row valid, and docs/results.md exactly what scripts/results.py renders from the rows."""

import copy
from pathlib import Path

import pytest

from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results():
    return load_script("results")


@pytest.fixture(scope="module")
def rows(results):
    return results.load_rows()


@pytest.fixture(scope="module")
def sections(results):
    return results.load_tables()


def test_every_row_is_valid(results, rows, sections):
    assert results.validate_rows(rows, sections) == []
    assert {r["status"] for r in rows} == {"measured", "historical"}  # both kinds are present


def test_the_page_is_up_to_date(results, rows, sections):
    page = (ROOT / "docs" / "results.md").read_text()
    assert page == results.render(rows, sections), "docs/results.md is stale: run python scripts/results.py"


def test_every_table_shows_rows_and_every_row_a_table(results, rows, sections):
    tables = [t["id"] for s in sections for t in s["tables"]]
    assert len(tables) == len(set(tables))
    assert {t for r in rows for t in results.tables_of(r)} == set(tables)


def test_bad_rows_are_named_one_problem_per_line(results, rows, sections):
    good = rows[0]
    missing_commit = {k: v for k, v in good.items() if k != "commit"}
    bad_status = {**copy.deepcopy(good), "id": "x1", "status": "guessed"}
    short_commit = {**copy.deepcopy(good), "id": "x2", "commit": "abc"}
    machine_path = {**copy.deepcopy(good), "id": "x3", "command": "crossmatch train c.yaml data.root=/tmp/shapes"}
    no_load = {**copy.deepcopy(good), "id": "x4", "machine": {"device": "CPU", "threads": 1}}
    unknown_table = {**copy.deepcopy(good), "id": "x5", "table": [good["table"], "nowhere"]}
    gone = {**copy.deepcopy(good), "id": "x6", "status": "measured", "command": "python benchmarks/gone.py --x 1"}
    errors = results.validate_rows(
        [missing_commit, bad_status, short_commit, machine_path, no_load, unknown_table, gone, good], sections
    )
    assert errors == [
        f"row 1 ({good['id']}): missing commit",
        "row 2 (x1): status 'guessed' is not one of measured, historical",
        "row 3 (x2): commit 'abc' is not a commit hash",
        "row 4 (x3): command must be given, without a machine's absolute path",
        "row 5 (x4): machine must be an object with device, threads, load",
        "row 6 (x5): table 'nowhere' is not in tables.yaml",
        "row 7 (x6): a measured command names benchmarks/gone.py, which does not exist",
        f"row 8 ({good['id']}): duplicate id",
    ]


def test_a_table_renders_its_columns_and_runs(results):
    row = {
        "id": "r", "table": "t", "label": "a | b", "budget": {"text": "2 steps"}, "metrics": {"rsum": 500.0, "x": 1.5},
        "wall_s": 3.0, "machine": {"device": "CPU", "threads": 2, "load": "1.2"}, "commit": "abcdef1",
        "status": "measured", "command": "crossmatch demo", "data": None, "note": "n",
    }  # fmt: skip
    table = {"id": "t", "title": "T", "training": True, "columns": [["rsum / x", "rsum x"], ["all", "all"]]}
    assert results.render_table(table, [row]) == [
        "### T",
        "",
        "| # | run | training | rsum / x | all |",
        "|---|---|---|---|---|",
        "| 1 | a \\| b *(measured)* | 2 steps | 500.0 / 1.5 | rsum 500.0; x 1.5 |",
        "",
        "Runs:",
        "",
        "1. `crossmatch demo` (wall 3.0 s, CPU, 2 threads, load 1.2, measured at `abcdef1`). n",
        "",
    ]
