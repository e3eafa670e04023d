"""Teacher equivalence: is a rebuilt teacher interchangeable with a recorded one? Evidence from a re-run
cell (`recheck`) or from finished cells of two tracks (`pair_tracks`), recorded in `layout.EQUIVALENCE`;
and the current teacher's own figures (`teacher_metrics`), measured once per teacher."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from . import layout
from .grid import B2N_KEY, EQUIV_TOL, EVAL, PROBE, PROBE_KEY, Budget, Cell
from .runner import base2novel, evaluate, probe, recipe, run_cell
from .stats import scores
from .teachers import alias_chain, cell_teacher, load_aliases, load_teachers

log = logging.getLogger("methods")


def compare_records(old: dict, new: dict) -> dict:
    """Every figure of `scores` in both records: new - old, the largest |difference|, and whether it is within EQUIV_TOL."""
    a, b = scores(old["metrics"]), scores(new["metrics"])
    # the linear probe is left out: the same student weights probe up to ~1 point apart on two machines
    diffs = {
        k: round(b[k] - a[k], 4)
        for k in a
        if a[k] is not None and b.get(k) is not None and k != "linear probe"
    }
    worst = max((abs(d) for d in diffs.values()), default=math.inf)
    return {"diffs": diffs, "max_abs_diff": worst, "equivalent": worst <= EQUIV_TOL}


def image_free(method: str) -> bool:
    """No term of the method's recipe reaches caption-less images (`Term.unpaired` "none" and no
    `unpaired_loss` of its own), and it trains on every pair (no keep-list)."""
    from clipdistill.losses.base import Term, get_term
    from clipdistill.losses.config import parse_loss_config

    if method == "clip_cid":
        return False
    for name in parse_loss_config(recipe(method, {"centres": "unused"})).weights:
        cls = get_term(name)
        if cls.unpaired != "none" or cls.unpaired_loss is not Term.unpaired_loss:
            return False
    return True


def pair_tracks(records: list[dict], first: str = "A", second: str = "b2n") -> dict[str, dict]:
    """Evidence from finished cells alone: the methods none of whose terms uses caption-less images
    (`image_free`) train on the same pairs from the same seed in tracks `first` and `second`, so where the two
    tracks' cells were distilled from different teachers, each such (method, seed) pair is a recheck.
    Returns {second's teacher: entry} for each teacher pair, as `recheck` writes them."""
    by_cell = {
        (r["cell"]["method"], r["cell"]["track"], r["cell"]["setting"], r["cell"]["seed"]): r for r in records
    }
    free = {m: image_free(m) for m in {k[0] for k in by_cell}}
    found: dict[str, dict] = {}
    for (method, track, setting, seed), new in sorted(by_cell.items()):
        old = by_cell.get((method, first, setting, seed))
        if track != second or not free[method] or old is None or cell_teacher(old) == cell_teacher(new):
            continue
        e = found.setdefault(
            cell_teacher(new),
            {"of": cell_teacher(old), "cells": [], "tolerance": EQUIV_TOL, "max_abs_diff": 0.0},
        )
        if e["of"] != cell_teacher(old):
            continue
        c = compare_records(old, new)
        e["cells"].append(f"{method}-{first}/{second}-{setting}-s{seed}")
        e["max_abs_diff"] = max(e["max_abs_diff"], c["max_abs_diff"])
    for e in found.values():
        e["equivalent"] = bool(e["cells"]) and e["max_abs_diff"] <= EQUIV_TOL
    return found


def recheck(
    name: str, budget: Budget, teacher_dir: Path, prep: dict, data_root: str | None, cells: Path | None = None
) -> dict:
    """Re-run the recorded cell `name` (of the budget's cells folder; `cells` overrides the main grid's) with
    the current teacher (own folders under runs/, the grid's record untouched) and record in EQUIVALENCE
    whether it reproduces every figure within EQUIV_TOL points: if so, tables count the current teacher's
    cells as cells of the recorded one."""
    folder = layout.cells_dir(budget, cells)
    path = folder / f"{name}.json"
    if not path.exists():
        raise SystemExit(
            f"recheck: no finished cell '{name}' in {folder}; the `list` subcommand names the cells"
        )
    old = json.loads(path.read_text())
    fp, was = prep["teacher"].fingerprint(), cell_teacher(old)
    if fp == was:
        raise SystemExit(f"recheck: cell '{name}' was distilled from this teacher ({fp}); nothing to check")
    out = layout.RUNS / "recheck" / fp
    done = out / f"{name}.json"
    if done.exists():
        new = json.loads(done.read_text())
    else:
        new = run_cell(
            Cell(**old["cell"]), budget, teacher_dir, prep, data_root, folder=out, train_dir=out / name
        )
    entry = {"of": was, "cell": name, "tolerance": EQUIV_TOL, **compare_records(old, new)}
    record_equivalence({fp: entry})
    log.info(
        "recheck of %s with teacher %s: largest difference %.3f points (%s)",
        name,
        fp,
        entry["max_abs_diff"],
        "interchangeable" if entry["equivalent"] else "not interchangeable",
    )
    return entry


def record_equivalence(found: dict[str, dict]) -> None:
    """Add `found` (rebuilt teacher -> evidence) to EQUIVALENCE, each with the two teachers' own figure
    differences where both were evaluated."""
    teachers = load_teachers()
    for fp, e in found.items():
        if fp in teachers and e["of"] in teachers:
            e["teacher_diffs"] = compare_records({"metrics": teachers[e["of"]]}, {"metrics": teachers[fp]})[
                "diffs"
            ]
    known = json.loads(layout.EQUIVALENCE.read_text()) if layout.EQUIVALENCE.exists() else {}
    layout.write_json(layout.EQUIVALENCE, {**known, **found})


def teacher_metrics(prep: dict, data_root: str | None) -> dict:
    """The teacher's figures on EVAL, B2N and PROBE, cached per teacher fingerprint in
    benchmarks/results/methods_teacher.json. A rebuilt teacher (other weights: the LiT heads' training is
    seeded but not bit-reproducible across machines) gets its own entry; every cell records the
    fingerprint of the teacher it was distilled from, and each table compares cells of one teacher. A
    teacher measured interchangeable with a recorded one (EQUIVALENCE) is not evaluated again."""
    fp = prep["teacher"].fingerprint()
    teachers = load_teachers()
    same = next((t for t in alias_chain(fp, load_aliases()) if t in teachers), fp)
    if same != fp:  # measured interchangeable with a recorded teacher: its figures stand
        log.info("teacher %s: using the recorded figures of %s, measured interchangeable with it", fp, same)
        return teachers[same]
    metrics = teachers.get(fp)
    changed = not metrics or not set(EVAL) <= set(metrics)
    if changed:
        metrics = evaluate(prep["teacher"], data_root, cache=True)
    if B2N_KEY not in metrics:
        metrics[B2N_KEY] = base2novel(prep["teacher"], data_root, cache=True)
        changed = True
    if metrics.get(PROBE_KEY, {}).get("train_every") != PROBE["train_every"]:
        metrics[PROBE_KEY] = probe(prep["teacher"], data_root, cache=True)
        changed = True
    if changed:
        layout.write_json(
            layout.RESULTS / "methods_teacher.json", {"teachers": {**teachers, fp: metrics}, "current": fp}
        )
    return metrics
