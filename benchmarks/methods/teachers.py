"""Which teacher a cell was distilled from, the teachers measured interchangeable with each other
(`layout.EQUIVALENCE`), and each recorded teacher's own figures (benchmarks/results/methods_teacher.json)."""

from __future__ import annotations

import json
from pathlib import Path

from . import layout
from .grid import LEGACY_TEACHER


def alias_chain(fp: str, aliases: dict[str, str] | None) -> list[str]:
    """`fp`, then each earlier teacher it was measured interchangeable with, to the first (a cycle ends it)."""
    chain = [fp]
    while aliases and chain[-1] in aliases and aliases[chain[-1]] not in chain:
        chain.append(aliases[chain[-1]])
    return chain


def cell_teacher(record: dict, aliases: dict[str, str] | None = None) -> str:
    """The fingerprint of the teacher a cell was distilled from (cells before it was recorded: LEGACY_TEACHER),
    or, through `aliases`, of the earlier teacher it was measured interchangeable with."""
    return alias_chain(record.get("teacher", LEGACY_TEACHER), aliases)[-1]


def load_aliases(path: Path | None = None) -> dict[str, str]:
    """Rebuilt teacher -> earlier teacher, for the rechecks in `path` that reproduced their cell within EQUIV_TOL."""
    path = path or layout.EQUIVALENCE
    if not path.exists():
        return {}
    return {fp: e["of"] for fp, e in json.loads(path.read_text()).items() if e.get("equivalent")}


def one_teacher(
    records: list[dict], aliases: dict[str, str] | None = None
) -> tuple[list[dict], dict[str, dict[str, int]]]:
    """Each (track, setting) keeps the cells of the teacher most of its cells were distilled from (ties: the
    smaller fingerprint); returns the kept cells and, per table, how many cells of which other teacher were left out."""
    counts: dict[str, dict[str, int]] = {}
    for r in records:
        per = counts.setdefault(f"{r['cell']['track']}/{r['cell']['setting']}", {})
        fp = cell_teacher(r, aliases)
        per[fp] = per.get(fp, 0) + 1
    major = {k: min(c, key=lambda fp: (-c[fp], fp)) for k, c in counts.items()}
    kept = [
        r
        for r in records
        if cell_teacher(r, aliases) == major[f"{r['cell']['track']}/{r['cell']['setting']}"]
    ]
    dropped = {
        k: {fp: n for fp, n in sorted(c.items()) if fp != major[k]} for k, c in counts.items() if len(c) > 1
    }
    return kept, dropped


def teacher_figures(fp: str, teachers: dict[str, dict], aliases: dict[str, str] | None) -> dict:
    """`fp`'s recorded figures, with any figure it lacks taken from a teacher measured interchangeable with
    it (the same end of the alias chain), e.g. the base-to-novel figures only a later rebuild recorded."""
    end = alias_chain(fp, aliases)[-1]
    group = [fp] + [t for t in sorted(teachers) if t != fp and alias_chain(t, aliases)[-1] == end]
    merged: dict = {}
    for t in group:
        for k, v in teachers.get(t, {}).items():
            merged.setdefault(k, v)
    return merged


def load_teachers() -> dict[str, dict]:
    """Teacher fingerprint -> its figures, from benchmarks/results/methods_teacher.json (older files held one)."""
    path = layout.RESULTS / "methods_teacher.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    if "teachers" in data:
        return data["teachers"]
    return {data["fingerprint"]: data["metrics"]} if "fingerprint" in data else {}


def recorded_teacher(teachers: dict[str, dict], path: Path | None = None) -> dict | None:
    """The figures of the teacher that methods_teacher.json names as current (through the recorded
    equivalences), or None when none is recorded."""
    path = path or layout.RESULTS / "methods_teacher.json"
    current = json.loads(path.read_text()).get("current") if path.exists() else None
    chain = alias_chain(current, load_aliases()) if current else []
    return next((teachers[t] for t in chain if t in teachers), None)
