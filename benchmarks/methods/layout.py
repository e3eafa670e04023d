"""Where the benchmark's records live, and reading and writing them.

The other modules read these paths as `layout.NAME` when they run, so a test can point them elsewhere
with `monkeypatch.setattr(layout, NAME, ...)`."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from .grid import Budget, budget_name

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
CELLS = RESULTS / "methods"
# cells of other budgets (`--steps`, `--student`): one folder per budget, never mixed into the main tables
BUDGETS = RESULTS / "budgets"
# rebuilt teachers measured interchangeable with an earlier one (`recheck`): fingerprint -> evidence
EQUIVALENCE = RESULTS / "teacher_equivalence.json"
RUNS = REPO / "runs" / "methods"
DOC = REPO / "docs" / "benchmark.md"


def cells_dir(budget: Budget, main: Path | None = None) -> Path:
    """Where a budget's finished cells live: the main grid's in `main` (default CELLS), any other budget's
    in BUDGETS/<name>."""
    return (CELLS if main is None else main) if budget == Budget() else BUDGETS / budget_name(budget)


def report_path(budget: Budget) -> Path:
    return RESULTS / "methods.md" if budget == Budget() else BUDGETS / f"{budget_name(budget)}.md"


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def load_cells(folder: Path, budget: Budget) -> list[dict]:
    return [
        r
        for r in (json.loads(p.read_text()) for p in sorted(folder.glob("*.json")))
        if r["budget"] == asdict(budget)
    ]


def splice(path: Path, marker: str, text: str) -> None:
    """Replace what stands between `<!-- marker -->` and `<!-- /marker -->` in `path` (atomically); no markers, no change."""
    if not path.exists():
        return
    content = path.read_text()
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    if start not in content or end not in content:
        return
    head, rest = content.split(start, 1)
    tail = rest.split(end, 1)[1]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{head}{start}\n{text}\n{end}{tail}")
    os.replace(tmp, path)
