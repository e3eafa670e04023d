"""Writing the report: benchmarks/results/methods.{json,csv,md,png} and methods_summary.md, the README's
summary block and docs/benchmark.md's tables from the finished cells; another budget's own report."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict
from pathlib import Path

from . import layout
from .grid import Budget, budget_name
from .pretrained_report import OWNED
from .stats import aggregate, budget_study
from .tables import COLUMNS, budget_table, markdown, summary_table
from .teachers import load_aliases, load_teachers, recorded_teacher


def render(budget: Budget, teacher_metrics: dict | None = None, cells: Path | None = None) -> dict:
    """Aggregate the budget's finished cells (`cells` overrides the main grid's folder) into its report."""
    if budget != Budget():
        return render_budget(budget, teacher_metrics)
    records = layout.load_cells(layout.cells_dir(budget, cells), budget)
    if not records:
        raise SystemExit("no finished cell yet; run `python -m benchmarks.methods run` first")
    teachers = load_teachers()
    if teacher_metrics is None:  # `render` alone: the figures of the teacher recorded last
        teacher_metrics = recorded_teacher(teachers)
    agg = aggregate(records, teacher_metrics, teachers, load_aliases())
    agg["budgets"] = budget_study(records)
    latency = _latency(budget.student)
    # the headline margin: track A (the published setting) when measured; every track's is under "margins"
    best_margin = agg["margins"].get("A/image") or next((m for m in agg["margins"].values() if m), None)
    out = {
        "budget": asdict(budget),
        "teacher": teacher_metrics,
        "teachers": teachers,
        "cells": records,
        "summary": agg["rows"],
        "margins": agg["margins"],
        "noise_relational_margin": best_margin,
        "budget_study": agg["budgets"],
    }
    results = layout.RESULTS
    # the pretrained-student regime's keys (pretrained_report) stay as that report wrote them
    path = results / "methods.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    out.update({k: previous[k] for k in OWNED if k in previous})
    layout.write_json(path, out)
    table = "\n".join([markdown(agg, budget, latency)] + budget_table(agg["budgets"]))
    (results / "methods.md").write_text(table + "\n")
    summary = summary_table(agg)
    (results / "methods_summary.md").write_text(summary)
    layout.splice(layout.REPO / "README.md", "benchmark summary", summary)
    _write_csv(agg["rows"], results / "methods.csv")
    plot(agg, results / "methods.png")
    _write_doc(table)
    return out


def render_budget(budget: Budget, teacher_metrics: dict | None = None) -> dict:
    """A non-default budget's own report (BUDGETS/<name>.{json,md}); the main tables are left alone."""
    records = layout.load_cells(layout.cells_dir(budget), budget)
    if not records:
        raise SystemExit(f"no finished cell of budget {budget_name(budget)} yet")
    agg = aggregate(records, teacher_metrics, load_teachers(), load_aliases())
    name = budget_name(budget)
    out = {"budget": asdict(budget), "cells": records, "summary": agg["rows"], "margins": agg["margins"]}
    layout.write_json(layout.BUDGETS / f"{name}.json", out)
    (layout.BUDGETS / f"{name}.md").write_text(markdown(agg, budget, {}) + "\n")
    return out


def _write_csv(rows: list[dict], path: Path) -> None:
    """One line per (track, setting, method): mean and std of every column (atomically)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["track", "setting", "method", "seeds"] + [f"{c} {s}" for c in COLUMNS for s in ("mean", "std")]
        )
        for r in rows:
            figures = [
                f"{r['metrics'][c][s]:.3f}" if c in r["metrics"] else ""
                for c in COLUMNS
                for s in ("mean", "std")
            ]
            w.writerow([r["track"], r["setting"], r["method"], len(r["seeds"])] + figures)
    os.replace(tmp, path)


def _latency(student: str) -> dict:
    path = layout.RESULTS / "latency.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    rows = data.get("rows", data) if isinstance(data, dict) else data
    for row in rows if isinstance(rows, list) else []:
        if row.get("model") == student and row.get("tower") == "image":
            return row
    return {}


def _write_doc(table: str) -> None:
    """docs/benchmark.md: its text above `<!-- methods table -->` kept, the tables below it replaced."""
    doc = layout.DOC
    head = doc.read_text().split("<!-- methods table -->")[0] if doc.exists() else "# Benchmark\n\n"
    doc.parent.mkdir(exist_ok=True)
    tmp = doc.with_name(".benchmark.md.tmp")
    tmp.write_text(head + "<!-- methods table -->\n\n" + table + "\n")
    os.replace(tmp, doc)


def plot(agg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["track"], r["setting"]) for r in agg["rows"]})
    fig, axes = plt.subplots(1, len(keys), figsize=(7 * len(keys), 4.5), squeeze=False)
    for ax, (track, setting) in zip(axes[0], keys):
        rows = [r for r in agg["rows"] if (r["track"], r["setting"]) == (track, setting)]
        for i, metric in enumerate(["zero-shot mean", "retrieval mean"]):
            xs = [j + (i - 0.5) * 0.38 for j in range(len(rows))]
            ax.bar(
                xs,
                [r["metrics"][metric]["mean"] for r in rows],
                0.38,
                yerr=[r["metrics"][metric]["std"] for r in rows],
                label=metric,
                capsize=2,
            )
        ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("percent (mean ± std over seeds)")
        ax.set_title(f"track {track}, setting {setting}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
