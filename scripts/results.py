"""Render docs/results.md from the measured runs in results/runs.jsonl and the layout in results/tables.yaml.

    python scripts/results.py            # validate the rows, write docs/results.md
    python scripts/results.py --check    # exit 1 when docs/results.md is not what the rows render to

One row per measured run (one JSON object per line). Every row carries what reproduces it: the model, the config
file and its overrides, the data (name, split, size), the training budget, the metrics, the wall time, the machine
(device, threads, load average), the crossmatch version and commit, and the exact command. `status` is `measured`
for a run made at `commit` with the command as written, `historical` for a figure measured earlier, at `commit`
(the commit that recorded it), possibly with a script that has since been removed. `table` names the table the row
shows in, or lists the tables when one run belongs to several (a recipe's run that is also seed 0 of a comparison).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "results" / "runs.jsonl"
TABLES = ROOT / "results" / "tables.yaml"
PAGE = ROOT / "docs" / "results.md"

REQUIRED = (
    "id", "table", "label", "model", "config", "overrides", "data", "budget", "metrics", "wall_s", "machine",
    "version", "commit", "command", "status",
)  # fmt: skip
STATUSES = ("measured", "historical")
MACHINE_KEYS = ("device", "threads", "load")
BUDGET_KEYS = ("steps", "batch", "pairs_seen", "text")
DATA_KEYS = ("name", "split", "size")
COMMIT = re.compile(r"^[0-9a-f]{7,40}$")
REPO_PATH = re.compile(r"\b(?:benchmarks|configs|scripts|src|tests)/[\w./-]*\w")
MACHINE_PATH = re.compile(r"(^|[\s=:'\"(])/(work|tmp|home|root|Users|mnt|scratch)/")


def load_rows(path: Path = ROWS) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path.name} line {n}: not JSON ({e.msg})") from None
    return rows


def load_tables(path: Path = TABLES) -> list[dict]:
    return yaml.safe_load(path.read_text())["sections"]


def tables_of(row: dict) -> list:
    """The tables a row shows in: its "table", one id or a list of ids."""
    return row["table"] if isinstance(row["table"], list) else [row["table"]]


def validate_rows(rows: list[dict], sections: list[dict]) -> list[str]:
    """Every problem of the rows as one line each (empty: valid)."""
    tables = {t["id"] for s in sections for t in s["tables"]}
    errors, seen = [], set()
    for n, row in enumerate(rows, 1):
        where = f"row {n} ({row.get('id', '?')})"
        if row.get("id") in seen:
            errors.append(f"{where}: duplicate id")
        seen.add(row.get("id"))
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            errors.append(f"{where}: missing {', '.join(missing)}")
            continue
        if row["status"] not in STATUSES:
            errors.append(f"{where}: status {row['status']!r} is not one of {', '.join(STATUSES)}")
        if not isinstance(row["commit"], str) or not COMMIT.match(row["commit"]):
            errors.append(f"{where}: commit {row['commit']!r} is not a commit hash")
        for table in tables_of(row):
            if table not in tables:
                errors.append(f"{where}: table {table!r} is not in {TABLES.name}")
        if not isinstance(row["metrics"], dict) or not row["metrics"]:
            errors.append(f"{where}: metrics must be a non-empty object")
        elif any(v is not None and not isinstance(v, (int, float, str)) for v in row["metrics"].values()):
            errors.append(f"{where}: a metric must be a number, a string or null")
        for key, keys in (("machine", MACHINE_KEYS), ("budget", BUDGET_KEYS), ("data", DATA_KEYS)):
            value = row[key]
            if value is None and key == "data":
                continue
            if not isinstance(value, dict) or any(k not in value for k in keys):
                errors.append(f"{where}: {key} must be an object with {', '.join(keys)}")
        if not isinstance(row["overrides"], list):
            errors.append(f"{where}: overrides must be a list")
        if not row["command"] or MACHINE_PATH.search(row["command"]):
            errors.append(f"{where}: command must be given, without a machine's absolute path")
        elif row["status"] == "measured":  # a historical command may name a script removed since its commit
            gone = [p for p in REPO_PATH.findall(row["command"]) if not (ROOT / p).exists()]
            if gone:
                errors.append(f"{where}: a measured command names {', '.join(gone)}, which does not exist")
    return errors


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e6:
        return f"{value:.1f}"
    return str(value)


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def column(row: dict, keys: str) -> str:
    metrics = row["metrics"]
    if keys == "all":
        return "; ".join(f"{k} {fmt(v)}" for k, v in metrics.items())
    return " / ".join(fmt(metrics.get(k)) for k in keys.split())


def run_line(n: int, row: dict) -> str:
    m = row["machine"]
    facts = []
    if row["wall_s"] is not None:
        facts.append(f"wall {fmt(row['wall_s'])} s")
    facts.append(m["device"])
    if m["threads"] is not None:
        facts.append(f"{m['threads']} thread{'s' if m['threads'] != 1 else ''}")
    if m["load"] is not None:
        facts.append(f"load {m['load']}")
    facts.append(f"{row['status']} at `{row['commit']}`")
    text = f"{n}. `{row['command']}` ({', '.join(facts)})"
    if row.get("note"):
        text += f". {row['note']}"
    return text


def render_table(table: dict, rows: list[dict]) -> list[str]:
    heads = ["#", "run"] + (["training"] if table.get("training") else []) + [c[0] for c in table["columns"]]
    out = [f"### {table['title']}", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for n, row in enumerate(rows, 1):
        cells = [str(n), row["label"] + (" *(measured)*" if row["status"] == "measured" else "")]
        if table.get("training"):
            cells.append(row["budget"]["text"] or "-")
        cells += [column(row, keys) for _, keys in table["columns"]]
        out.append("| " + " | ".join(cell(c) for c in cells) + " |")
    data = sorted({f"{r['data']['name']}, {r['data']['split']} split, {r['data']['size']}" for r in rows if r["data"]})
    if data:
        out += ["", "Data: " + "; ".join(d.replace(", None split", "") for d in data) + "."]
    return out + ["", "Runs:", ""] + [run_line(n, row) for n, row in enumerate(rows, 1)] + [""]


def render(rows: list[dict], sections: list[dict]) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    out = [
        "# Results",
        "",
        "<!-- Generated by scripts/results.py from results/runs.jsonl and results/tables.yaml: edit those. -->",
        "",
        f"Every figure below is a row of `results/runs.jsonl` ({len(rows)} rows: {counts['measured']} measured,"
        f" {counts['historical']} historical). A *measured* row was re-run at the commit it names with the command as"
        " written; a *historical* row was measured earlier and carries the commit that recorded it (some of their"
        " commands name research scripts that have since left `benchmarks/`; check out that commit to re-run them)."
        " `DATA` is a dataset folder made by `crossmatch data shapes` (seed 0) or `crossmatch data tuxpaint`, `RUN`"
        " and `R` run folders. All runs are CPU runs on a shared 2-core machine unless a row says otherwise: the"
        " load average and thread count are part of each row, and the budgets are far below convergence.",
        "",
    ]
    for section in sections:
        out += [f"## {section['title']}", "", section["findings"].strip(), ""]
        for table in section["tables"]:
            chosen = [r for r in rows if table["id"] in tables_of(r)]
            if chosen:
                out += render_table(table, chosen)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/results.md is out of date")
    args = p.parse_args(argv)
    rows, sections = load_rows(), load_tables()
    errors = validate_rows(rows, sections)
    if errors:
        print("\n".join(f"results: error: {e}" for e in errors), file=sys.stderr)
        return 2
    page = render(rows, sections)
    if args.check:
        if not PAGE.exists() or PAGE.read_text() != page:
            print("results: docs/results.md is out of date: run python scripts/results.py", file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(exist_ok=True)
    PAGE.write_text(page)
    print(f"wrote {PAGE.relative_to(ROOT)} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
