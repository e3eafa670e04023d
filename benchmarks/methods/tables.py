"""The markdown tables: per (track, setting) the full table with the margin and the iteration, founding,
base-to-novel and linear-probe tables below it; the README's summary; the budget study."""

from __future__ import annotations

import json
import math

from .grid import FOUNDING, GRID, TRACKS, Budget, variant_options
from .stats import MIN_SEEDS

COLUMNS = [
    "cifar10 acc1",
    "imagenet-1k-sample acc1",
    "imagenet-1k-sample acc5",
    "dtd-10 acc1",
    "mnist acc1",
    "flickr8k text_retrieval_recall@1",
    "flickr8k text_retrieval_recall@5",
    "flickr8k text_retrieval_recall@10",
    "flickr8k image_retrieval_recall@1",
    "flickr8k image_retrieval_recall@5",
    "flickr8k image_retrieval_recall@10",
    "zero-shot mean",
    "retrieval mean",
    "score",
]
SHORT = {
    "cifar10 acc1": "CIFAR-10",
    "imagenet-1k-sample acc1": "IN top-1",
    "imagenet-1k-sample acc5": "IN top-5",
    "dtd-10 acc1": "DTD-10",
    "mnist acc1": "MNIST",
    "flickr8k text_retrieval_recall@1": "i2t R@1",
    "flickr8k text_retrieval_recall@5": "i2t R@5",
    "flickr8k text_retrieval_recall@10": "i2t R@10",
    "flickr8k image_retrieval_recall@1": "t2i R@1",
    "flickr8k image_retrieval_recall@5": "t2i R@5",
    "flickr8k image_retrieval_recall@10": "t2i R@10",
    "zero-shot mean": "ZS mean",
    "retrieval mean": "Ret mean",
    "score": "score",
}


def markdown(agg: dict, budget: Budget, latency: dict) -> str:
    lines = []
    for track, setting in _tracks_in(agg):
        key = f"{track}/{setting}"
        teacher = agg.get("teachers", {}).get(key, agg["teacher"])
        rows = _table_rows(agg, key)
        lines += [
            f"### Track {track}, student setting `{setting}` ({budget.student}, {budget.steps} steps x batch {budget.batch_size})",
            "",
            "| method | seeds | " + " | ".join(SHORT[c] for c in COLUMNS) + " | train s |",
            "|---|---|" + "---|" * (len(COLUMNS) + 1),
        ]
        if teacher:
            lines.append("| teacher | - | " + " | ".join(f"{teacher[c]:.1f}" for c in COLUMNS) + " | - |")
        best = {c: max(r["metrics"][c]["mean"] for r in rows if c in r["metrics"]) for c in COLUMNS}
        for r in rows:
            cells = []
            for c in COLUMNS:
                v = r["metrics"].get(c)
                if v is None:
                    cells.append("-")
                    continue
                text = f"{v['mean']:.1f} ± {v['std']:.1f}"
                cells.append(f"**{text}**" if math.isclose(v["mean"], best[c]) else text)
            lines.append(
                f"| {r['method']} | {len(r['seeds'])} | "
                + " | ".join(cells)
                + f" | {r['train_seconds']:.0f} |"
            )
        lines.append("")
        for fp, n in agg.get("left_out", {}).get(key, {}).items():
            lines += [
                f"Left out: {n} cell(s) of this table distilled from another teacher ({fp}); every row above shares one.",
                "",
            ]
        winners = [
            f"{SHORT[c]} {', '.join(r['method'] for r in rows if c in r['metrics'] and math.isclose(r['metrics'][c]['mean'], best[c]))}"
            for c in COLUMNS
        ]
        lines += ["Best mean per metric: " + "; ".join(winners) + ".", ""]
        ret = [
            f"{r['method']} {r['metrics']['score']['retention']:.0f}%"
            for r in rows
            if r["metrics"].get("score", {}).get("retention")
        ]
        if ret:
            lines += ["Retention of the teacher's score: " + ", ".join(ret) + ".", ""]
        lines += _margin_lines(agg, key)
        lines += iteration_table(agg["iteration"].get(key))
        lines += founding_table(rows, teacher) + b2n_table(rows, teacher, track) + probe_table(rows, teacher)
    if latency:
        lines += [
            f"Student image-encoder latency ({budget.student}, batch 1, 2 threads, PyTorch / ONNX Runtime): "
            f"{latency['torch_ms_b1']:.1f} / {latency['onnx_ms_b1']:.1f} ms (benchmarks/results/latency.json).",
            "",
        ]
    return "\n".join(lines)


def _margin_lines(agg: dict, key: str) -> list[str]:
    """The relational margin on the score, then on the zero-shot and retrieval means alone."""
    margin = agg["margins"].get(key)
    if not margin:
        return []
    lines = [
        f"Relational margin ({margin['ours']}) on the score over the best published method ({margin['over']}): "
        f"{_pm_margin(margin)} points over seeds {margin['seeds']}: {_verdict(margin, detail=True)}."
    ]
    for k, m in agg["margins_by_metric"].get(key, {}).items():
        if m:
            lines.append(
                f"On the {k} alone, against its best published method ({m['over']}): {_pm_margin(m)} points."
            )
    return lines + [""]


def _table_rows(agg: dict, key: str) -> list[dict]:
    """A table's rows: the grid's methods and our row (not every variant)."""
    ours = _ours(agg, key)
    return [
        r
        for r in agg["rows"]
        if f"{r['track']}/{r['setting']}" == key and (r["method"] in GRID or r["method"] == ours)
    ]


def _ours(agg: dict, key: str) -> str | None:
    """Our row of a track: the one its margin compares, else (no published method yet) the dev-selected one."""
    return (agg["margins"].get(key) or {}).get("ours") or (agg["iteration"].get(key) or {}).get("selected")


def _tracks_in(agg: dict) -> list[tuple[str, str]]:
    """The (track, setting) pairs with finished cells, tracks in TRACKS order."""
    return sorted(
        {(r["track"], r["setting"]) for r in agg["rows"]}, key=lambda k: (list(TRACKS).index(k[0]), k[1])
    )


def summary_table(agg: dict) -> str:
    """The compact table for the README: per track, each method's zero-shot mean, retrieval mean, score
    and (where measured) CIFAR-10 base-to-novel HM, mean ± std over seeds; the relational margin below."""
    lines = []
    for key in (f"{track}/{setting}" for track, setting in _tracks_in(agg)):
        rows = _table_rows(agg, key)
        teacher = agg.get("teachers", {}).get(key, agg["teacher"])
        cols = ["zero-shot mean", "retrieval mean", "score"] + (
            ["b2n hm"] if any("b2n hm" in r["metrics"] for r in rows) else []
        )
        names = {
            "zero-shot mean": "ZS mean",
            "retrieval mean": "Ret mean",
            "score": "score",
            "b2n hm": "CIFAR-10 b2n HM",
        }
        lines += [
            f"Track {key.replace('/', ', setting ')}:",
            "",
            "| method | seeds | " + " | ".join(names[c] for c in cols) + " |",
            "|---|---|" + "---|" * len(cols),
        ]
        if teacher:
            lines.append(
                "| teacher | - | "
                + " | ".join(f"{teacher[c]:.1f}" if teacher.get(c) is not None else "-" for c in cols)
                + " |"
            )
        lines += [
            f"| {r['method']} | {len(r['seeds'])} | " + " | ".join(_pm(r, c) for c in cols) + " |"
            for r in rows
        ]
        margin = agg["margins"].get(key)
        if margin:
            lines += [
                "",
                f"Relational margin ({margin['ours']} vs {margin['over']}, score): {_pm_margin(margin)} "
                f"over seeds {margin['seeds']} ({_verdict(margin)}).",
            ]
        lines.append("")
    return "\n".join(lines)


def _pm_margin(margin: dict) -> str:
    """'+0.35 ± 0.35', or for one seed (no spread to show) '+1.49 (one seed)'."""
    if len(margin["seeds"]) < 2:
        return f"{margin['mean']:+.2f} (one seed)"
    return f"{margin['mean']:+.2f} ± {margin['std']:.2f}"


def _verdict(margin: dict, detail: bool = False) -> str:
    """'wins', 'does not win' or (fewer than MIN_SEEDS paired seeds) 'not decided'; `detail` adds the rule."""
    n = len(margin["seeds"])
    if margin["wins"]:
        return "wins (margin - 2 std >= 1 point)" if detail else "wins"
    if n < MIN_SEEDS:
        return (
            f"not decided yet ({n} paired seed(s); a win needs {MIN_SEEDS})"
            if detail
            else f"not decided: {n} of {MIN_SEEDS} seeds"
        )
    return "does not win (needs margin - 2 std >= 1 point)" if detail else "does not win"


def _pm(row: dict, key: str) -> str:
    v = row["metrics"].get(key)
    return "-" if v is None else f"{v['mean']:.1f} ± {v['std']:.1f}"


def iteration_table(it: dict | None) -> list[str]:
    """Our method's option variants at seed 0, ranked on Flickr8k dev (the selection figure)."""
    if not it or len(it["seed0"]) < 2:
        return []
    lines = [
        "#### Iterating on the relational method (seed 0; selected on Flickr8k dev retrieval only)",
        "",
        "| variant | options changed | dev Ret mean | test ZS mean | test Ret mean | test score |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(it["seed0"], key=lambda r: -(r["dev retrieval mean"] or 0)):
        opts = (
            "default (configs/relational.yaml)"
            if r["method"] == "relational"
            else json.dumps(variant_options(r["method"]))
        )
        mark = " (selected)" if r["method"] == it["selected"] else ""
        lines.append(
            f"| {r['method']}{mark} | {opts} | {r['dev retrieval mean']:.2f} | {r['zero-shot mean']:.2f} "
            f"| {r['retrieval mean']:.2f} | {r['score']:.2f} |"
        )
    return lines + [""]


def founding_table(rows: list[dict], teacher: dict | None) -> list[str]:
    """The founding study: TinyCLIP-style vs CLIP-KD (CRD + ICL + FD) vs ours, zero-shot CIFAR-10 first."""
    rows = [r for m in FOUNDING for r in rows if r["method"] == m]
    if not rows:
        return []
    cols = [
        "cifar10 acc1",
        "imagenet-1k-sample acc1",
        "dtd-10 acc1",
        "mnist acc1",
        "zero-shot mean",
        "retrieval mean",
        "score",
    ]
    lines = [
        "#### Founding study: TinyCLIP-style vs CLIP-KD vs relational",
        "",
        "TinyCLIP-style here is affinity mimicking only: weight inheritance needs a student cut from the teacher's own "
        "architecture, and this teacher (EfficientNet-Lite2 + MiniLM) shares none with the ViT student.",
        "",
        "| method | seeds | " + " | ".join(SHORT[c] for c in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    if teacher:
        lines.append("| teacher | - | " + " | ".join(f"{teacher[c]:.1f}" for c in cols) + " |")
    for r in rows:
        lines.append(f"| {r['method']} | {len(r['seeds'])} | " + " | ".join(_pm(r, c) for c in cols) + " |")
    return lines + [""]


def b2n_table(rows: list[dict], teacher: dict | None, track: str) -> list[str]:
    """CIFAR-10 base-to-novel per method: base / novel top-1 and their harmonic mean."""
    rows = [r for r in rows if "b2n hm" in r["metrics"]]
    if not rows:
        return []
    cols = ["b2n base_acc1", "b2n novel_acc1", "b2n hm", "zero-shot mean", "retrieval mean"]
    seen = (
        "only images of the 5 base classes"
        if TRACKS[track].get("filter")
        else ("images of all 10 classes" if TRACKS[track].get("unpaired") else "no CIFAR-10 image")
    )
    lines = [
        f"#### CIFAR-10 base-to-novel (track {track}: the student saw {seen}; base = airplane ... deer, "
        "novel = dog ... truck, each half against its own class prompts; every 5th test image)",
        "",
        "| method | seeds | base top-1 | novel top-1 | HM | ZS mean | Ret mean |",
        "|---|---|---|---|---|---|---|",
    ]
    if teacher and teacher.get("b2n hm") is not None:
        lines.append("| teacher | - | " + " | ".join(f"{teacher[c]:.1f}" for c in cols) + " |")
    best = {c: max(r["metrics"][c]["mean"] for r in rows if c in r["metrics"]) for c in cols[:3]}
    for r in rows:
        cells = []
        for c in cols:
            text = _pm(r, c)
            top = c in best and c in r["metrics"] and math.isclose(r["metrics"][c]["mean"], best[c])
            cells.append(f"**{text}**" if top else text)
        lines.append(f"| {r['method']} | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    return lines + [""]


def probe_table(rows: list[dict], teacher: dict | None) -> list[str]:
    """CIFAR-10 linear-probe top-1 per method (cells that ran the `probe` pass)."""
    rows = [r for r in rows if "linear probe" in r["metrics"]]
    if not rows:
        return []
    lines = [
        "#### CIFAR-10 linear probe (frozen image embeddings; fitted on every 4th train image, tested on every 5th test image)",
        "",
        "| method | seeds | linear-probe top-1 | zero-shot top-1 |",
        "|---|---|---|---|",
    ]
    if teacher and teacher.get("linear probe") is not None:
        lines.append(f"| teacher | - | {teacher['linear probe']:.1f} | {teacher['cifar10 acc1']:.1f} |")
    for r in rows:
        seeds = r["metrics"]["linear probe"].get("n", len(r["seeds"]))
        lines.append(f"| {r['method']} | {seeds} | {_pm(r, 'linear probe')} | {_pm(r, 'cifar10 acc1')} |")
    return lines + [""]


def budget_table(study: list[dict]) -> list[str]:
    """The budget study (stats.budget_study): per other budget and track, each method at both budgets."""
    base = Budget().steps
    lines = []
    for s in study:
        b = s["budget"]
        lines += [
            f"### Budget study: track {s['track']}, setting `{s['setting']}`, {base} vs {b['steps']} steps "
            f"({b['student']}, batch {b['batch_size']}; the same seeds at both budgets)",
            "",
            f"| method | seeds | score @{base} | score @{b['steps']} | ZS mean @{base} | ZS mean @{b['steps']} "
            f"| Ret mean @{base} | Ret mean @{b['steps']} |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in s["rows"]:
            figures = [
                r[f"{k} {t}"] for k in ("score", "zero-shot mean", "retrieval mean") for t in ("base", "long")
            ]
            lines.append(
                f"| {r['method']} | {len(r['seeds'])} | "
                + " | ".join(f"{m:.1f} ± {sd:.1f}" for m, sd in figures)
                + " |"
            )
        lines.append("")
        for tag, steps in (("base", base), ("long", b["steps"])):
            m = s[f"margin_{tag}"]
            if m:
                lines.append(
                    f"Relational margin at {steps} steps ({m['ours']} vs {m['over']}, score, seeds {m['seeds']}): {_pm_margin(m)}."
                )
        lines.append("")
    return lines
