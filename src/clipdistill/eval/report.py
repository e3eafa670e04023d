"""Markdown tables of evaluation records (docs/methods.md section 10: metrics in [0, 1] in JSON, percent in tables).

`compare(records)`: one row per model, one column per (dataset, metric), headline metrics by default.
`format_record(record)`: the metrics of one record, for `clipdistill eval`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

log = logging.getLogger(__name__)

# The columns `compare` shows per task unless asked for every metric.
HEADLINE = {
    "zeroshot_classification": ("acc1", "acc5"),
    "zeroshot_retrieval": ("text_retrieval_recall@1", "image_retrieval_recall@1"),
    "base2novel": ("base_acc1", "novel_acc1", "hm"),
    "linear_probe": ("acc1",),
}
_LABELS = {
    "acc1": "top-1",
    "acc5": "top-5",
    "mean_per_class_recall": "mean recall",
    "base_acc1": "base",
    "novel_acc1": "novel",
    "hm": "HM",
}
_TASK_PREFIX = {"linear_probe": "LP ", "base2novel": "b2n "}


def metric_label(metric: str, task: str = "") -> str:
    """A short column label: 'top-1', 'I->T R@1' (image -> text), 'T->I R@5', 'LP top-1', 'b2n HM'."""
    if metric.startswith("text_retrieval_recall@"):
        label = "I->T R@" + metric.rsplit("@", 1)[1]
    elif metric.startswith("image_retrieval_recall@"):
        label = "T->I R@" + metric.rsplit("@", 1)[1]
    else:
        label = _LABELS.get(metric, metric)
    return _TASK_PREFIX.get(task, "") + label


def percent(value: object) -> str:
    """A metric in [0, 1] as a percentage with one decimal; '-' when missing."""
    return f"{100 * value:.1f}" if isinstance(value, (int, float)) and value == value else "-"


def row_label(record: dict) -> str:
    """The model as the user named it: the spec when the record has one, else model[/pretrained]."""
    spec = (record.get("clipdistill") or {}).get("spec")
    if spec:
        return str(spec)
    pretrained = record.get("pretrained")
    return (
        f"{record['model']}/{pretrained}" if pretrained and pretrained != "random" else str(record["model"])
    )


def _dataset_label(record: dict) -> str:
    extra = record.get("clipdistill") or {}
    label = str(record["dataset"])
    if extra.get("split") not in (None, "test"):
        label += f":{extra['split']}"
    return label + ("*" if int(extra.get("every") or 1) > 1 else "")


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def compare(records: Sequence[dict], *, all_metrics: bool = False) -> str:
    """Markdown table, models x (dataset, metric), values in percent.

    Rows keep the order of first appearance; columns are grouped by dataset (first appearance), then
    task (zero-shot classification, retrieval, base2novel, linear probe). A later record for the same
    (model, dataset, split, task) replaces an earlier one. '*' marks subsampled evaluations (`every` > 1).
    """
    cells: dict[tuple[str, str], float] = {}
    rows: list[str] = []
    columns: dict[str, tuple[int, int, int]] = {}  # label -> sort key
    datasets: list[str] = []
    for rec in records:
        task = str(rec.get("task", "zeroshot_classification"))
        names = (
            [m for m in rec["metrics"] if isinstance(rec["metrics"][m], (int, float))]
            if all_metrics
            else [m for m in HEADLINE.get(task, tuple(rec["metrics"])) if m in rec["metrics"]]
        )
        row, dataset = row_label(rec), _dataset_label(rec)
        if row not in rows:
            rows.append(row)
        if dataset not in datasets:
            datasets.append(dataset)
        task_rank = list(HEADLINE).index(task) if task in HEADLINE else len(HEADLINE)
        for i, metric in enumerate(names):
            col = f"{dataset} {metric_label(metric, task)}"
            columns.setdefault(col, (datasets.index(dataset), task_rank, i))
            if (row, col) in cells:
                log.warning("two records for %s / %s; keeping the later one", row, col)
            cells[row, col] = rec["metrics"][metric]
    if not rows:
        return "(no records)\n"
    order = sorted(columns, key=columns.__getitem__)
    table = _table(["model", *order], ([r, *(percent(cells.get((r, c))) for c in order)] for r in rows))
    subsampled = any(d.endswith("*") for d in datasets)
    return table + (
        "\n\\* 1 in N test samples only (see the record's `clipdistill.every`)\n" if subsampled else ""
    )


def format_record(record: dict) -> str:
    """A two-column markdown table of one record's metrics (percent) with a one-line caption."""
    extra = record.get("clipdistill") or {}
    every = int(extra.get("every") or 1)
    caption = (
        f"{row_label(record)} on {record['dataset']}:{extra.get('split', 'test')} ({record.get('task')}): "
        f"{extra.get('samples', '?')} samples{f' (1 in {every})' if every > 1 else ''}, "
        f"{extra.get('skipped', 0)} skipped, {extra.get('seconds', 0):.1f} s"
        + "".join(f"; {note}" for note in extra.get("unreadable", []))
    )
    task = str(record.get("task", ""))
    rows = [
        [metric_label(m, task), percent(v)]
        for m, v in record["metrics"].items()
        if isinstance(v, (int, float))
    ]
    return caption + "\n\n" + _table(["metric", "%"], rows)
